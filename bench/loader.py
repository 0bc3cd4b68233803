"""Loader benchmark: tokens/s of the C++ TokenLoader against the numpy ReferenceLoader, on CPU.

    python -m tinyfuse.bench.loader            # one line per loader and shape
    python -m pytest tests/test_loader.py -k throughput   # the same as pytest-benchmark tables

The corpus is 2^24 random uint16 tokens (32 MB) in four shards, read shuffled: every window
is a random place in the file, as in training. The figure is B*T tokens over the median
time of one `next(loader)` (int64 inputs and targets on the CPU).
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np
from tinyfuse.engine.loader import ReferenceLoader, TokenLoader
from tinyfuse.engine.shards import write_manifest

SHAPES = [(32, 256), (16, 1024)]
LOADERS = {"tinyfuse (C++)": TokenLoader, "reference (numpy)": ReferenceLoader}


def make_corpus(folder, tokens=1 << 24, shards=4, vocab=32000, seed=0, val_tokens=0):
    """A prepared folder of random tokens: `shards` train shards and, with val_tokens, one
    val shard (what the trainer needs)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    per_shard = tokens // shards
    sizes = [("train", i, per_shard) for i in range(shards)] + ([("val", 0, val_tokens)] if val_tokens else [])
    for split, i, count in sizes:
        name = f"{split}_{i:03d}.bin"
        rng.integers(0, vocab, count, dtype=np.uint16).tofile(os.path.join(folder, name))
        entries.append({"file": name, "split": split, "tokens": count, "stories": 0})
    write_manifest(folder, entries, vocab, 1, 2, "random tokens", tokenizer=None)
    return folder


def batch_seconds(loader, batches=200, warmup=20):
    """Median seconds of one next(loader), after warm-up (the C++ ring is full by then), and
    the interquartile range over the median."""
    for _ in range(warmup):
        next(loader)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        next(loader)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    quartiles = statistics.quantiles(times, n=4)
    return median, (quartiles[2] - quartiles[0]) / median


def run(folder, batches=200):
    """[{"impl", "batch_size", "seq_len", "tokens_per_s", "noise"}] for each loader and shape."""
    rows = []
    for batch_size, seq_len in SHAPES:
        for impl, cls in LOADERS.items():
            loader = cls(folder, batch_size=batch_size, seq_len=seq_len, seed=0)
            seconds, noise = batch_seconds(loader, batches)
            loader.close()
            rows.append({"impl": impl, "batch_size": batch_size, "seq_len": seq_len,
                         "tokens_per_s": batch_size * seq_len / seconds, "noise": noise})
    return rows


def suite_rows(smoke):
    """The rows `tinyfuse bench` records: a 32 MB corpus (4 MB and fewer batches when smoke)."""
    with tempfile.TemporaryDirectory() as tmp:
        return run(make_corpus(tmp, tokens=1 << (21 if smoke else 24)), batches=50 if smoke else 300)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(make_corpus(tmp), args.batches)
    for row in rows:
        reference = next(r for r in rows if r["impl"].startswith("reference") and r["seq_len"] == row["seq_len"])
        print(f"{row['impl']:<20} B={row['batch_size']:<3} T={row['seq_len']:<5} "
              f"{row['tokens_per_s'] / 1e6:8.1f} M tokens/s  ({row['tokens_per_s'] / reference['tokens_per_s']:.1f}x reference)")


if __name__ == "__main__":
    main()
