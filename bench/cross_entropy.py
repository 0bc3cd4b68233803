"""Benchmark: cross_entropy and linear_cross_entropy forward+backward against torch.

Run on a CUDA machine: python -m tinyfuse.bench.cross_entropy [--n 16384 --v 32000]

Byte model for cross_entropy forward+backward: the logits are read twice (forward,
backward) and the gradient written once: 3 * N * V * itemsize bytes; the ideal
fused kernel reads once and writes once (2 * N * V * itemsize), the figure the
% of copy bandwidth uses. Timing: CUDA events around each call after warm-up,
L2 flushed (a 256 MB buffer zeroed) before each repetition, median of repeats.
"""
import argparse
import json
import platform

import torch
import torch.nn.functional as F
import triton

from tinyfuse.kernels import cross_entropy, linear_cross_entropy


def median_ms(fn, repeats=50, warmup=5):
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def peak_mb(fn, *leaves):
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_gbps():
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats=20)
    return 2 * src.numel() / ms / 1e6


def bench_cross_entropy(n, v, dtype, cbw):
    logits = (torch.randn(n, v, device="cuda") * 4).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device="cuda")
    compiled = torch.compile(lambda x, t: F.cross_entropy(x.float(), t))
    impls = {
        "tinyfuse": lambda: cross_entropy(logits, target).backward(),
        "torch": lambda: F.cross_entropy(logits.float(), target).backward(),
        "torch.compile": lambda: compiled(logits, target).backward(),
    }
    ideal_bytes = 2 * n * v * logits.element_size()
    rows = []
    for name, fn in impls.items():
        ms = median_ms(lambda: (setattr(logits, "grad", None), fn()))
        mem = peak_mb(fn, logits)
        gbps = ideal_bytes / ms / 1e6
        rows.append({"op": "cross_entropy", "pass": "fwd+bwd", "shape": [n, v], "dtype": str(dtype), "impl": name,
                     "ms": ms, "gbps": gbps, "pct_bw": 100 * gbps / cbw, "peak_mem_mb": mem})
    return rows


def bench_linear_cross_entropy(n, d, v, dtype):
    hidden = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, d, device="cuda", dtype=dtype) * 0.02).requires_grad_()
    target = torch.randint(0, v, (n,), device="cuda")
    impls = {
        "tinyfuse": lambda: linear_cross_entropy(hidden, weight, target).backward(),
        "torch": lambda: F.cross_entropy((hidden @ weight.T).float(), target).backward(),
    }
    rows = []
    for name, fn in impls.items():
        def step():
            hidden.grad = weight.grad = None
            fn()
        rows.append({"op": "linear_cross_entropy", "pass": "fwd+bwd", "shape": [n, d, v], "dtype": str(dtype),
                     "impl": name, "ms": median_ms(step, repeats=20), "peak_mem_mb": peak_mb(fn, hidden, weight)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    cbw = copy_gbps()
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "copy_gbps": cbw}
    rows = bench_cross_entropy(args.n, args.v, torch.bfloat16, cbw)
    rows += bench_linear_cross_entropy(8192, 288, 32000, torch.bfloat16)   # stories15M: 32 x 256 tokens
    rows += bench_linear_cross_entropy(8192, 768, 32000, torch.bfloat16)   # stories110M: 8 x 1024 tokens
    print(json.dumps(env))
    print(f"{'op':<22}{'shape':<20}{'impl':<15}{'ms':>9}{'GB/s':>9}{'%bw':>7}{'peak MB':>10}")
    for r in rows:
        gbps = f"{r['gbps']:>9.0f}{r['pct_bw']:>7.1f}" if "gbps" in r else f"{'':>9}{'':>7}"
        print(f"{r['op']:<22}{str(r['shape']):<20}{r['impl']:<15}{r['ms']:>9.3f}{gbps}{r['peak_mem_mb']:>10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "kernels": rows}, f, indent=1)


if __name__ == "__main__":
    main()
