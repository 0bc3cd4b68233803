"""The prepared-data format: a folder of raw token shards and the `manifest.json` that
describes them. Everything that reads or writes such a folder (prepare, the loader, eval,
the benchmarks, the tests) goes through here.

A folder holds `train_NNN.bin` / `val_NNN.bin` (little-endian uint16 tokens, uint32 for
vocabularies over 65535; each story is BOS followed by its tokens, as llama2.c writes them),
the `tokenizer.model` they were encoded with, and `manifest.json`:

    {"format": "tinyfuse-shards/1",
     "tokenizer": {"path": "tokenizer.model", "source": ..., "sha256": ...},
     "vocab_size": int, "bos_id": int, "eos_id": int, "dtype": "uint16" | "uint32",
     "shards": [{"file": "train_000.bin", "split": "train", "tokens": int, "stories": int}, ...]}

Every path in a manifest is relative and must resolve inside its folder: a manifest is
input like any other, and may not point the tool at files elsewhere.
"""
import hashlib
import json
import os

import numpy as np

from .files import FileError, atomic_write, inside

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
FORMAT = "tinyfuse-shards/1"
SPLITS = ("train", "val")


class DataError(ValueError):
    """A prepared folder or a corpus that cannot be used, with what was found and expected."""


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_prepared(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


# ---------------------------------------------------------------- writing

def write_shards(encoded, out_dir, split, shard_tokens):
    """Concatenate story arrays into shards of at most ~shard_tokens (whole stories only);
    returns their manifest entries."""
    shards, pending, pending_tokens, pending_stories = [], [], 0, 0

    def flush():
        name = f"{split}_{len(shards):03d}.bin"
        data = np.concatenate(pending) if pending else np.zeros(0, np.uint16)
        data.astype(data.dtype.newbyteorder("<"), copy=False).tofile(os.path.join(out_dir, name))
        shards.append({"file": name, "split": split, "tokens": int(data.size), "stories": pending_stories})

    for ids in encoded:
        if pending and pending_tokens + ids.size > shard_tokens:
            flush()
            pending, pending_tokens, pending_stories = [], 0, 0
        pending.append(ids)
        pending_tokens += ids.size
        pending_stories += 1
    if pending:
        flush()
    return shards


def write_manifest(out_dir, shards, vocab_size, bos_id, eos_id, tokenizer_source, tokenizer=TOKENIZER):
    """manifest.json for the shards (entries from write_shards), written last and atomically:
    a folder with a manifest is complete. `tokenizer` is the tokenizer's file in out_dir, or
    None for a folder without one (benchmarks)."""
    tok_path = os.path.join(out_dir, tokenizer) if tokenizer else None
    manifest = {
        "format": FORMAT,
        "tokenizer": {"path": tokenizer or "", "source": tokenizer_source,
                      "sha256": sha256_file(tok_path) if tok_path and os.path.isfile(tok_path) else ""},
        "vocab_size": vocab_size,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "dtype": np.dtype(token_dtype(vocab_size)).name,
        "shards": shards,
    }
    atomic_write(os.path.join(out_dir, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1) + "\n"), "w")
    return manifest


# ---------------------------------------------------------------- reading

def read_manifest(data_dir):
    """The folder's manifest, checked: every field of the right kind, every path inside the
    folder. Anything else is one DataError naming the entry."""
    path = os.path.join(data_dir, MANIFEST)
    if os.path.isfile(data_dir):  # a corpus given where a prepared folder belongs
        stem = os.path.splitext(os.path.basename(data_dir))[0] or "corpus"
        raise FileNotFoundError(
            f"{data_dir!r} is a file, not a prepared folder; tokenize it first: "
            f"`tinyfuse prepare --source {data_dir} --out data/{stem}`, then train with --data data/{stem}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{data_dir!r} holds no prepared data ({MANIFEST} is missing); "
            f"make it with `tinyfuse prepare --out {data_dir}`"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object; got {type(manifest).__name__}")
    for key in ("format", "tokenizer", "vocab_size", "bos_id", "dtype", "shards"):
        if key not in manifest:
            raise DataError(f"{path}: no {key!r} field; re-run `tinyfuse prepare`")
    if manifest["format"] != FORMAT:
        raise DataError(f"{path}: format {manifest['format']!r}, expected {FORMAT!r}")
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype {manifest['dtype']!r}, expected uint16 or uint32")
    for key in ("vocab_size", "bos_id"):
        if not isinstance(manifest[key], int) or isinstance(manifest[key], bool) or manifest[key] < 0:
            raise DataError(f"{path}: {key} must be a non-negative integer; got {manifest[key]!r}")
    if manifest["vocab_size"] == 0 or np.dtype(token_dtype(manifest["vocab_size"])).name != manifest["dtype"]:
        raise DataError(f"{path}: dtype {manifest['dtype']} does not fit a vocabulary of {manifest['vocab_size']}")
    tok = manifest["tokenizer"]
    if not isinstance(tok, dict) or not isinstance(tok.get("path", ""), str) or not isinstance(tok.get("sha256", ""), str):
        raise DataError(f"{path}: 'tokenizer' must be an object with a 'path' and a 'sha256' string")
    if tok.get("path"):
        _inside(data_dir, tok["path"], path, "tokenizer.path")
    if not isinstance(manifest["shards"], list):
        raise DataError(f"{path}: 'shards' must be a list")
    for i, shard in enumerate(manifest["shards"]):
        where = f"shards[{i}]"
        if not isinstance(shard, dict) or not isinstance(shard.get("file"), str):
            raise DataError(f"{path}: {where} must be an object with a 'file'; got {shard!r}")
        if shard.get("split") not in SPLITS:
            raise DataError(f"{path}: {where}.split must be one of {', '.join(SPLITS)}; got {shard.get('split')!r}")
        if not isinstance(shard.get("tokens"), int) or isinstance(shard.get("tokens"), bool) or shard["tokens"] < 0:
            raise DataError(f"{path}: {where}.tokens must be a non-negative integer; got {shard.get('tokens')!r}")
        _inside(data_dir, shard["file"], path, f"{where}.file")
    return manifest


def _inside(data_dir, relative, manifest_path, entry):
    try:
        return inside(data_dir, relative, f"{manifest_path}: {entry}")
    except FileError as e:
        raise DataError(str(e)) from None


def tokenizer_path(data_dir, manifest):
    """The tokenizer file a manifest names (inside the folder), or None when it names none."""
    relative = manifest["tokenizer"].get("path")
    return _inside(data_dir, relative, os.path.join(data_dir, MANIFEST), "tokenizer.path") if relative else None


def split_shards(data_dir, split, manifest=None):
    """Paths and token counts of a split's shards, checked against the files on disk."""
    manifest = manifest or read_manifest(data_dir)
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    paths, counts = [], []
    for i, shard in enumerate(manifest["shards"]):
        if shard["split"] != split:
            continue
        path = _inside(data_dir, shard["file"], os.path.join(data_dir, MANIFEST), f"shards[{i}].file")
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise FileNotFoundError(f"shard {path} is missing or unreadable; re-run `tinyfuse prepare`")
        size = os.path.getsize(path)
        if size != shard["tokens"] * itemsize:  # the rules of `tinyfuse prepare --verify`
            raise DataError(f"shard {path} has {size} bytes; {MANIFEST} records {shard['tokens']} {manifest['dtype']} "
                            f"tokens = {shard['tokens'] * itemsize} bytes (truncated or replaced?); re-run "
                            "`tinyfuse prepare`")
        paths.append(path)
        counts.append(size // itemsize)
    if not paths:
        raise DataError(f"{data_dir}: no {split} shards in {MANIFEST}")
    return paths, counts


def check_token_range(data_dir, splits, manifest, vocab):
    """Every token of these splits' shards below `vocab` (what training and evaluation
    index an embedding with); a DataError naming the shard otherwise."""
    for split in splits:
        for path in split_shards(data_dir, split, manifest)[0]:
            top = max_token(path, manifest["dtype"])
            if top >= vocab:
                raise DataError(f"{path} holds token {top}, not below the vocabulary size {vocab} (manifest "
                                f"{manifest['vocab_size']}): the manifest does not describe these shards, or the "
                                "model is not theirs; re-run tinyfuse prepare")


def max_token(path, dtype):
    """The largest token of a shard, read in 16M-token blocks (0 for an empty shard)."""
    dtype = np.dtype(dtype).newbyteorder("<")
    if os.path.getsize(path) == 0:
        return 0
    tokens = np.memmap(path, dtype=dtype, mode="r")
    return max(int(tokens[start:start + (1 << 24)].max()) for start in range(0, tokens.size, 1 << 24))


def verify(data_dir):
    """Re-read a prepared folder; returns the problems found (empty when it is sound)."""
    try:
        manifest = read_manifest(data_dir)
    except (FileNotFoundError, DataError) as e:
        return [str(e)]
    problems = []
    tok_path = tokenizer_path(data_dir, manifest)
    if tok_path is None or not os.path.isfile(tok_path):
        problems.append(f"tokenizer {tok_path or '(none named)'} is missing")
    elif sha256_file(tok_path) != manifest["tokenizer"]["sha256"]:
        problems.append(f"tokenizer {tok_path}: sha256 differs from the manifest's")
    dtype, vocab = np.dtype(manifest["dtype"]), manifest["vocab_size"]
    for split in SPLITS:
        if not any(s["split"] == split for s in manifest["shards"]):
            problems.append(f"no {split} shards")
        elif not any(s["tokens"] for s in manifest["shards"] if s["split"] == split):
            problems.append(f"the {split} shards hold no tokens (training and evaluation refuse such a split)")
    for shard in manifest["shards"]:
        path = os.path.join(data_dir, shard["file"])
        if not os.path.isfile(path):
            problems.append(f"{shard['file']}: missing")
            continue
        size = os.path.getsize(path)
        if size != shard["tokens"] * dtype.itemsize:
            problems.append(f"{shard['file']}: {size} bytes, expected {shard['tokens']} {dtype.name} tokens "
                            f"= {shard['tokens'] * dtype.itemsize} bytes")
            continue
        top = max_token(path, dtype)
        if top >= vocab:
            problems.append(f"{shard['file']}: token {top} is not below the vocabulary size {vocab}")
        if size and np.fromfile(path, dtype=dtype.newbyteorder("<"), count=1)[0] != manifest["bos_id"]:
            problems.append(f"{shard['file']}: does not start with BOS ({manifest['bos_id']})")
    return problems
