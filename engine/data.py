"""`tinyfuse prepare`: corpus -> SentencePiece tokenizer -> shards of raw tokens (the folder's
format is engine.shards). The same input gives byte-identical output.
"""
import glob
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request

import numpy as np

from .progress import Progress
from .shards import (MANIFEST, SPLITS, TOKENIZER, DataError, read_manifest, sha256_file, token_dtype, write_manifest,
                     write_shards)

STORY_SEPARATOR = "<|endoftext|>"

HUB_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
TINYSTORIES_FILES = {
    "json": {"train": "TinyStories_all_data.tar.gz"},
    "v2": {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"},
}
DEFAULT_SHARD_TOKENS = 1 << 26  # 128 MB of uint16 per shard


def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tinyfuse")


# ---------------------------------------------------------------- reading corpora

def _read_utf8(path):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "convert it to UTF-8 first") from None


def read_text_stories(path):
    """Stories of a text file: separated by <|endoftext|>, or by blank lines when it has none."""
    text = _read_utf8(path)
    parts = text.split(STORY_SEPARATOR) if STORY_SEPARATOR in text else re.split(r"\n\s*\n", text)
    return [p.strip() for p in parts if p.strip()]


def read_json_stories(path):
    try:
        items = json.loads(_read_utf8(path))
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
        with response, open(part, "ab" if have else "wb") as f, Progress(
            size, f"download {name}", "byte", initial=have, enabled=not quiet
        ) as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
                bar.update(n=len(block))
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
    except (RuntimeError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"tokenizer {path!r}: not a SentencePiece model ({str(e).splitlines()[0][:100]})") from None


# ---------------------------------------------------------------- pretokenization

def encode_stories(sp, stories, workers, desc="tokenize", quiet=False, chunk=8192):
    """Token arrays (BOS + tokens, the shard dtype) for the stories, in order, on `workers` threads."""
    dtype = token_dtype(sp.vocab_size())
    bos = sp.bos_id()
    out = []
    with Progress(len(stories), desc, "story", enabled=not quiet) as bar:
        for start in range(0, len(stories), chunk):
            batch = stories[start:start + chunk]
            for ids in sp.encode(batch, num_threads=workers):
                out.append(np.array([bos, *ids], dtype=dtype))
            bar.update(n=len(batch))
    return out


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


def _own_files(out_dir, manifest):
    """The files a manifest names that this tool can show it wrote: shards by its own
    naming pattern and of the size the manifest records, the tokenizer under its own name
    with the sha256 recorded. A manifest is input, not proof: a user's file it names is
    not among them, so it is never replaced."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    own = set()
    for shard in manifest["shards"]:
        path = os.path.join(out_dir, shard["file"])
        if re.fullmatch(r"(train|val)_\d{3,}\.bin", shard["file"]) and os.path.isfile(path) \
                and os.path.getsize(path) == shard["tokens"] * itemsize:
            own.add(shard["file"])
    tokenizer = manifest["tokenizer"]
    path = os.path.join(out_dir, TOKENIZER)
    if tokenizer.get("path") == TOKENIZER and os.path.isfile(path) and sha256_file(path) == tokenizer.get("sha256"):
        own.add(TOKENIZER)
    return own


def _check_out(out_dir, force):
    """The files of out_dir a new dataset may replace: those of the tinyfuse dataset already
    there. A folder holding anything else is refused (unless force: then only the old
    dataset's own files are replaced, and the rest is left alone)."""
    if not os.path.exists(out_dir):
        return []
    if not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir}: exists and is not a folder")
    present = set(os.listdir(out_dir))
    if not present:
        return []
    ours = set()
    if MANIFEST in present:
        try:
            ours = {MANIFEST} | _own_files(out_dir, read_manifest(out_dir))
        except (DataError, OSError):
            ours = set()
    others = sorted(present - ours)
    if others and not force:
        kind = "a tinyfuse dataset with other files beside it" if ours else "not a tinyfuse dataset"
        raise DataError(f"--out {out_dir}: a non-empty folder that is {kind} ({', '.join(others[:4])}"
                        f"{' ...' if len(others) > 4 else ''}); choose an empty or new folder, or pass --force to write "
                        "the dataset there (files it did not write are left alone)")
    return sorted(ours & present)


# Written first into every build folder, with the builder's PID: what proves a leftover
# folder (a prepare killed by SIGKILL) is this tool's own to remove.
BUILD_MARK = ".tinyfuse-build"


def _install(build_dir, out_dir, replaced):
    """Move the finished dataset from build_dir into out_dir, then remove the files of the
    dataset it replaces that the new one did not overwrite."""
    os.makedirs(out_dir, exist_ok=True)
    new = sorted(name for name in os.listdir(build_dir) if name != BUILD_MARK)
    for name in new:
        if name != MANIFEST:
            os.replace(os.path.join(build_dir, name), os.path.join(out_dir, name))
    os.replace(os.path.join(build_dir, MANIFEST), os.path.join(out_dir, MANIFEST))  # last: the folder is complete
    for name in set(replaced) - set(new):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)
    os.remove(os.path.join(build_dir, BUILD_MARK))
    os.rmdir(build_dir)


def _remove_stale_builds(parent, prefix):
    """Remove the build folders beside --out that a killed prepare left: named as ours, with
    our mark inside, and their builder no longer running. Anything else is left alone."""
    for entry in os.listdir(parent):
        path = os.path.join(parent, entry)
        if not entry.startswith(prefix) or not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            with open(os.path.join(path, BUILD_MARK)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue  # not provably ours
        try:
            os.kill(pid, 0)
            continue  # its builder still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        shutil.rmtree(path, ignore_errors=True)


def prepare(source="synthetic", out_dir=None, tokenizer=None, vocab_size=None, val_fraction=0.01,
            workers=None, seed=0, stories=100_000, tinystories_format="json", hub_url=HUB_URL,
            cache_dir=None, shard_tokens=DEFAULT_SHARD_TOKENS, quiet=False, force=False):
    """Prepare a folder of shards from a source; returns the manifest.

    Everything is checked and built in a temporary folder beside out_dir first; out_dir
    changes only when the whole dataset is ready, and only files of a tinyfuse dataset are
    ever replaced. `stories` is the synthetic corpus's size and a cap on the other sources
    (None: all)."""
    from . import synthetic

    if out_dir is None:
        raise DataError("--out: a folder for the shards is needed")
    if tokenizer is not None and vocab_size is not None:
        raise DataError("give --tokenizer or --vocab-size, not both")
    if vocab_size is not None and not 260 <= vocab_size <= 1 << 20:
        raise DataError(f"--vocab-size {vocab_size}: expected at least 260 (256 bytes + specials, for byte "
                        "fallback) and at most 1048576")
    if shard_tokens <= 0:
        raise DataError(f"--shard-tokens {shard_tokens}: expected a positive count")
    if tokenizer is not None:
        load_tokenizer(tokenizer)  # before any work: a mistyped path fails now
    replaced = _check_out(out_dir, force)
    workers = workers or os.cpu_count() or 1
    say = (lambda message: None) if quiet else (lambda message: print(message, flush=True))
    if source == "synthetic":
        say(f"writing {stories} synthetic stories (seed {seed})")
        corpus = {"train": synthetic.stories(seed, stories), "val": None}
    elif source == "tinystories":
        corpus = tinystories(tinystories_format, cache_dir, hub_url, quiet=quiet)
    else:
        corpus = {"train": read_stories(source), "val": None}
    if stories is not None and source != "synthetic":
        corpus = {k: (v[:stories] if v is not None else None) for k, v in corpus.items()}
    if corpus["val"] is None:
        corpus["train"], corpus["val"] = split_stories(corpus["train"], val_fraction, seed)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(os.path.abspath(out_dir))}.building-"
    _remove_stale_builds(parent, prefix)
    build_dir = tempfile.mkdtemp(prefix=prefix, dir=parent)
    with open(os.path.join(build_dir, BUILD_MARK), "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        tok_path = os.path.join(build_dir, TOKENIZER)
        if tokenizer is None:
            say(f"training a {vocab_size or 512}-token SentencePiece BPE tokenizer on {len(corpus['train'])} stories")
            train_tokenizer(corpus["train"], vocab_size or 512, tok_path, workers, seed)
        else:
            shutil.copyfile(tokenizer, tok_path)
        sp = load_tokenizer(tok_path)
        shards = []
        for split in SPLITS:
            say(f"tokenizing {len(corpus[split])} {split} stories")
            encoded = encode_stories(sp, corpus[split], workers, desc=f"tokenize {split}", quiet=quiet)
            shards += write_shards(encoded, build_dir, split, shard_tokens)
        manifest = write_manifest(build_dir, shards, sp.vocab_size(), sp.bos_id(), sp.eos_id(), tokenizer or "trained")
        _install(build_dir, out_dir, replaced)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)  # only ever the folder made above
    return manifest
