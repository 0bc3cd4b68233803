"""How every benchmark here times, counts memory and measures bandwidth.

On CUDA: warm-up calls first, then each repetition is a CUDA-event pair around one call,
with L2 flushed before it (a 256 MB buffer zeroed: larger than any L2 we run on); the
figure is the median, and the interquartile range over the median is the run's noise.
A call made on a side stream (side_stream) is captured once in a CUDA graph and replayed,
whatever its size: timed eagerly, the events bracket the host's launch work as well (on
the H200, 0.3-0.8 ms for ops whose kernels take 20-70 us), because the GPU runs ahead of
nothing and waits for it. On CPU (the smoke run) the same with perf_counter and no
flush: those figures check the code path, not the speed.
"""
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

FLUSH_BYTES = 256 << 20


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _graphed(fn):
    """fn captured in a CUDA graph on the current stream, or None when it cannot be
    captured (a host sync, say). The current stream must not be the default one: the
    caller runs the case on a side stream (see side_stream), so that a backward, whose
    kernels autograd launches on its forward's stream, is captured where it runs."""
    stream = torch.cuda.current_stream()
    try:
        for _ in range(3):
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    except Exception:  # not capturable: time it eagerly instead
        torch.cuda.synchronize()
        return None
    return graph.replay


def smoke_here(smoke, what):
    """The smoke flag to run with: GPU sizes on a machine without CUDA would run in Triton's
    interpreter for hours, so there `what` says so and takes the smoke sizes."""
    if not smoke and not torch.cuda.is_available():
        print(f"{what}: no CUDA device here, so the kernels would run in Triton's interpreter at GPU sizes "
              "(hours); measuring the smoke sizes instead (--smoke), which check the code paths, not the speed",
              file=sys.stderr)
        return True
    return smoke


def side_stream(device):
    """The context a case runs in, from building its inputs and forward to the last timed
    call: a fresh CUDA stream (captures need one that is not the default stream), or
    nothing on the CPU."""
    import contextlib

    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return torch.cuda.stream(stream)


def measure(fn, device, repeats=50, warmup=5):
    """{"ms": median, "noise": (p75 - p25) / median, "graph": replayed from a CUDA graph}."""
    cuda = torch.device(device).type == "cuda"
    graph = None
    if cuda and torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
        graph = _graphed(fn)
    call = graph or fn
    for _ in range(warmup):
        call()
    times = []
    if cuda:
        flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            flush.zero_()
            start.record()
            call()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [median, median, median]
    return {"ms": median, "noise": (q[2] - q[0]) / median if median > 0 else 0.0, "graph": graph is not None}


def error_text(e):
    """What a failed measurement records: the exception's type and first line."""
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def peak_mem_mb(fn, device):
    """Memory one call allocates at its peak beyond what was live before it (CUDA only)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_gbps(device, smoke=False):
    """Device-to-device copy bandwidth, bytes read plus bytes written: the % of bandwidth
    every kernel row reports is against this figure from the same run."""
    n = (64 << 20) if smoke else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    # On the default stream, so not from a graph: a captured copy_ becomes a memcpy node that
    # the copy engines run (2.76 TB/s on the H200 against 4.25 TB/s for the copy kernel).
    ms = measure(lambda: dst.copy_(src), device, repeats=5 if smoke else 20)["ms"]
    return 2 * n / ms / 1e6


def _commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else None


def environment(device, copy_bandwidth):
    import triton

    cuda = torch.device(device).type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                                  f"{os.cpu_count()} cores)",
        "device_count": torch.cuda.device_count() if cuda else 1,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": copy_bandwidth,
    }
