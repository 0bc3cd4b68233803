"""What every checkpoint format shares: `Weights` (a model's config, state dict and
tokenizer), the one error type, the shape check, and the name maps' machinery.

The model fuses wq/wk/wv into wqkv and w1/w3 into w13; the foreign formats (llama2.c,
Hugging Face) keep them apart and name every tensor their own way. So each foreign format
gives one table, the name it stores each role under (`{i}` a layer), and `name_map` turns
it into model name -> [(foreign name, shape)] in row order; `split_state` and `join_state`
go through that map both ways, the shapes checked before anything is joined.
"""
from dataclasses import dataclass

import torch

from .model import ModelConfig


class CheckpointError(ValueError):
    """A file that is not a checkpoint we can read, with what was found and what was expected."""


@dataclass
class Weights:
    config: ModelConfig
    state: dict  # the Transformer's state dict
    tokenizer: bytes | None  # a SentencePiece .model, when the checkpoint carries one
    format: str  # "tinyfuse", "llama2c-v0", "llama2c-v1", "llama2c-pt" or "hf"


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


# The model's tensors (state-dict names, `{i}` a layer) and the roles stacked along their
# rows, in order: what a foreign format stores as separate tensors. "output.weight" exists
# only with untied embeddings.
MODEL_TENSORS = {
    "tok_embeddings.weight": ("embedding",),
    "layers.{i}.attention_norm": ("attention_norm",),
    "layers.{i}.attention.wqkv.weight": ("wq", "wk", "wv"),
    "layers.{i}.attention.wo.weight": ("wo",),
    "layers.{i}.ffn_norm": ("ffn_norm",),
    "layers.{i}.feed_forward.w13.weight": ("w1", "w3"),
    "layers.{i}.feed_forward.w2.weight": ("w2",),
    "norm": ("norm",),
    "output.weight": ("output",),
}
LAYER_ROLES = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")


def role_shapes(cfg):
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"embedding": (cfg.vocab_size, cfg.dim), "attention_norm": (cfg.dim,), "wq": (q, cfg.dim),
            "wk": (kv, cfg.dim), "wv": (kv, cfg.dim), "wo": (cfg.dim, q), "ffn_norm": (cfg.dim,),
            "w1": (cfg.hidden_dim, cfg.dim), "w2": (cfg.dim, cfg.hidden_dim), "w3": (cfg.hidden_dim, cfg.dim),
            "norm": (cfg.dim,), "output": (cfg.vocab_size, cfg.dim)}


def foreign_names(cfg, names, roles):
    """The foreign names of `roles` in the order given, a per-layer role once for every layer."""
    return [names[role].format(i=i) for role in roles
            for i in (range(cfg.n_layers) if role in LAYER_ROLES else (None,))]


def name_map(cfg, names):
    """Model state-dict name -> [(foreign name, shape)] in row order, for a format that
    stores each role under names[role] (`{i}` the layer)."""
    shapes = role_shapes(cfg)
    out = {}
    for model_name, roles in MODEL_TENSORS.items():
        if model_name == "output.weight" and cfg.tie_embeddings:
            continue
        for i in range(cfg.n_layers) if "{i}" in model_name else (None,):
            out[model_name.format(i=i)] = [(names[role].format(i=i), shapes[role]) for role in roles]
    return out


def foreign_shapes(mapping):
    """Foreign name -> shape, in the map's order."""
    return {name: shape for parts in mapping.values() for name, shape in parts}


def split_state(state, mapping):
    """The model's state dict as the foreign format's tensors (views of the model's)."""
    out = {}
    for model_name, parts in mapping.items():
        pieces = state[model_name].split([shape[0] for _, shape in parts])
        out.update((name, piece) for (name, _), piece in zip(parts, pieces))
    return out


def join_state(tensors, mapping, cfg, source):
    """The model's state dict (float32) from the foreign format's tensors; missing,
    unexpected or misshapen tensors are one error naming them."""
    check_shapes(foreign_shapes(mapping), shapes_of(tensors), cfg, source)

    def joined(parts):  # a lone part is not copied when it is float32 and contiguous already
        pieces = [tensors[name].float() for name, _ in parts]
        return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces)
    return {model_name: joined(parts) for model_name, parts in mapping.items()}
