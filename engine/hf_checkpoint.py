"""Hugging Face Llama folders: config.json, model.safetensors (or shards with an index),
tokenizer.model. Shapes come from the safetensors headers and are checked before any
tensor is loaded; shard names from an index stay inside the folder.

Hugging Face rotates the two halves of each head (`rotate_half`) where tinyfuse (as
llama2.c) rotates interleaved pairs, so q and k rows are permuted on the way out and back
on the way in.
"""
import json
import os

import torch

from .files import default_mode, inside
from .model import ModelConfig
from .weights import CheckpointError, check_shapes, foreign_shapes, join_state, name_map, split_state

# The name Hugging Face's LlamaForCausalLM gives each role (`{i}` a layer).
NAMES = {"embedding": "model.embed_tokens.weight", "attention_norm": "model.layers.{i}.input_layernorm.weight",
         "wq": "model.layers.{i}.self_attn.q_proj.weight", "wk": "model.layers.{i}.self_attn.k_proj.weight",
         "wv": "model.layers.{i}.self_attn.v_proj.weight", "wo": "model.layers.{i}.self_attn.o_proj.weight",
         "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
         "w1": "model.layers.{i}.mlp.gate_proj.weight", "w2": "model.layers.{i}.mlp.down_proj.weight",
         "w3": "model.layers.{i}.mlp.up_proj.weight", "norm": "model.norm.weight", "output": "lm_head.weight"}


def _rotated_heads(cfg):
    """Foreign name -> its heads, for the q and k projections whose rows are permuted."""
    return {NAMES[role].format(i=i): heads for role, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads))
            for i in range(cfg.n_layers)}


def _to_halves(w, n_heads):
    """Rows of each head from interleaved pairs (x0 y0 x1 y1 ...) to halves (x0 x1 ... y0 y1 ...)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _to_pairs(w, n_heads):
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def config(cfg, bos=1, eos=2):
    """The Hugging Face LlamaConfig fields of a ModelConfig (config.json; the benchmark's HF rows)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float32"}


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def export(weights, out_dir, tokenizer_bytes=None):
    """A folder `LlamaForCausalLM.from_pretrained` loads: model.safetensors, config.json, the tokenizer."""
    from safetensors.torch import save_file

    cfg = weights.config
    rotated = _rotated_heads(cfg)
    out = {}
    for name, t in split_state(weights.state, name_map(cfg, NAMES)).items():
        t = t.detach().to("cpu", torch.float32)
        out[name] = (_to_halves(t, rotated[name]) if name in rotated else t).contiguous()
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    default_mode(os.path.join(out_dir, "model.safetensors"))  # safetensors creates it 0600
    bos, eos = 1, 2
    if tokenizer_bytes is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=tokenizer_bytes)
        bos, eos = sp.bos_id(), sp.eos_id()
        with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
            f.write(tokenizer_bytes)
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
            "tokenizer_class": "LlamaTokenizer", "bos_token": sp.id_to_piece(bos), "eos_token": sp.id_to_piece(eos),
            "unk_token": sp.id_to_piece(sp.unk_id()), "add_bos_token": True, "add_eos_token": False,
            "model_max_length": cfg.max_seq_len, "legacy": True})
    _write_json(os.path.join(out_dir, "config.json"), config(cfg, bos, eos))


def _read_config(path):
    """The ModelConfig of a folder's config.json, refusing what tinyfuse's model cannot be."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: a folder without config.json; expected a Hugging Face Llama folder")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{config_path}: not a JSON object ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object; got {type(hf).__name__}")
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"{path}: config.json has model_type {hf.get('model_type')!r}; expected 'llama'")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{path}: a Llama variant with biases or a non-SiLU MLP, which tinyfuse's model lacks")
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict) or (hf.get("rope_scaling") or rope.get("rope_type", "default")) not in (None, "default"):
        raise CheckpointError(f"{path}: RoPE scaling is not supported; expected plain RoPE")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings")
    absent = [k for k in required if k not in hf]
    if absent:
        raise CheckpointError(f"{config_path}: no {', '.join(absent)}; expected a Llama config.json")
    n_heads = hf["num_attention_heads"]
    try:
        cfg = ModelConfig(dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"], n_layers=hf["num_hidden_layers"],
                          n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads", n_heads),
                          vocab_size=hf["vocab_size"], max_seq_len=hf["max_position_embeddings"],
                          norm_eps=hf.get("rms_norm_eps", 1e-5),
                          rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                          tie_embeddings=hf.get("tie_word_embeddings", False) is True).validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: does not describe a model tinyfuse can build ({e})") from None
    if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
        raise CheckpointError(f"{path}: head_dim {hf['head_dim']} is not hidden_size / num_attention_heads")
    return cfg


def _weight_files(path):
    """The folder's safetensors files: the index's shards (inside the folder) or model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a JSON object ({type(e).__name__}: {str(e)[:100]})") from None
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: expected a non-empty weight_map of tensor names to file names")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors (or its index) beside config.json")
    return [inside(path, file, "a file of model.safetensors.index.json") for file in files]


def read(path):
    """(config, model state dict, tokenizer bytes or None) of a Hugging Face Llama folder."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    cfg = _read_config(path)
    files = _weight_files(path)
    mapping = name_map(cfg, NAMES)
    shapes = {}
    for file in files:  # the shapes first, from the headers: nothing is loaded for a wrong config
        try:
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    tensor = f.get_slice(k)
                    if tensor.get_dtype() not in ("F16", "BF16", "F32", "F64"):
                        raise CheckpointError(f"{file}: tensor {k} is {tensor.get_dtype()}; expected floating point")
                    shapes[k] = tuple(tensor.get_shape())
        except (SafetensorError, OSError) as e:  # a partial download, a damaged header
            raise CheckpointError(f"{file}: not a readable safetensors file, truncated or damaged ({e})") from None
    if cfg.tie_embeddings:  # a tied head saved beside the embedding it equals
        shapes.pop(NAMES["output"], None)
    check_shapes(foreign_shapes(mapping), shapes, cfg, path)
    tensors = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file, truncated or damaged ({e})") from None
    if cfg.tie_embeddings:
        tensors.pop(NAMES["output"], None)
    rotated = _rotated_heads(cfg)
    tensors = {name: _to_pairs(t, rotated[name]) if name in rotated else t for name, t in tensors.items()}
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        with open(os.path.join(path, "tokenizer.model"), "rb") as f:
            tokenizer = f.read()
    return cfg, join_state(tensors, mapping, cfg, path), tokenizer
