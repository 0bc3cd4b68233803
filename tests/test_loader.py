"""The C++ TokenLoader against the numpy reference: sampling, ranks, resume, bad input, shutdown."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import gpu_only
from tinyfuse.bench.loader import LOADERS, SHAPES, make_corpus
from tinyfuse.engine.loader import ReferenceLoader, TokenLoader
from tinyfuse.engine.shards import write_manifest


def make_prepared(folder, split_counts, dtype="uint16", vocab=None, tokens=None):
    """A prepared folder whose tokens are 0, 1, 2, ... along each split's stream (mod vocab),
    so a window is recognisable by its first token."""
    os.makedirs(folder, exist_ok=True)
    vocab = vocab or (65536 if dtype == "uint16" else 1 << 20)
    shards = []
    for split, counts in split_counts.items():
        start = 0
        for i, n in enumerate(counts):
            name = f"{split}_{i:03d}.bin"
            values = tokens[start:start + n] if tokens is not None else (np.arange(start, start + n) % vocab)
            np.asarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tofile(os.path.join(folder, name))
            shards.append({"file": name, "split": split, "tokens": n, "stories": 1})
            start += n
    write_manifest(str(folder), shards, vocab, 1, 2, "test", tokenizer=None)
    return str(folder)


@pytest.fixture
def prepared(tmp_path):
    # Uneven shards, so windows cross shard boundaries; an empty shard too.
    return make_prepared(tmp_path / "d", {"train": [1000, 0, 777, 2300], "val": [300]})


def take(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_cpp_loader_matches_reference(tmp_path, shuffle, dtype):
    rng = np.random.default_rng(0)
    vocab = 65536 if dtype == "uint16" else 100_000
    stream = rng.integers(0, vocab, 5000)  # uint16 values above 32767 check the widening
    folder = make_prepared(tmp_path / dtype, {"train": [1234, 2000, 1766], "val": [100]}, dtype, vocab, stream)
    kwargs = dict(batch_size=5, seq_len=37, seed=11, shuffle=shuffle)
    with TokenLoader(folder, prefetch=3, workers=3, **kwargs) as fast:
        reference = ReferenceLoader(folder, **kwargs)
        batches = take(fast, 80)  # several epochs: 5000 // 38 = 131 windows
        for i, (x, y) in enumerate(batches):
            rx, ry = next(reference)
            assert x.dtype == torch.int64 and x.shape == (5, 37) and x.is_contiguous() and y.is_contiguous()
            assert torch.equal(x, rx) and torch.equal(y, ry), f"batch {i} differs"
            assert torch.equal(x[:, 1:], y[:, :-1])
        assert fast.epoch == reference.epoch == 80 * 5 // 131
    assert max(int(x.max()) for x, _ in batches) > 32767


def test_windows_and_epochs(prepared):
    loader = ReferenceLoader(prepared, batch_size=4, seq_len=9, shuffle=False)
    assert loader.windows == 4077 // 10
    x, y = next(loader)
    assert torch.equal(x[0], torch.arange(0, 9)) and torch.equal(y[0], torch.arange(1, 10))
    assert torch.equal(x[1], torch.arange(10, 19))
    seen = set()
    with TokenLoader(prepared, batch_size=4, seq_len=9, seed=5) as loader:
        for _ in range(loader.windows // 4):
            x, _ = next(loader)
            seen.update(int(v) for v in x[:, 0] // 10)
        assert len(seen) == loader.windows // 4 * 4, "an epoch visits each window once"
        for _ in range(2):
            next(loader)
        assert loader.epoch == 1


def test_seed_determines_the_order(prepared):
    def first(seed):
        with TokenLoader(prepared, batch_size=8, seq_len=15, seed=seed) as loader:
            return torch.cat([x for x, _ in take(loader, 10)])

    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))
    with TokenLoader(prepared, batch_size=8, seq_len=15, shuffle=False) as ordered:
        assert not torch.equal(first(1), torch.cat([x for x, _ in take(ordered, 10)]))


def test_ranks_are_disjoint_and_cover_the_split(prepared):
    world, batch, seq = 3, 4, 9
    windows = 4077 // 10
    steps = windows // (world * batch)
    per_rank = []
    for rank in range(world):
        with TokenLoader(prepared, batch_size=batch, seq_len=seq, seed=3, rank=rank, world_size=world) as loader:
            per_rank.append({int(v) // 10 for x, _ in take(loader, steps) for v in x[:, 0]})
    for a in range(world):
        for b in range(a + 1, world):
            assert not per_rank[a] & per_rank[b], f"ranks {a} and {b} share windows"
    assert len(set.union(*per_rank)) == steps * world * batch
    with TokenLoader(prepared, batch_size=world * batch, seq_len=seq, seed=3) as single:
        merged = {int(v) // 10 for x, _ in take(single, steps) for v in x[:, 0]}
    assert merged == set.union(*per_rank), "ranks split what one process with the global batch reads"


@pytest.mark.parametrize("loader_cls", [TokenLoader, ReferenceLoader])
def test_resume_mid_epoch_is_exact(prepared, loader_cls):
    kwargs = dict(batch_size=6, seq_len=20, seed=9)
    uninterrupted = loader_cls(prepared, **kwargs)
    expected = take(uninterrupted, 40)  # crosses an epoch: 4077 // 21 = 194 windows
    first = loader_cls(prepared, **kwargs)
    take(first, 17)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint's serialisation
    first.close()
    resumed = loader_cls(prepared, **kwargs)
    resumed.load_state_dict(state)
    for i, (x, y) in enumerate(take(resumed, 23)):
        assert torch.equal(x, expected[17 + i][0]) and torch.equal(y, expected[17 + i][1])
    uninterrupted.close()
    resumed.close()
    with pytest.raises(ValueError, match="batch_size"):
        loader_cls(prepared, batch_size=7, seq_len=20, seed=9).load_state_dict(state)


def test_bad_input(tmp_path, prepared):
    with pytest.raises(FileNotFoundError, match="tinyfuse prepare"):
        TokenLoader(str(tmp_path / "nowhere"))
    for kwargs, message in [
        (dict(batch_size=0), "batch_size must be a positive"),
        (dict(seq_len=-1), "seq_len must be a positive"),
        (dict(rank=2, world_size=2), "rank must be in"),
        (dict(split="test"), "split 'test'"),
        (dict(split="val", seq_len=300), "fewer than seq_len \\+ 1 = 301"),
    ]:
        with pytest.raises(ValueError, match=message):
            TokenLoader(prepared, **{"batch_size": 2, "seq_len": 8, **kwargs})
    broken = make_prepared(tmp_path / "broken", {"train": [100, 100], "val": [50]})
    with open(os.path.join(broken, "train_001.bin"), "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match="has 201 bytes; manifest.json records 100 uint16 tokens = 200 bytes"):
        TokenLoader(broken, batch_size=2, seq_len=8)
    with open(os.path.join(broken, "train_001.bin"), "r+b") as f:  # truncated in place to whole tokens
        f.truncate(100)
    with pytest.raises(ValueError, match="has 100 bytes; manifest.json records 100 uint16 tokens"):
        TokenLoader(broken, batch_size=2, seq_len=8)
    os.remove(os.path.join(broken, "train_001.bin"))
    with pytest.raises(FileNotFoundError, match="train_001.bin is missing"):
        TokenLoader(broken, batch_size=2, seq_len=8)
    with open(os.path.join(broken, "manifest.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        TokenLoader(broken, batch_size=2, seq_len=8)


def test_close_stops_the_threads(prepared):
    def threads():
        return len(os.listdir("/proc/self/task"))

    before = threads()
    loader = TokenLoader(prepared, batch_size=2, seq_len=8, workers=3)
    next(loader)
    assert threads() == before + 3
    loader.close()
    assert threads() == before
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_interpreter_exit_with_an_open_loader(prepared):
    code = (
        "from tinyfuse.engine.loader import TokenLoader\n"
        f"loader = TokenLoader({prepared!r}, batch_size=2, seq_len=8, workers=2)\n"
        "next(loader)\n"
        "print('done')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr


def test_missing_extension_says_how_to_build(prepared):
    code = (
        "import sys\n"
        "sys.modules['tinyfuse._loader'] = None\n"
        "from tinyfuse.engine.loader import TokenLoader\n"
        "try:\n"
        f"    TokenLoader({prepared!r}, batch_size=2, seq_len=8)\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "not built" in out and "pip install -e ." in out


@gpu_only("the page-locked GPU path needs CUDA")
def test_cuda_batches_match_the_cpu_ones(tmp_path):
    stream = np.random.default_rng(1).integers(0, 65536, 3000)  # uint16 above 32767 checks the masking
    prepared = make_prepared(tmp_path / "d", {"train": [1000, 2000], "val": [0]}, "uint16", 65536, stream)
    kwargs = dict(batch_size=4, seq_len=15, seed=2)
    with TokenLoader(prepared, device="cuda", prefetch=2, **kwargs) as gpu, TokenLoader(prepared, **kwargs) as cpu:
        for _ in range(300):
            (gx, gy), (cx, cy) = next(gpu), next(cpu)
            assert gx.is_cuda and torch.equal(gx.cpu(), cx) and torch.equal(gy.cpu(), cy)


@pytest.fixture(scope="module")
def throughput_corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("loader-corpus")))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", list(LOADERS))
def test_loader_throughput(benchmark, throughput_corpus, impl, shape):
    batch_size, seq_len = shape
    loader = LOADERS[impl](throughput_corpus, batch_size=batch_size, seq_len=seq_len, seed=0)
    for _ in range(20):
        next(loader)
    benchmark.pedantic(next, args=(loader,), rounds=300, iterations=1, warmup_rounds=10)
    benchmark.extra_info["tokens_per_s"] = batch_size * seq_len / benchmark.stats.stats.median
    loader.close()
