"""tinyfuse's own checkpoint format, and the one door to every format: `load_checkpoint`
tells them apart by content (a native checkpoint or run folder, llama2.c's `.bin` v0/v1
and `.pt`, a Hugging Face Llama folder), so every command that takes `--checkpoint` reads
them all; `export` writes the foreign ones. The foreign formats live in their own modules
(`llama2c`, `hf_checkpoint`), what they share in `weights`. `save_checkpoint` writes the
native format (atomically), `load_training_state` reads it back for `--resume`,
`run_checkpoints` lists a run folder's by step.

Loading never runs code. PyTorch files are read with `torch.load(weights_only=True)`: only
tensors and plain data (dicts, lists, tuples, numbers, strings, bytes) come back, and a file
holding any other object is refused. A tinyfuse checkpoint holds exactly that: the tokenizer
as bytes, the RNG states as tensors and numbers, the configurations as dicts.
"""
import os
import pickle
import re
import struct
import sys

import torch

from . import hf_checkpoint, llama2c
from .files import FileError, atomic_write
from .model import ModelConfig
from .weights import CheckpointError, Weights, check_shapes, model_shapes, shapes_of

NATIVE_KIND = "tinyfuse-checkpoint"
FORMATS = ("llama2c-v0", "llama2c-v1", "hf")


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
        return Weights(*hf_checkpoint.read(path), "hf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r}: no such file or folder")
    with open(path, "rb") as f:
        head = f.read(llama2c.V1_HEADER_BYTES)
    # torch.save writes a zip archive, or (legacy) a pickle opening with protocol 2 and a long
    # integer; a v0 header starting with those bytes would need a dim in the millions.
    if head[:4] == b"PK\x03\x04" or head[:3] == b"\x80\x02\x8a":
        return _load_torch(path)
    if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == llama2c.V1_MAGIC:
        return Weights(*llama2c.read_v1(path, head), None, "llama2c-v1")
    return Weights(*llama2c.read_v0(path, head), None, "llama2c-v0")


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
        return Weights(*llama2c.read_pt(path, obj), None, "llama2c-pt")
    keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: a PyTorch file holding {keys}; expected a tinyfuse checkpoint "
                          "('kind': 'tinyfuse-checkpoint') or llama2.c's ('model_args' and 'model')")


def export(weights, path, fmt, tokenizer_bytes=None):
    if fmt == "llama2c-v0":
        llama2c.export(weights, path, version=0)
    elif fmt == "llama2c-v1":
        llama2c.export(weights, path, version=1)
    elif fmt == "hf":
        hf_checkpoint.export(weights, path, tokenizer_bytes)
    else:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")


def check_tokenizer(sp, cfg, source):
    """One error when a tokenizer cannot be the model's: the vocabulary sizes differ."""
    if sp.vocab_size() != cfg.vocab_size:
        raise CheckpointError(f"the tokenizer {source} has {sp.vocab_size()} tokens; the model's vocabulary has "
                              f"{cfg.vocab_size}: give the tokenizer the model was trained with")
