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


def keep_checkout_off_path(root=None):
    """`python -m` puts the current folder first on sys.path. Run from a tinyfuse checkout
    (root: default the current folder), its top-level kernels/ folder (the source of the
    installed tinyfuse.kernels) would stand in for the PyPI package `kernels` that
    transformers imports; tinyfuse is imported as installed, so the `python -m` entry
    points and the tests take the checkout's root off the path."""
    root = os.path.abspath(root or os.getcwd())
    if os.path.isfile(os.path.join(root, "kernels", "huggingface.py")):
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]


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


def launched_world_size():
    """Processes in this run: torchrun's WORLD_SIZE, 1 when started alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


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


# A backend whose output or gradients differ from the math backend's by more than this
# (relative norm, same inputs) is not chosen: bf16 rounding of the output is ~4e-3.
SDPA_AGREEMENT = 2e-2


def _model_layouts(batch, heads, kv_heads, seq_len, head_dim, device, dtype):
    """q, k, v as the model hands them to SDPA: q and k rotated into [B, T, H, D] tensors
    of their own, v a strided slice of the fused projection's output, all three as
    [B, H, T, D] transposed views; requiring grad."""
    qkv = torch.randn(batch, seq_len, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    q = torch.randn(batch, seq_len, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seq_len, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = qkv[..., (heads + kv_heads) * head_dim:].view(batch, seq_len, kv_heads, head_dim).requires_grad_()
    return q, k, v


def _decode_layouts(batch, heads, kv_heads, seq_len, head_dim, device, dtype):
    """One new token's q against the KV cache's filled part, as sampling hands them over."""
    cache = torch.randn(2, batch, seq_len + 7, kv_heads, head_dim, device=device, dtype=dtype)
    q = torch.randn(batch, 1, heads, head_dim, device=device, dtype=dtype)
    return q, cache[0][:, :seq_len], cache[1][:, :seq_len]


def _attend(name, q, k, v, causal):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(sdpa_backend(name)):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
            enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)


def _relative(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def fastest_sdpa_backend(batch, heads, kv_heads, seq_len, head_dim, device, dtype, repeats=10):
    """(name, {name: ms}, {name: why not chosen}) of SDPA's backends on this shape and device,
    fastest first: each is timed on a causal forward + backward of the layouts the model
    uses (median of `repeats` after a warm-up), and kept only if its output and gradients
    agree with the math backend's on those inputs and it also decodes (one token against
    the KV cache's slices) in agreement with it, since the trainer samples with the same
    choice. Which one wins depends on the device, the shape and the versions (cuDNN's is
    reported fastest for training on Hopper; head_dim 48 pads to 64 in FlashAttention-2),
    so it is measured rather than assumed."""
    import statistics
    import time

    device = torch.device(device)
    torch.manual_seed(0)
    q, k, v = _model_layouts(batch, heads, kv_heads, seq_len, head_dim, device, dtype)
    grad = torch.randn(batch, seq_len, heads, head_dim, device=device, dtype=dtype)
    decode = _decode_layouts(batch, heads, kv_heads, seq_len, head_dim, device, dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_pass(name):
        out = _attend(name, q, k, v, True)
        return (out, *torch.autograd.grad(out, (q, k, v), grad))

    reference = train_pass("math"), _attend("math", *decode, False)
    times, rejected = {}, {}
    for name in SDPA_BACKENDS:
        try:
            results = train_pass(name), _attend(name, *decode, False)
            runs = []
            for _ in range(repeats + 1):
                sync()
                start = time.perf_counter()
                train_pass(name)
                sync()
                runs.append((time.perf_counter() - start) * 1e3)
        except (RuntimeError, NotImplementedError):  # "No available kernel": not this shape, not here
            continue
        parts = ("output", "dq", "dk", "dv")
        errors = {part: _relative(a, b) for part, a, b in zip(parts, results[0], reference[0])}
        errors["decode"] = _relative(results[1], reference[1])
        worst = max(errors, key=errors.get)
        if not errors[worst] <= SDPA_AGREEMENT:
            rejected[name] = f"{worst} differs from the math backend's by {errors[worst]:.1e}"
            continue
        times[name] = statistics.median(runs[1:])
    times = dict(sorted(times.items(), key=lambda item: item[1]))
    return next(iter(times)), times, rejected
