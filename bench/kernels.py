"""The kernel benchmark: each op's forward, backward and forward+backward for every
implementation on the same inputs — tinyfuse, the PyTorch reference eager and under
torch.compile, and Liger-Kernel when it is installed.

Shapes: (a) the four presets at 16,384 tokens a step (rows = batch x sequence; hidden =
dim, the SwiGLU width, or the vocabulary), and (b) a bandwidth sweep: hidden 1K-32K over
2^26 elements, vocabulary 32K-256K over 2^28 logits. Each op's file (rms_norm.py, rope.py,
swiglu.py, cross_entropy.py) states its byte model; GB/s is those bytes over the median
time and % of bandwidth is against the copy bandwidth measured in the same run. The
linear cross-entropy is bound by its matmuls, so it reports TFLOP/s instead.
"""
import argparse
import json
import sys
from dataclasses import dataclass, field

import torch
from tinyfuse.engine.model import PRESETS, preset
from tinyfuse.engine.runtime import keep_checkout_off_path

from .timing import copy_gbps, environment, error_text, measure, peak_mem_mb, side_stream, smoke_here

PASSES = ("fwd", "bwd", "fwd+bwd")
IMPLS = ("tinyfuse", "torch", "torch.compile", "liger")
STEP_TOKENS = 16384
SWEEP_HIDDEN = [1024, 2048, 4096, 8192, 16384, 32768]
SWEEP_VOCAB = [32768, 65536, 131072, 262144]


@dataclass
class Case:
    op: str
    group: str  # a preset's name, or "sweep"
    shape: tuple
    size: int  # the sweep's x axis: the hidden size or the vocabulary
    make: object  # device, dtype -> the op's arguments, float tensors requiring grad
    bytes: dict = field(default_factory=dict)  # pass -> bytes the op must move, for a given itemsize
    flops: dict = field(default_factory=dict)  # pass -> FLOPs, for matmul-bound ops


def preset_shapes(smoke):
    """(name, batch, seq_len, ModelConfig) per preset; the smoke run keeps stories260K's
    dimensions with 1 x 16 tokens."""
    if smoke:
        return [("stories260K", 1, 16, preset("stories260K"))]
    out = []
    for name in PRESETS:
        cfg = preset(name)
        out.append((name, STEP_TOKENS // cfg.max_seq_len, cfg.max_seq_len, cfg))
    return out


def sweep_hidden(smoke):
    """(rows, hidden) pairs of the bandwidth sweep."""
    return [(8, 128), (8, 512)] if smoke else [((1 << 26) // n, n) for n in SWEEP_HIDDEN]


def sweep_vocab(smoke):
    return [(8, 512), (4, 2048)] if smoke else [((1 << 28) // v, v) for v in SWEEP_VOCAB]


def random(shape, device, dtype=torch.float32, scale=1.0):
    """Normal values drawn by the CPU's generator, then moved to the device. The CUDA
    generator is left alone: a capture that fails part-way (an implementation that syncs
    with the host) leaves it unusable ("Offset increment outside graph capture"), which
    spoiled every later case of the first H200 run."""
    return (torch.randn(shape) * scale).to(device=device, dtype=dtype)


def targets(n, vocab, device):
    return torch.randint(0, vocab, (n,)).to(device)


def leaf(shape, device, dtype, scale=1.0):
    return random(shape, device, dtype, scale).requires_grad_()


def compiled(fn, backend):
    """fn under torch.compile, recompiled from scratch for every case so no cache limit
    silently sends a later shape back to eager."""
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, dynamic=False)


def liger():
    """liger_kernel's functional ops, or None when it is not installed or there is no CUDA
    (its kernels do not all run in Triton's interpreter)."""
    if not torch.cuda.is_available():
        return None
    try:
        from liger_kernel.transformers import functional
    except ImportError:
        return None
    return functional


def _pass_fns(fn, args):
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.ones_like(o) if o.dim() == 0 else random(o.shape, o.device, o.dtype) for o in outs]

    def forward():
        return fn(*args)

    def backward():
        return torch.autograd.grad(outs, leaves, grads, retain_graph=True)

    def both():
        o = fn(*args)
        return torch.autograd.grad(o if isinstance(o, tuple) else (o,), leaves, grads)

    return {"fwd": forward, "bwd": backward, "fwd+bwd": both}


def run_case(case, impls, device, dtype, copy_bw, smoke, passes=PASSES, repeats=None):
    """Rows for one case: every implementation and pass; a failure is a row with "error"."""
    rows = []
    itemsize = torch.empty((), dtype=dtype).element_size()
    for impl, fn in impls.items():
        with side_stream(device):  # the forward that "bwd" differentiates runs where its capture does
            rows += _impl_rows(case, impl, fn, device, dtype, itemsize, copy_bw, smoke, passes, repeats)
        _release(device)
    _speedups(rows)
    return rows


def _impl_rows(case, impl, fn, device, dtype, itemsize, copy_bw, smoke, passes, repeats):
    """One implementation's rows of a case, every pass."""
    rows = []
    try:
        fns = _pass_fns(fn, case.make(device, dtype))
    except Exception as e:  # an implementation that cannot take this case
        return [_error_row(case, p, dtype, impl, e) for p in passes]
    for p in passes:
        row = {"op": case.op, "pass": p, "shape": list(case.shape), "dtype": str(dtype).removeprefix("torch."),
               "impl": impl, "group": case.group, "size": case.size}
        moved = case.bytes[p] * itemsize if case.bytes else None
        if moved == 0:  # cross_entropy: tinyfuse forms the gradient in the forward, its backward serves once
            rows.append({**row, "note": "nothing to time alone: the gradient is formed in the forward "
                                        "(compare fwd+bwd)"})
            continue
        try:
            timing = measure(fns[p], device, repeats=2 if smoke else repeats or 50, warmup=0 if smoke else 5)
            row.update(timing)
            row["peak_mem_mb"] = peak_mem_mb(fns[p], device)
        except Exception as e:
            rows.append(_error_row(case, p, dtype, impl, e))
            continue
        seconds = row["ms"] / 1e3
        row["gbps"] = moved / seconds / 1e9 if moved else None
        row["pct_bw"] = 100 * row["gbps"] / copy_bw if moved else None
        row["tflops"] = case.flops[p] / seconds / 1e12 if case.flops else None
        rows.append(row)
    return rows


def _release(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _error_row(case, p, dtype, impl, e):
    return {"op": case.op, "pass": p, "shape": list(case.shape), "dtype": str(dtype).removeprefix("torch."),
            "impl": impl, "group": case.group, "size": case.size, "ms": None,
            "error": error_text(e)}


def _speedups(rows):
    """On each tinyfuse row: the baselines' time over ours (above 1: tinyfuse is faster)."""
    for row in rows:
        if row["impl"] != "tinyfuse" or row.get("ms") is None:
            continue
        row["speedup"] = {r["impl"]: r["ms"] / row["ms"] for r in rows
                          if r["impl"] != "tinyfuse" and r["pass"] == row["pass"] and r.get("ms")}


def run(device, modules, smoke=False, ops=None, copy_bw=None, progress=print, groups=None, repeats=None, log=None):
    """Rows for every op of the op scripts `modules` (or those named in ops) over its cases
    (those of `groups` only: preset names and "sweep") and implementations. The op scripts
    use this harness; the suite lists them. log: a report.RowLog that takes each case's
    rows as they are measured and says when the run's time budget is spent (cases not
    started then are recorded as skipped)."""
    dtype = torch.bfloat16
    backend = "inductor" if torch.device(device).type == "cuda" else "aot_eager"
    copy_bw = copy_bw or copy_gbps(device, smoke)
    rows = []
    for module in modules:
        for op in module.OPS:
            if ops and op not in ops:
                continue
            for case in module.cases(op, smoke):
                if groups and case.group not in groups:
                    continue
                if log is not None and log.expired():
                    case_rows = [{"op": op, "group": case.group, "shape": list(case.shape), "impl": "tinyfuse",
                                  "pass": p, "skipped": log.SPENT} for p in PASSES]
                else:
                    progress(f"kernels: {op} {case.group} {tuple(case.shape)}")
                    case_rows = run_case(case, module.impls(op, backend), device, dtype, copy_bw, smoke,
                                         repeats=repeats)
                rows += case_rows
                if log is not None:
                    log.add("kernels", *case_rows)
    return rows


def main_for(module, argv=None):
    """`python -m tinyfuse.bench.<op>`: that file's ops on this machine, printed as a table."""
    keep_checkout_off_path()
    parser = argparse.ArgumentParser(description=module.__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (on CPU: the Triton interpreter)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.smoke = smoke_here(args.smoke, f"python -m {module.__name__}")
    copy_bw = copy_gbps(device, args.smoke)
    rows = run(device, [module], args.smoke, copy_bw=copy_bw, progress=lambda m: print(m, file=sys.stderr))
    from .report import kernel_table

    print(kernel_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": environment(device, copy_bw), "kernels": rows}, f, indent=1)
