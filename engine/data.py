"""`tinyfuse prepare`: corpus -> SentencePiece tokenizer -> shards of raw tokens.

A prepared folder holds `train_NNN.bin` / `val_NNN.bin` (little-endian uint16 tokens, uint32
for vocabularies over 65535; each story is BOS followed by its tokens, as llama2.c writes
them), the `tokenizer.model` they were encoded with, and `manifest.json` describing both.
The same input gives byte-identical output.
"""
import glob
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request

import numpy as np

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
FORMAT = "tinyfuse-shards/1"
SPLITS = ("train", "val")
STORY_SEPARATOR = "<|endoftext|>"

HUB_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
TINYSTORIES_FILES = {
    "json": {"train": "TinyStories_all_data.tar.gz"},
    "v2": {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"},
}
DEFAULT_SHARD_TOKENS = 1 << 26  # 128 MB of uint16 per shard


class DataError(ValueError):
    """A prepared folder or a corpus that cannot be used, with what was found and expected."""


def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tinyfuse")


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _progress(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, disable=kwargs.pop("quiet", False) or None, **kwargs)


# ---------------------------------------------------------------- reading corpora

def read_text_stories(path):
    """Stories of a text file: separated by <|endoftext|>, or by blank lines when it has none."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    parts = text.split(STORY_SEPARATOR) if STORY_SEPARATOR in text else re.split(r"\n\s*\n", text)
    return [p.strip() for p in parts if p.strip()]


def read_json_stories(path):
    with open(path, encoding="utf-8") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("story"), str) for i in items):
        raise DataError(f"{path}: expected a JSON list of objects with a \"story\" string")
    return [i["story"].strip() for i in items if i["story"].strip()]


def read_stories(path):
    """Stories from a .txt or .json file, or from every such file of a folder (sorted by name)."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.json")) + glob.glob(os.path.join(path, "*.txt")))
        if not files:
            raise DataError(f"{path}: a folder with no .json or .txt files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"source {path!r}: no such file or folder (sources: synthetic, tinystories, or a path)")
    stories = []
    for file in files:
        stories += read_json_stories(file) if file.endswith(".json") else read_text_stories(file)
    if not stories:
        raise DataError(f"{path}: no stories found")
    return stories


# ---------------------------------------------------------------- download

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _remote_info(url):
    """(size, sha256) announced by the server, either may be None. The hub puts them on its
    redirect (X-Linked-Size, X-Linked-Etag); a plain server in Content-Length and ETag."""
    if not url.startswith(("http://", "https://")):
        return None, None
    request = urllib.request.Request(url, method="HEAD")
    try:
        response = urllib.request.build_opener(_NoRedirect).open(request, timeout=60)
        headers = response.headers
    except urllib.error.HTTPError as e:  # a redirect left unfollowed arrives as an "error"
        if e.code not in (301, 302, 303, 307, 308):
            raise DataError(f"{url}: the server answered {e.code} {e.reason}") from None
        headers = e.headers
    size = headers.get("X-Linked-Size") or headers.get("Content-Length")
    etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").removeprefix("W/").strip('"')
    sha = etag.lower() if re.fullmatch(r"[0-9a-fA-F]{64}", etag) else None
    return (int(size) if size else None), sha


def download(url, dest, quiet=False):
    """Fetch url to dest, resuming a partial `dest.part`; check the size and, when the server
    gives one, the sha256 before the file takes its final name."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    size, sha = _remote_info(url)
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if size is not None and have > size:
        os.remove(part)
        have = 0
    if size is None or have < size:
        request = urllib.request.Request(url)
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = urllib.request.urlopen(request, timeout=60)
        except urllib.error.URLError as e:
            raise DataError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None
        if have and getattr(response, "status", 200) != 206:
            have = 0  # the server ignored the range: start over
        if size is None and response.headers.get("Content-Length"):
            size = have + int(response.headers["Content-Length"])
        name = os.path.basename(dest)
        with response, open(part, "ab" if have else "wb") as f, _progress(
            total=size, initial=have, unit="B", unit_scale=True, desc=f"download {name}", quiet=quiet
        ) as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
                bar.update(len(block))
    got = os.path.getsize(part)
    if size is not None and got != size:
        raise DataError(f"download of {url} stopped at {got} of {size} bytes; run the command again to resume")
    if sha is not None:
        actual = sha256_file(part)
        if actual != sha:
            os.remove(part)
            raise DataError(f"{url}: sha256 {actual} differs from the server's {sha}; the download was removed, run again")
    os.replace(part, dest)
    return dest


def tinystories(fmt="json", cache_dir=None, hub_url=HUB_URL, quiet=False):
    """Download (once) and read TinyStories: {"train": stories, "val": stories or None}.
    The original archive of JSON shards has no val split of its own; V2 has one."""
    if fmt not in TINYSTORIES_FILES:
        raise DataError(f"--tinystories-format {fmt!r}: expected one of {', '.join(TINYSTORIES_FILES)}")
    cache_dir = os.path.join(cache_dir or default_cache_dir(), "tinystories")
    splits = {"val": None}
    for split, name in TINYSTORIES_FILES[fmt].items():
        path = download(f"{hub_url.rstrip('/')}/{name}", os.path.join(cache_dir, name), quiet=quiet)
        if name.endswith(".tar.gz"):
            folder = path[: -len(".tar.gz")]
            if not os.path.isdir(folder):
                tmp = folder + ".extracting"
                shutil.rmtree(tmp, ignore_errors=True)
                with tarfile.open(path) as tar:
                    tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
                os.replace(tmp, folder)
            path = folder
        splits[split] = read_stories(path)
    return splits


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(stories, vocab_size, out_path, workers, seed=0, max_sentences=1_000_000):
    """A SentencePiece BPE model with llama2.c's settings (byte fallback, split digits,
    identity normalisation, character coverage 1.0)."""
    import sentencepiece as spm

    # Lines, as llama2.c's tokenizer saw them; from memory, so the model records no file path.
    lines = (line for story in stories for line in story.splitlines() if line.strip())
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, model_type="bpe", vocab_size=vocab_size,
            character_coverage=1.0, num_threads=workers, split_digits=True, allow_whitespace_only_pieces=True,
            byte_fallback=True, unk_surface=r" \342\201\207 ", normalization_rule_name="identity",
            input_sentence_size=max_sentences, shuffle_input_sentence=True, minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"SentencePiece could not train a {vocab_size}-token vocabulary on this corpus: {e}") from None
    with open(out_path, "wb") as f:
        f.write(model.getvalue())
    return out_path


def load_tokenizer(path):
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise DataError(f"tokenizer {path!r}: no such file (expected a SentencePiece .model)")
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise DataError(f"tokenizer {path!r}: not a SentencePiece model ({e})") from None


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


# ---------------------------------------------------------------- pretokenization

def encode_stories(sp, stories, workers, desc="tokenize", quiet=False, chunk=8192):
    """Token arrays (BOS + tokens, the shard dtype) for the stories, in order, on `workers` threads."""
    dtype = token_dtype(sp.vocab_size())
    bos = sp.bos_id()
    out = []
    with _progress(total=len(stories), unit="story", desc=desc, quiet=quiet) as bar:
        for start in range(0, len(stories), chunk):
            batch = stories[start:start + chunk]
            for ids in sp.encode(batch, num_threads=workers):
                out.append(np.array([bos, *ids], dtype=dtype))
            bar.update(len(batch))
    return out


def write_shards(encoded, out_dir, split, shard_tokens):
    """Concatenate story arrays into shards of at most ~shard_tokens (whole stories only)."""
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


def split_stories(stories, val_fraction, seed):
    """A seeded choice of val stories; each split keeps the corpus order."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: expected a fraction in [0, 1)")
    n_val = int(round(val_fraction * len(stories)))
    if val_fraction > 0 and len(stories) > 1:
        n_val = min(max(n_val, 1), len(stories) - 1)
    chosen = np.zeros(len(stories), dtype=bool)
    chosen[np.random.default_rng(seed).permutation(len(stories))[:n_val]] = True
    return [s for s, v in zip(stories, chosen) if not v], [s for s, v in zip(stories, chosen) if v]


def prepare(source="synthetic", out_dir=None, tokenizer=None, vocab_size=None, val_fraction=0.01,
            workers=None, seed=0, stories=100_000, tinystories_format="json", hub_url=HUB_URL,
            cache_dir=None, shard_tokens=DEFAULT_SHARD_TOKENS, quiet=False):
    """Prepare a folder of shards from a source; returns the manifest.

    `stories` is the synthetic corpus's size and a cap on the other sources (None: all)."""
    from . import synthetic

    if out_dir is None:
        raise DataError("--out: a folder for the shards is needed")
    if tokenizer is not None and vocab_size is not None:
        raise DataError("give --tokenizer or --vocab-size, not both")
    if vocab_size is not None and vocab_size < 260:
        raise DataError(f"--vocab-size {vocab_size}: byte fallback needs at least 260 tokens (256 bytes + specials)")
    if shard_tokens <= 0:
        raise DataError(f"--shard-tokens {shard_tokens}: expected a positive count")
    workers = workers or os.cpu_count() or 1
    if source == "synthetic":
        corpus = {"train": synthetic.stories(seed, stories), "val": None}
    elif source == "tinystories":
        corpus = tinystories(tinystories_format, cache_dir, hub_url, quiet=quiet)
    else:
        corpus = {"train": read_stories(source), "val": None}
    if stories is not None and source != "synthetic":
        corpus = {k: (v[:stories] if v is not None else None) for k, v in corpus.items()}
    if corpus["val"] is None:
        corpus["train"], corpus["val"] = split_stories(corpus["train"], val_fraction, seed)

    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "*.bin")) + [os.path.join(out_dir, MANIFEST)]:
        if os.path.exists(old):
            os.remove(old)
    tok_path = os.path.join(out_dir, TOKENIZER)
    if tokenizer is None:
        if not quiet:
            print(f"training a {vocab_size or 512}-token SentencePiece BPE tokenizer on {len(corpus['train'])} stories")
        train_tokenizer(corpus["train"], vocab_size or 512, tok_path, workers, seed)
    elif os.path.abspath(tokenizer) != os.path.abspath(tok_path):
        load_tokenizer(tokenizer)
        shutil.copyfile(tokenizer, tok_path)
    sp = load_tokenizer(tok_path)

    shards = []
    for split in SPLITS:
        encoded = encode_stories(sp, corpus[split], workers, desc=f"tokenize {split}", quiet=quiet)
        shards += write_shards(encoded, out_dir, split, shard_tokens)
    manifest = {
        "format": FORMAT,
        "tokenizer": {"path": TOKENIZER, "source": tokenizer or "trained", "sha256": sha256_file(tok_path)},
        "vocab_size": sp.vocab_size(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "dtype": np.dtype(token_dtype(sp.vocab_size())).name,
        "shards": shards,
    }
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, MANIFEST))  # last: a folder with a manifest is complete
    return manifest


# ---------------------------------------------------------------- reading prepared folders

def read_manifest(data_dir):
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{data_dir!r} holds no prepared data ({MANIFEST} is missing); "
            f"make it with `tinyfuse prepare --out {data_dir}`"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    for key in ("format", "tokenizer", "vocab_size", "bos_id", "dtype", "shards"):
        if key not in manifest:
            raise DataError(f"{path}: no {key!r} field; re-run `tinyfuse prepare`")
    if manifest["format"] != FORMAT:
        raise DataError(f"{path}: format {manifest['format']!r}, expected {FORMAT!r}")
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype {manifest['dtype']!r}, expected uint16 or uint32")
    return manifest


def split_shards(data_dir, split, manifest=None):
    """Paths and token counts of a split's shards, checked against the files on disk."""
    manifest = manifest or read_manifest(data_dir)
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    paths, counts = [], []
    for shard in manifest["shards"]:
        if shard["split"] != split:
            continue
        path = os.path.join(data_dir, shard["file"])
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise FileNotFoundError(f"shard {path} is missing or unreadable; re-run `tinyfuse prepare`")
        size = os.path.getsize(path)
        if size % itemsize:
            raise DataError(f"shard {path} has {size} bytes, not a multiple of the {itemsize}-byte {manifest['dtype']} token")
        paths.append(path)
        counts.append(size // itemsize)
    if not paths:
        raise DataError(f"{data_dir}: no {split} shards in {MANIFEST}")
    return paths, counts


def verify(data_dir, quiet=False):
    """Re-read a prepared folder; returns the problems found (empty when it is sound)."""
    try:
        manifest = read_manifest(data_dir)
    except (FileNotFoundError, DataError) as e:
        return [str(e)]
    problems = []
    tok_path = os.path.join(data_dir, manifest["tokenizer"]["path"])
    if not os.path.isfile(tok_path):
        problems.append(f"tokenizer {tok_path} is missing")
    elif sha256_file(tok_path) != manifest["tokenizer"]["sha256"]:
        problems.append(f"tokenizer {tok_path}: sha256 differs from the manifest's")
    dtype, vocab = np.dtype(manifest["dtype"]), manifest["vocab_size"]
    if np.dtype(token_dtype(vocab)) != dtype:
        problems.append(f"dtype {dtype.name} does not match a {vocab}-token vocabulary")
    for split in SPLITS:
        if not any(s["split"] == split for s in manifest["shards"]):
            problems.append(f"no {split} shards")
    with _progress(total=len(manifest["shards"]), unit="shard", desc="verify", quiet=quiet) as bar:
        for shard in manifest["shards"]:
            path = os.path.join(data_dir, shard["file"])
            bar.update(1)
            if not os.path.isfile(path):
                problems.append(f"{shard['file']}: missing")
                continue
            size = os.path.getsize(path)
            if size != shard["tokens"] * dtype.itemsize:
                problems.append(f"{shard['file']}: {size} bytes, expected {shard['tokens']} {dtype.name} tokens "
                                f"= {shard['tokens'] * dtype.itemsize} bytes")
                continue
            tokens = np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r") if size else np.zeros(0, dtype)
            for start in range(0, tokens.size, 1 << 24):
                top = int(tokens[start:start + (1 << 24)].max())
                if top >= vocab:
                    problems.append(f"{shard['file']}: token {top} is not below the vocabulary size {vocab}")
                    break
            if size and tokens[0] != manifest["bos_id"]:
                problems.append(f"{shard['file']}: does not start with BOS ({manifest['bos_id']})")
    return problems
