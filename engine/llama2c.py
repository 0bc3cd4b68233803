"""llama2.c's checkpoints: the `.bin` its run.c reads (the legacy v0 and v1, float32) and
the `.pt` its train.py writes. Sizes read from a header are checked against the file
before anything is allocated, and a header cannot ask for more than `ModelConfig.validate`
allows. A `.pt` comes here already read with weights_only=True (checkpoint.read_torch_file).
"""
import math
import os
import struct

import numpy as np
import torch

from .files import atomic_write
from .model import ModelConfig
from .weights import CheckpointError, foreign_names, foreign_shapes, join_state, name_map, split_state

V1_MAGIC = 0x616B3432  # "ak42" as llama2.c writes it: little-endian uint32
V1_HEADER_BYTES = 256

# The name llama2.c gives each role (`{i}` a layer): its model.py's state-dict names.
NAMES = {"embedding": "tok_embeddings.weight", "attention_norm": "layers.{i}.attention_norm.weight",
         "wq": "layers.{i}.attention.wq.weight", "wk": "layers.{i}.attention.wk.weight",
         "wv": "layers.{i}.attention.wv.weight", "wo": "layers.{i}.attention.wo.weight",
         "ffn_norm": "layers.{i}.ffn_norm.weight", "w1": "layers.{i}.feed_forward.w1.weight",
         "w2": "layers.{i}.feed_forward.w2.weight", "w3": "layers.{i}.feed_forward.w3.weight",
         "norm": "norm.weight", "output": "output.weight"}
# The order each .bin version writes the roles in (a per-layer role for every layer in
# turn); an untied output comes last in both, after v0's RoPE tables.
V0_ORDER = ("embedding", "attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm")
V1_ORDER = ("attention_norm", "ffn_norm", "norm", "embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _header_config(source, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len, tied):
    values = dict(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                  vocab_size=vocab_size, max_seq_len=max_seq_len)
    try:
        return ModelConfig(**values, tie_embeddings=tied).validate()
    except ValueError as e:
        shown = ", ".join(f"{k} {v}" for k, v in values.items())
        raise CheckpointError(f"{source}: the header ({shown}) is not a valid model ({e})") from None


def _file_layout(cfg, order):
    """[(name, shape)] of a .bin's tensors in the file's order, the untied output last."""
    shapes = foreign_shapes(name_map(cfg, NAMES))
    names = foreign_names(cfg, NAMES, order) + ([] if cfg.tie_embeddings else [NAMES["output"]])
    return [(name, shapes[name]) for name in names]


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


def read_v0(path, head):
    """(config, model state dict) of a legacy v0 .bin, whose first bytes are `head`."""
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
    layout = _file_layout(cfg, V0_ORDER)
    at = len(foreign_names(cfg, NAMES, V0_ORDER))
    layout.insert(at, (None, (_rope_floats(cfg),)))  # the RoPE tables, skipped
    tensors = _read_floats(path, 28, layout, f"llama2.c v0 file with this header (dim {dim}, hidden {hidden_dim}, "
                                             f"{n_layers} layers, vocab {vocab}, seq {max_seq_len})")
    return cfg, join_state(tensors, name_map(cfg, NAMES), cfg, path)


def read_v1(path, head):
    """(config, model state dict) of a v1 .bin, whose first bytes are `head`."""
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
    tensors = _read_floats(path, V1_HEADER_BYTES, _file_layout(cfg, V1_ORDER),
                           f"llama2.c v1 file with this header {dims}")
    return cfg, join_state(tensors, name_map(cfg, NAMES), cfg, path)


def _write_floats(f, tensor):
    f.write(tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes())


def export(weights, path, version=0):
    """A llama2.c `.bin` run.c reads: version 0 (legacy: header, weights, RoPE tables) or 1."""
    from tinyfuse.kernels.rope import rope_tables

    if version not in (0, 1):
        raise ValueError(f"llama2.c version must be 0 or 1; got {version}")
    cfg = weights.config
    tensors = split_state(weights.state, name_map(cfg, NAMES))
    dims = (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)
    order = V0_ORDER if version == 0 else V1_ORDER

    def write(f):
        if version == 0:
            vocab = cfg.vocab_size if cfg.tie_embeddings else -cfg.vocab_size
            f.write(struct.pack("<7i", *dims, vocab, cfg.max_seq_len))
        else:
            f.write(struct.pack("<Ii", V1_MAGIC, 1))
            f.write(struct.pack("<7i", *dims, cfg.vocab_size, cfg.max_seq_len))
            f.write(struct.pack("<B", int(cfg.tie_embeddings)))
            f.write(b"\0" * (V1_HEADER_BYTES - f.tell()))
        for name in foreign_names(cfg, NAMES, order):
            _write_floats(f, tensors[name])
        if version == 0:
            # The tables run.c's ancestors read; llama2.c computes them in float32 on the CPU.
            cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, theta=cfg.rope_theta, device="cpu")
            _write_floats(f, cos)
            _write_floats(f, sin)
        if not cfg.tie_embeddings:
            _write_floats(f, tensors[NAMES["output"]])

    atomic_write(path, write)


MODEL_ARGS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of", "norm_eps",
              "max_seq_len", "dropout"}


def read_pt(path, obj):
    """(config, model state dict) of llama2.c's train.py checkpoint, read already (a dict
    with 'model_args' and 'model')."""
    args, state = obj["model_args"], obj["model"]
    if not isinstance(args, dict) or not isinstance(state, dict) or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model_args' must be a dict and 'model' a dict of tensors")
    unknown = set(args) - MODEL_ARGS
    if unknown:
        raise CheckpointError(f"{path}: unexpected model_args {sorted(unknown)}; llama2.c's are {sorted(MODEL_ARGS)}")
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
    if cfg.tie_embeddings:  # train.py saves the tied output beside the embedding it equals
        state.pop("output.weight", None)
    return cfg, join_state(state, name_map(cfg, NAMES), cfg, path)
