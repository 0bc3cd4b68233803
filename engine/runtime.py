"""Runtime rules shared by the trainer, the commands, the benchmarks and the tests: which
device, whether Triton runs in its interpreter, the autocast dtype, the devices' peak
FLOP/s and the MFU formula.

Importing this module imports torch but not triton, so `select_backend()` can switch the
interpreter on before anything imports triton (Triton reads TRITON_INTERPRET when a kernel
is decorated, at the import of the op modules).
"""
import os
import sys

import torch

# Dense bf16 tensor-core peaks, TFLOP/s, by a fragment of torch.cuda.get_device_name().
# The first fragment found wins, so the more specific names come first.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
    ("GH200", 989.0), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0),
]


def select_backend():
    """"cuda" when present; otherwise "cpu", with Triton's interpreter switched on (unless
    triton is already imported, or the environment says otherwise)."""
    if torch.cuda.is_available():
        return "cuda"
    if "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu"


def default_device(device=None):
    """The device asked for, else CUDA when present, else the CPU; a CUDA device on a
    machine without one is a one-line error instead of a deep traceback later."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: this machine has no CUDA device (torch {torch.__version__}); "
                         "use --device cpu")
    return device


def compute_dtype(device):
    """bf16 on CUDA (autocast), float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def autocast(device):
    """The autocast context of a training or evaluation step on this device."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=compute_dtype(device), enabled=device.type == "cuda")


def device_peak_tflops(device_name):
    for fragment, peak in PEAK_TFLOPS:
        if fragment in device_name:
            return peak
    return None


def mfu(tokens_per_s, flops_per_token, peak_flops):
    """Model FLOPs utilisation: achieved model FLOP/s (PaLM's per-token count, see
    Transformer.flops_per_token) over the peak; None when the peak is unknown."""
    return tokens_per_s * flops_per_token / peak_flops if peak_flops else None


# SDPA's backends by the names --attention takes.
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


def sdpa_backend(name):
    """The torch.nn.attention.SDPBackend of an --attention name."""
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, SDPA_BACKENDS[name])


def fastest_sdpa_backend(batch, heads, kv_heads, seq_len, head_dim, device, dtype, repeats=10):
    """(name, {name: ms}) of SDPA's backends that run a causal forward + backward of this
    shape on this device, fastest first (median of `repeats` after a warm-up; on CPU
    timed the same way). Which one wins depends on the device, the shape and the versions
    (cuDNN's is reported fastest for training on Hopper; head_dim 48 pads to 64 in
    FlashAttention-2), so it is measured rather than assumed."""
    import statistics
    import time

    from torch.nn.attention import sdpa_kernel

    device = torch.device(device)
    q = torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, seq_len, head_dim, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2))
    grad = torch.randn_like(q)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {}
    for name in SDPA_BACKENDS:
        try:
            with sdpa_kernel(sdpa_backend(name)):
                runs = []
                for _ in range(repeats + 1):
                    sync()
                    start = time.perf_counter()
                    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                           enable_gqa=heads != kv_heads)
                    torch.autograd.grad(out, (q, k, v), grad)
                    sync()
                    runs.append((time.perf_counter() - start) * 1e3)
        except (RuntimeError, NotImplementedError):  # "No available kernel": not this shape, not here
            continue
        times[name] = statistics.median(runs[1:])
    times = dict(sorted(times.items(), key=lambda item: item[1]))
    return next(iter(times)), times
