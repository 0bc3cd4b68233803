"""Seeded mutations of every file tinyfuse reads: llama2.c v0 and v1, Hugging Face folders
(config.json, the safetensors header, the index), tinyfuse checkpoints, manifests, shards
and tokenizers. Each mutated file must either load or fail with one of the project's
one-line errors (what the command line prints as `tinyfuse CMD: ...`), never another
exception, never a hang, and never an allocation beyond the file's own size class: the
readers run with the address space capped at what the process had plus 2 GiB (the
files are a few hundred KB), so a header that asks for more fails the test.

The mutations are bit flips, truncations, extensions and, for the formats with a header
or a JSON document, fields set out of range or to the wrong type. They are drawn from a
fixed seed, so a failure is the same file on every run; N_CASES per reader (9,000 files
in all) keeps the whole file under a minute on the 2-core CI machine. Found so far: a
tokenizer whose bytes sentencepiece decodes as text raised UnicodeDecodeError.
"""
import json
import os
import random
import struct

import pytest
import torch

from helpers import TINY_MODEL
from tinyfuse.engine.checkpoint import CheckpointError, Weights, export, load_checkpoint, save_checkpoint
from tinyfuse.engine.files import FileError
from tinyfuse.engine.model import ModelConfig, Transformer
from tinyfuse.engine.sample import load_tokenizer_bytes
from tinyfuse.engine.shards import DataError, read_manifest, split_shards

N_CASES = 1000
ONE_LINE = (CheckpointError, DataError, FileError, FileNotFoundError)
WRONG = [None, -1, 0, 1 << 40, 2.5, "x", [], {}, True]


def byte_mutations(data, rng, n):
    """n seeded variants of `data`: bit flips, truncations, extensions, a header word set huge."""
    out = []
    for i in range(n):
        kind = i % 4
        blob = bytearray(data)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            blob = blob[:rng.randrange(len(blob))]
        elif kind == 2:
            blob += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:
            at = rng.randrange(0, min(len(blob), 64) - 3, 4)
            blob[at:at + 4] = struct.pack("<i", rng.choice([-1, 0, 1 << 30, -(1 << 31)]))
        out.append(bytes(blob))
    return out


def json_mutations(doc, rng, n):
    """n seeded variants of a JSON document: a field deleted or set to a wrong value,
    anywhere in it (nested lists and objects included)."""
    def paths(node, prefix=()):
        yield prefix
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            yield from paths(child, prefix + (key,))

    every = [p for p in paths(doc) if p]
    out = []
    for _ in range(n):
        changed = json.loads(json.dumps(doc))
        path = rng.choice(every)
        parent = changed
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and rng.random() < 0.3:
            del parent[path[-1]]
        else:
            parent[path[-1]] = rng.choice(WRONG)
        out.append(changed)
    return out


def must_load_or_say_one_line(read, what, name):
    """read() succeeds, or raises a project error of one line naming the file (`name`);
    anything else fails the test."""
    try:
        read()
    except ONE_LINE as e:
        assert "\n" not in str(e).strip(), f"{what}: a multi-line error: {e}"
        assert name in str(e), f"{what}: the error does not name {name}: {e}"
    except Exception as e:  # the bug this test exists to catch
        pytest.fail(f"{what}: {type(e).__name__}: {e}")


@pytest.fixture(autouse=True)
def capped_address_space():
    """RLIMIT_AS at this process's size plus 2 GiB while a test runs."""
    import resource

    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    before = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + (2 << 30), before[1]))
    yield
    resource.setrlimit(resource.RLIMIT_AS, before)


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**TINY_MODEL, "vocab_size": 64})
    return Weights(cfg, Transformer(cfg).state_dict(), None, "tinyfuse")


@pytest.mark.parametrize("version", [0, 1])
def test_llama2c_files(weights, tmp_path, version):
    path = tmp_path / "m.bin"
    export(weights, str(path), f"llama2c-v{version}")
    rng = random.Random(version)
    for i, blob in enumerate(byte_mutations(path.read_bytes(), rng, N_CASES)):
        path.write_bytes(blob)
        must_load_or_say_one_line(lambda: load_checkpoint(str(path)), f"llama2.c v{version} mutation {i}", path.name)


def test_hugging_face_folders(weights, tmp_path):
    folder = tmp_path / "hf"
    export(weights, str(folder), "hf")
    config = json.loads((folder / "config.json").read_text())
    tensors = (folder / "model.safetensors").read_bytes()
    rng = random.Random(2)
    for i, changed in enumerate(json_mutations(config, rng, N_CASES)):
        (folder / "config.json").write_text(json.dumps(changed))
        must_load_or_say_one_line(lambda: load_checkpoint(str(folder)), f"config.json mutation {i}: {changed}",
                                  str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    header = struct.unpack("<Q", tensors[:8])[0]
    for i, blob in enumerate(byte_mutations(tensors[:8 + header], rng, N_CASES)):  # the header and its length
        (folder / "model.safetensors").write_bytes(blob + tensors[8 + header:])
        must_load_or_say_one_line(lambda: load_checkpoint(str(folder)), f"safetensors header mutation {i}", str(folder))
    (folder / "model.safetensors").write_bytes(tensors)
    index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in json.loads(tensors[8:8 + header])
                                            if name != "__metadata__"}}
    for i, changed in enumerate(json_mutations(index, rng, N_CASES)):
        (folder / "model.safetensors.index.json").write_text(json.dumps(changed))
        must_load_or_say_one_line(lambda: load_checkpoint(str(folder)), f"index mutation {i}", str(folder))


def test_tinyfuse_checkpoints(weights, tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"kind": "tinyfuse-checkpoint", "model": weights.state, "model_config": weights.config.to_dict(),
                     "tokenizer": None}, str(path))
    rng = random.Random(3)
    for i, blob in enumerate(byte_mutations(path.read_bytes(), rng, N_CASES)):
        path.write_bytes(blob)
        must_load_or_say_one_line(lambda: load_checkpoint(str(path)), f"checkpoint mutation {i}", path.name)


def test_manifests_and_shards(tmp_path):
    from tinyfuse.bench.loader import make_corpus

    data = make_corpus(str(tmp_path / "d"), tokens=1 << 12, shards=2, vocab=512, val_tokens=1 << 10)
    manifest = json.loads(open(os.path.join(data, "manifest.json")).read())
    rng = random.Random(4)

    def read():
        read_manifest(data)
        for split in ("train", "val"):
            split_shards(data, split)

    for i, changed in enumerate(json_mutations(manifest, rng, N_CASES)):
        with open(os.path.join(data, "manifest.json"), "w") as f:
            json.dump(changed, f)
        must_load_or_say_one_line(read, f"manifest mutation {i}: {changed}", data)
    with open(os.path.join(data, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    shard = os.path.join(data, manifest["shards"][0]["file"])
    original = open(shard, "rb").read()
    for i, blob in enumerate(byte_mutations(original, rng, N_CASES)):
        with open(shard, "wb") as f:
            f.write(blob)
        must_load_or_say_one_line(read, f"shard mutation {i}", data)


def test_tokenizers(shared_data):
    blob = open(os.path.join(shared_data, "tok512.model"), "rb").read()
    rng = random.Random(5)
    for i, changed in enumerate(byte_mutations(blob, rng, N_CASES)):
        must_load_or_say_one_line(lambda: load_tokenizer_bytes(changed, f"tokenizer mutation {i}"),
                                  f"tokenizer mutation {i}", f"tokenizer mutation {i}")
