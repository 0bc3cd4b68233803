"""Model weights in and out: tinyfuse checkpoints, llama2.c's `.bin` (v0 and v1) and `.pt`,
and Hugging Face Llama folders. `load_checkpoint` tells them apart by content, so every
command that takes `--checkpoint` reads them all. This module is the one home of the native
format too: `save_checkpoint` writes it (atomically), `load_training_state` reads it back
for `--resume`, `run_checkpoints` lists a run folder's by step.

Loading never runs code. PyTorch files are read with `torch.load(weights_only=True)`: only
tensors and plain data (dicts, lists, tuples, numbers, strings, bytes) come back, and a file
holding any other object is refused. A tinyfuse checkpoint holds exactly that: the tokenizer
as bytes, the RNG states as tensors and numbers, the configurations as dicts. Sizes read
from a header are checked against the file (or the safetensors' shapes) before anything is
allocated, and a header cannot ask for more than `ModelConfig.validate` allows.

The model fuses wq/wk/wv into wqkv and w1/w3 into w13; the formats keep them apart, so
conversion goes through llama2.c's names (`to_llama2c`, `from_llama2c`). Hugging Face
rotates the two halves of each head (`rotate_half`) where llama2.c rotates interleaved
pairs, so its q and k rows are permuted on the way out and back on the way in.
"""
import json
import math
import os
import pickle
import re
import struct
import sys
from dataclasses import dataclass

import numpy as np
import torch

from .files import FileError, atomic_write, default_mode, inside
from .model import ModelConfig

NATIVE_KIND = "tinyfuse-checkpoint"
V1_MAGIC = 0x616B3432  # "ak42" as llama2.c writes it: little-endian uint32
V1_HEADER_BYTES = 256
FORMATS = ("llama2c-v0", "llama2c-v1", "hf")


class CheckpointError(ValueError):
    """A file that is not a checkpoint we can read, with what was found and what was expected."""


@dataclass
class Weights:
    config: ModelConfig
    state: dict  # the Transformer's state dict
    tokenizer: bytes | None  # a SentencePiece .model, when the checkpoint carries one
    format: str  # "tinyfuse", "llama2c-v0", "llama2c-v1", "llama2c-pt" or "hf"


# ---------------------------------------------------------------- llama2.c names

def _layer_names(i):
    prefix = f"layers.{i}."
    return {name: prefix + name for name in (
        "attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
        "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
        "feed_forward.w3.weight")}


def llama2c_shapes(cfg):
    """llama2.c's tensor names and shapes for a config, in state-dict order."""
    hd, kv = cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim)}
    per_layer = {"attention_norm.weight": (cfg.dim,), "attention.wq.weight": (cfg.n_heads * hd, cfg.dim),
                 "attention.wk.weight": (kv, cfg.dim), "attention.wv.weight": (kv, cfg.dim),
                 "attention.wo.weight": (cfg.dim, cfg.n_heads * hd), "ffn_norm.weight": (cfg.dim,),
                 "feed_forward.w1.weight": (cfg.hidden_dim, cfg.dim), "feed_forward.w2.weight": (cfg.dim, cfg.hidden_dim),
                 "feed_forward.w3.weight": (cfg.hidden_dim, cfg.dim)}
    for i in range(cfg.n_layers):
        for short, full in _layer_names(i).items():
            shapes[full] = per_layer[short]
    shapes["norm.weight"] = (cfg.dim,)
    shapes["output.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes


def to_llama2c(state, cfg):
    """The Transformer's state dict under llama2.c's names (output.weight always present)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {"tok_embeddings.weight": state["tok_embeddings.weight"]}
    for i in range(cfg.n_layers):
        p, names = f"layers.{i}.", _layer_names(i)
        wq, wk, wv = state[p + "attention.wqkv.weight"].split([q, kv, kv])
        w1, w3 = state[p + "feed_forward.w13.weight"].split(cfg.hidden_dim)
        out.update({names["attention_norm.weight"]: state[p + "attention_norm"], names["attention.wq.weight"]: wq,
                    names["attention.wk.weight"]: wk, names["attention.wv.weight"]: wv,
                    names["attention.wo.weight"]: state[p + "attention.wo.weight"],
                    names["ffn_norm.weight"]: state[p + "ffn_norm"], names["feed_forward.w1.weight"]: w1,
                    names["feed_forward.w2.weight"]: state[p + "feed_forward.w2.weight"],
                    names["feed_forward.w3.weight"]: w3})
    out["norm.weight"] = state["norm"]
    out["output.weight"] = state["tok_embeddings.weight"] if cfg.tie_embeddings else state["output.weight"]
    return out


def shapes_of(tensors):
    return {k: tuple(v.shape) for k, v in tensors.items()}


def check_shapes(expected, found, cfg, source):
    """One error naming the missing, unexpected and misshapen tensors when `found` does not
    have exactly the `expected` names and shapes (both name -> shape tuple)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k]} (expected {tuple(expected[k])})"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            problems.append(f"{label}: {', '.join(names[:4])}" + (f" and {len(names) - 4} more" if len(names) > 4 else ""))
    if problems:
        raise CheckpointError(f"{source}: the tensors do not match a model of dim {cfg.dim}, {cfg.n_layers} layers, "
                              f"vocab {cfg.vocab_size} ({'; '.join(problems)})")


def model_shapes(cfg):
    """The Transformer's state-dict names and shapes for a config, without allocating it."""
    from .model import Transformer

    with torch.device("meta"):
        return shapes_of(Transformer(cfg).state_dict())


def from_llama2c(tensors, cfg, source):
    """The Transformer's state dict from llama2.c's names; missing, unexpected or misshapen
    tensors are one error naming them."""
    expected = llama2c_shapes(cfg)
    if cfg.tie_embeddings:
        expected.pop("output.weight")
        tensors = {k: v for k, v in tensors.items() if k != "output.weight"}
    check_shapes(expected, shapes_of(tensors), cfg, source)
    t = {k: v.float().contiguous() for k, v in tensors.items()}
    state = {"tok_embeddings.weight": t["tok_embeddings.weight"]}
    for i in range(cfg.n_layers):
        p, n = f"layers.{i}.", _layer_names(i)
        state[p + "attention_norm"] = t[n["attention_norm.weight"]]
        state[p + "attention.wqkv.weight"] = torch.cat(
            [t[n["attention.wq.weight"]], t[n["attention.wk.weight"]], t[n["attention.wv.weight"]]])
        state[p + "attention.wo.weight"] = t[n["attention.wo.weight"]]
        state[p + "ffn_norm"] = t[n["ffn_norm.weight"]]
        state[p + "feed_forward.w13.weight"] = torch.cat([t[n["feed_forward.w1.weight"]], t[n["feed_forward.w3.weight"]]])
        state[p + "feed_forward.w2.weight"] = t[n["feed_forward.w2.weight"]]
    state["norm"] = t["norm.weight"]
    if not cfg.tie_embeddings:
        state["output.weight"] = t["output.weight"]
    return state


# ---------------------------------------------------------------- llama2.c .bin

def _header_config(source, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len, tied):
    values = dict(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                  vocab_size=vocab_size, max_seq_len=max_seq_len)
    try:
        return ModelConfig(**values, tie_embeddings=tied).validate()
    except ValueError as e:
        shown = ", ".join(f"{k} {v}" for k, v in values.items())
        raise CheckpointError(f"{source}: the header ({shown}) is not a valid model ({e})") from None


def _v0_order(cfg):
    """Tensor names in the order llama2.c's legacy export writes them: each kind for every
    layer in turn."""
    shapes = llama2c_shapes(cfg)
    layers = [_layer_names(i) for i in range(cfg.n_layers)]
    names = ["tok_embeddings.weight"]
    names += [n["attention_norm.weight"] for n in layers]
    for kind in ("wq", "wk", "wv", "wo"):
        names += [n[f"attention.{kind}.weight"] for n in layers]
    names += [n["ffn_norm.weight"] for n in layers]
    for kind in ("w1", "w2", "w3"):
        names += [n[f"feed_forward.{kind}.weight"] for n in layers]
    names.append("norm.weight")
    return names, shapes


def _v1_order(cfg):
    shapes = llama2c_shapes(cfg)
    layers = [_layer_names(i) for i in range(cfg.n_layers)]
    names = [n["attention_norm.weight"] for n in layers] + [n["ffn_norm.weight"] for n in layers]
    names += ["norm.weight", "tok_embeddings.weight"]
    for kind in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        names += [n[f"{kind}.weight"] for n in layers]
    return names, shapes


def _rope_floats(cfg):
    return cfg.max_seq_len * cfg.head_dim  # cos and sin, [max_seq_len, head_dim / 2] each


def _read_floats(path, offset, layout, what):
    """Tensors from a file of float32s laid out as (name, shape) pairs after `offset` bytes;
    a None name is a block to skip. The file's size must be exactly what the layout says."""
    expected = offset + 4 * sum(math.prod(shape) for _, shape in layout)
    size = os.path.getsize(path)
    if size != expected:
        kind = "truncated" if size < expected else "longer than its header says"
        raise CheckpointError(f"{path}: {kind} — a {what} expects {expected} bytes; the file has {size}")
    flat = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=offset))
    tensors, at = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        if name is not None:
            tensors[name] = flat[at:at + n].view(shape)
        at += n
    return tensors


def _read_v0(path, head):
    if len(head) < 28:
        raise CheckpointError(f"{path}: truncated — {len(head)} bytes, shorter than llama2.c's 28-byte v0 header")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, max_seq_len = struct.unpack("<7i", head[:28])
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, max_seq_len) <= 0 or vocab == 0 or dim > 1 << 16:
        raise CheckpointError(
            f"{path}: not a checkpoint we know — its first 4 bytes 0x{struct.unpack('<I', head[:4])[0]:08x} are not "
            f"llama2.c's v1 magic 0x{V1_MAGIC:08x}, it is not a PyTorch file, and as a llama2.c v0 header "
            f"(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len) it reads "
            f"{dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, max_seq_len}, which is no model")
    cfg = _header_config(path, dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab), max_seq_len, vocab > 0)
    names, shapes = _v0_order(cfg)
    layout = [(n, shapes[n]) for n in names] + [(None, (_rope_floats(cfg),))]  # the RoPE tables are skipped
    if not cfg.tie_embeddings:
        layout.append(("output.weight", shapes["output.weight"]))
    tensors = _read_floats(path, 28, layout, f"llama2.c v0 file with this header (dim {dim}, hidden {hidden_dim}, "
                                             f"{n_layers} layers, vocab {vocab}, seq {max_seq_len})")
    return cfg, tensors


def _read_v1(path, head):
    if len(head) < V1_HEADER_BYTES:
        raise CheckpointError(f"{path}: truncated — {len(head)} bytes, shorter than llama2.c's "
                              f"{V1_HEADER_BYTES}-byte v1 header")
    version = struct.unpack("<i", head[4:8])[0]
    if version == 2:
        raise CheckpointError(f"{path}: llama2.c version 2 (int8-quantised) is not supported; expected version 1 "
                              "(or the legacy v0): export float32 weights with llama2.c's --version 1")
    if version != 1:
        raise CheckpointError(f"{path}: llama2.c magic with version {version}; expected version 1")
    dims = struct.unpack("<7i", head[8:36])
    tied = head[36]
    if tied not in (0, 1):
        raise CheckpointError(f"{path}: the shared-classifier flag is {tied}; expected 0 or 1")
    cfg = _header_config(path, *dims, bool(tied))
    names, shapes = _v1_order(cfg)
    if not cfg.tie_embeddings:
        names.append("output.weight")
    tensors = _read_floats(path, V1_HEADER_BYTES, [(n, shapes[n]) for n in names],
                           f"llama2.c v1 file with this header {dims}")
    return cfg, tensors


def _write_floats(f, tensor):
    f.write(tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes())


def export_llama2c(weights, path, version=0):
    """A llama2.c `.bin` run.c reads: version 0 (legacy: header, weights, RoPE tables) or 1."""
    from tinyfuse.kernels.rope import rope_tables

    cfg = weights.config
    tensors = to_llama2c(weights.state, cfg)
    dims = (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)
    if version not in (0, 1):
        raise ValueError(f"llama2.c version must be 0 or 1; got {version}")

    def write(f):
        if version == 0:
            vocab = cfg.vocab_size if cfg.tie_embeddings else -cfg.vocab_size
            f.write(struct.pack("<7i", *dims, vocab, cfg.max_seq_len))
            names, _ = _v0_order(cfg)
            for name in names:
                _write_floats(f, tensors[name])
            # The tables run.c's ancestors read; llama2.c computes them in float32 on the CPU.
            cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, theta=cfg.rope_theta, device="cpu")
            _write_floats(f, cos)
            _write_floats(f, sin)
        elif version == 1:
            f.write(struct.pack("<Ii", V1_MAGIC, 1))
            f.write(struct.pack("<7i", *dims, cfg.vocab_size, cfg.max_seq_len))
            f.write(struct.pack("<B", int(cfg.tie_embeddings)))
            f.write(b"\0" * (V1_HEADER_BYTES - f.tell()))
            names, _ = _v1_order(cfg)
            for name in names:
                _write_floats(f, tensors[name])
        if not cfg.tie_embeddings:
            _write_floats(f, tensors["output.weight"])

    atomic_write(path, write)


# ---------------------------------------------------------------- llama2.c .pt

LLAMA2C_MODEL_ARGS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of",
                      "norm_eps", "max_seq_len", "dropout"}


def _read_llama2c_pt(path, obj):
    args, state = obj["model_args"], obj["model"]
    if not isinstance(args, dict) or not isinstance(state, dict) or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model_args' must be a dict and 'model' a dict of tensors")
    unknown = set(args) - LLAMA2C_MODEL_ARGS
    if unknown:
        raise CheckpointError(f"{path}: unexpected model_args {sorted(unknown)}; llama2.c's are {sorted(LLAMA2C_MODEL_ARGS)}")
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # saved from a compiled model
    w1 = state.get("layers.0.feed_forward.w1.weight")
    values = {k: v for k, v in args.items() if k != "dropout" and v is not None}
    if w1 is not None:
        values["hidden_dim"] = w1.shape[0]
    output, embedding = state.get("output.weight"), state.get("tok_embeddings.weight")
    values["tie_embeddings"] = output is None or (embedding is not None and torch.equal(output, embedding))
    try:
        cfg = ModelConfig(**values).validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model_args {args} are not a valid model ({e})") from None
    return cfg, state


# ---------------------------------------------------------------- Hugging Face

def _hf_permute(w, n_heads):
    """Rows of each head from interleaved pairs (x0 y0 x1 y1 ...) to halves (x0 x1 ... y0 y1 ...)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_unpermute(w, n_heads):
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


HF_NAMES = {"attention_norm.weight": "input_layernorm.weight", "attention.wq.weight": "self_attn.q_proj.weight",
            "attention.wk.weight": "self_attn.k_proj.weight", "attention.wv.weight": "self_attn.v_proj.weight",
            "attention.wo.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
            "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
            "feed_forward.w3.weight": "mlp.up_proj.weight"}


def _hf_name(name):
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"model.layers.{i}.{HF_NAMES[rest]}"
    return {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}[name]


def export_hf(weights, out_dir, tokenizer_bytes=None):
    """A folder `LlamaForCausalLM.from_pretrained` loads: model.safetensors, config.json, the tokenizer."""
    from safetensors.torch import save_file

    cfg = weights.config
    tensors = to_llama2c(weights.state, cfg)
    if cfg.tie_embeddings:
        tensors.pop("output.weight")
    out = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu", torch.float32)
        if name.endswith("attention.wq.weight"):
            t = _hf_permute(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = _hf_permute(t, cfg.n_kv_heads)
        out[_hf_name(name)] = t.contiguous()
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
    _write_json(os.path.join(out_dir, "config.json"), hf_config(cfg, bos, eos))


def hf_config(cfg, bos=1, eos=2):
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


def _read_hf(path):
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
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

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
    files = [inside(path, file, "a file of model.safetensors.index.json") for file in files]
    by_hf = {_hf_name(name): name for name in llama2c_shapes(cfg)}
    shapes = {}
    for file in files:  # the shapes first, from the headers: nothing is loaded for a wrong config
        try:
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    tensor = f.get_slice(k)
                    if tensor.get_dtype() not in ("F16", "BF16", "F32", "F64"):
                        raise CheckpointError(f"{file}: tensor {k} is {tensor.get_dtype()}; expected floating point")
                    shapes[by_hf.get(k, k)] = tuple(tensor.get_shape())
        except (SafetensorError, OSError) as e:  # a partial download, a damaged header
            raise CheckpointError(f"{file}: not a readable safetensors file, truncated or damaged ({e})") from None
    expected = llama2c_shapes(cfg)
    if cfg.tie_embeddings:
        expected.pop("output.weight")
        shapes.pop("output.weight", None)
    check_shapes(expected, shapes, cfg, path)
    hf_tensors = {}
    for file in files:
        try:
            hf_tensors.update(load_file(file))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file, truncated or damaged ({e})") from None
    tensors = {}
    for key, t in hf_tensors.items():
        name = by_hf.get(key, key)
        if name.endswith("attention.wq.weight"):
            t = _hf_unpermute(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = _hf_unpermute(t, cfg.n_kv_heads)
        tensors[name] = t
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        with open(os.path.join(path, "tokenizer.model"), "rb") as f:
            tokenizer = f.read()
    return cfg, tensors, tokenizer


# ---------------------------------------------------------------- tinyfuse checkpoints

TRAINING_KEYS = ("model", "model_config", "train_config", "optimizer", "loader", "rng", "step", "skipped_steps")
_CHECKPOINT_NAME = re.compile(r"ckpt_(\d+)\.pt")


def checkpoint_path(out, step):
    return os.path.join(out, f"ckpt_{step:06d}.pt")


def run_checkpoints(out):
    """A run folder's checkpoints, oldest first, ordered by step number (as text,
    ckpt_1000000.pt would sort before ckpt_999999.pt)."""
    if not os.path.isdir(out):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(out) if (m := _CHECKPOINT_NAME.fullmatch(name))]
    return [os.path.join(out, name) for _, name in sorted(found)]


def save_checkpoint(state, path):
    """Write a native checkpoint atomically (a full disk: one CheckpointError, the previous
    checkpoints kept, no temporary left)."""
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except FileError as e:
        raise CheckpointError(str(e)) from None


def _native_model(path, obj):
    """(config, model state dict) of a native checkpoint, shapes checked against the config."""
    try:
        cfg = ModelConfig.from_dict(obj["model_config"]).validate()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its model_config does not describe a model ({e})") from None
    state = obj.get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model' is not a dict of tensors")
    check_shapes(model_shapes(cfg), shapes_of(state), cfg, path)
    tokenizer = obj.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, bytes):
        raise CheckpointError(f"{path}: 'tokenizer' must be the bytes of a SentencePiece model")
    return cfg, state


def load_training_state(out):
    """The newest intact checkpoint of a run folder (a dict of TRAINING_KEYS and more) and the
    newer ones skipped on the way, as (path, why): a damaged newest file falls back to the one
    before it."""
    skipped = []
    for path in reversed(run_checkpoints(out)):
        try:
            obj = read_torch_file(path)
            if not isinstance(obj, dict) or obj.get("kind") != NATIVE_KIND:
                raise CheckpointError(f"{path}: not a tinyfuse checkpoint")
            absent = [k for k in TRAINING_KEYS if k not in obj]
            if absent:
                raise CheckpointError(f"{path}: no {', '.join(absent)}")
            _native_model(path, obj)
            return obj, skipped
        except CheckpointError as e:
            skipped.append((path, str(e)))
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {out}: " + "; ".join(why for _, why in skipped))
    raise FileNotFoundError(f"--resume: no checkpoint (ckpt_*.pt) in {out}")


# ---------------------------------------------------------------- any format

def load_checkpoint(path):
    """Weights from any supported format, recognised by content rather than by name. A run
    folder stands for its newest intact checkpoint, by the rule --resume follows
    (load_training_state): a damaged newest file falls back to the one before it, with a
    line on stderr for each one skipped."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")) and run_checkpoints(path):
        obj, skipped = load_training_state(path)
        for skipped_path, why in skipped:
            print(f"skipped {skipped_path}: {why}", file=sys.stderr)
        cfg, state = _native_model(path, obj)
        return Weights(cfg, state, obj.get("tokenizer"), "tinyfuse")
    if os.path.isdir(path):
        cfg, tensors, tokenizer = _read_hf(path)
        return Weights(cfg, from_llama2c(tensors, cfg, path), tokenizer, "hf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r}: no such file or folder")
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    # torch.save writes a zip archive, or (legacy) a pickle opening with protocol 2 and a long
    # integer; a v0 header starting with those bytes would need a dim in the millions.
    if head[:4] == b"PK\x03\x04" or head[:3] == b"\x80\x02\x8a":
        return _load_torch(path)
    if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == V1_MAGIC:
        cfg, tensors = _read_v1(path, head)
        return Weights(cfg, from_llama2c(tensors, cfg, path), None, "llama2c-v1")
    cfg, tensors = _read_v0(path, head)
    return Weights(cfg, from_llama2c(tensors, cfg, path), None, "llama2c-v0")


CONVERT_TRUSTED = ("if you trust the file, convert it once to tensors and plain data: python -c \"import torch; "
                   "o = torch.load('FILE', weights_only=False); torch.save(o, 'FILE.safe.pt')\" after removing "
                   "what is not a tensor, dict, list, number, string or bytes")


def read_torch_file(path):
    """torch.load(path) restricted to tensors and plain data: nothing in the file can run
    code. A file that needs any other object is refused, saying which."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(GLOBAL|global) ([\w.]+)", str(e))
        what = f"a {found.group(2)} object" if found else "objects other than tensors and plain data"
        raise CheckpointError(f"{path}: refused — it holds {what}, and loading that could run code; tinyfuse reads "
                              f"only tensors and plain data. {CONVERT_TRUSTED}") from None
    except Exception as e:  # torch raises several types for a damaged file
        raise CheckpointError(f"{path}: a PyTorch file that cannot be read, truncated or damaged "
                              f"({type(e).__name__}: {e})") from None


def _load_torch(path):
    obj = read_torch_file(path)
    if isinstance(obj, dict) and obj.get("kind") == NATIVE_KIND:
        cfg, state = _native_model(path, obj)
        return Weights(cfg, state, obj.get("tokenizer"), "tinyfuse")
    if isinstance(obj, dict) and "model_args" in obj and "model" in obj:
        cfg, state = _read_llama2c_pt(path, obj)
        return Weights(cfg, from_llama2c(state, cfg, path), None, "llama2c-pt")
    keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: a PyTorch file holding {keys}; expected a tinyfuse checkpoint "
                          "('kind': 'tinyfuse-checkpoint') or llama2.c's ('model_args' and 'model')")


def export(weights, path, fmt, tokenizer_bytes=None):
    if fmt == "llama2c-v0":
        export_llama2c(weights, path, version=0)
    elif fmt == "llama2c-v1":
        export_llama2c(weights, path, version=1)
    elif fmt == "hf":
        export_hf(weights, path, tokenizer_bytes)
    else:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")


def check_tokenizer(sp, cfg, source):
    """One error when a tokenizer cannot be the model's: the vocabulary sizes differ."""
    if sp.vocab_size() != cfg.vocab_size:
        raise CheckpointError(f"the tokenizer {source} has {sp.vocab_size()} tokens; the model's vocabulary has "
                              f"{cfg.vocab_size}: give the tokenizer the model was trained with")
