"""Plain-PyTorch versions of every tinyfuse op.

They are the specification the kernels are tested against and what the engine
runs where Triton cannot. Math is done in float32 (float64 inputs stay float64),
outputs come back in the input dtype, as the kernels do.
"""
import torch

from ._launch import check_float
from .linear import check_working_copy, linear


def _compute_dtype(t):
    return torch.promote_types(t.dtype, torch.float32)


def rms_norm(x, weight, eps=1e-5, offset=0.0):
    xf = x.to(_compute_dtype(x))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (weight.to(xf.dtype) + offset)
    return y.to(x.dtype)


def add_rms_norm(x, residual, weight, eps=1e-5, offset=0.0):
    h = x + residual
    return rms_norm(h, weight, eps, offset), h


def _rotate(x, cos, sin, interleaved):
    ct = _compute_dtype(x)
    xf = x.to(ct)
    # [>=T, D/2] tables: one position per time step; [B or 1, T, D/2]: per sequence.
    c = (cos[: x.shape[1]][None] if cos.dim() == 2 else cos).to(ct)[:, :, None, :]
    s = (sin[: x.shape[1]][None] if sin.dim() == 2 else sin).to(ct)[:, :, None, :]
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return out.to(x.dtype)


def rope(q, k, cos, sin, interleaved=True):
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)


def rope_qkv(qkv, cos, sin, n_heads, n_kv_heads, interleaved=True):
    B, T, width = qkv.shape
    D = width // (n_heads + 2 * n_kv_heads)
    q, k, v = qkv.split([n_heads * D, n_kv_heads * D, n_kv_heads * D], dim=-1)
    q, k = rope(q.view(B, T, n_heads, D), k.view(B, T, n_kv_heads, D), cos, sin, interleaved)
    return q, k, v.view(B, T, n_kv_heads, D)


def _gated(gate, up, activation):
    """activation(gate) * up; up None: gate holds [gate | up] along its last dimension."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    ct = _compute_dtype(gate)
    return (activation(gate.to(ct)) * up.to(ct)).to(gate.dtype)


def swiglu(gate, up=None):
    return _gated(gate, up, torch.nn.functional.silu)


def geglu(gate, up=None):
    return _gated(gate, up, lambda g: torch.nn.functional.gelu(g, approximate="tanh"))


def _check_targets(target, vocab, ignore_index):
    """A clear error for out-of-range targets in eager mode (one host sync). Under
    torch.compile or a CUDA graph capture it is skipped, so the loss stays one graph; the
    gather then catches them."""
    if torch.compiler.is_compiling() or (target.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(f"target: values must lie in [0, {vocab}) or equal ignore_index={ignore_index}; got {value}")


def cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                  inplace_backward=False, softcap=None, logit_scale=1.0):
    """torch.nn.functional.cross_entropy plus PaLM's z-loss, z_loss * logsumexp(logits)**2 per
    token, of logits * logit_scale soft-capped to softcap * tanh(. / softcap) when softcap is
    given. inplace_backward is accepted for signature parity."""
    check_float("logits", logits, (torch.float64, torch.float32, torch.bfloat16, torch.float16))
    _check_targets(target, logits.shape[-1], ignore_index)
    x = logits.to(_compute_dtype(logits)) * logit_scale
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    valid = target != ignore_index
    lse = torch.logsumexp(x, dim=-1)
    target_logit = x.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    loss = (1.0 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - x.mean(-1)) + z_loss * lse * lse
    loss = torch.where(valid, loss, 0.0)
    if reduction == "none":
        return loss.to(logits.dtype)
    if reduction == "sum":
        return loss.sum().to(logits.dtype)
    return (loss.sum() / valid.sum()).to(logits.dtype)


def linear_cross_entropy(hidden, weight, target, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, chunk_size=None, memory_budget=None, working_weight=None, softcap=None,
                         logit_scale=1.0, bias=None):
    """The materialised path: full [N, V] logits, in hidden's dtype (a float32 weight is
    cast, as the fused op does, or read from working_weight, its copy in hidden's dtype).
    chunk_size and memory_budget are accepted for signature parity."""
    if working_weight is None:
        logits = hidden @ weight.to(hidden.dtype).T
    else:
        check_working_copy(working_weight, weight, hidden.dtype)
        logits = linear(hidden, weight, working_weight)
    if bias is not None:
        logits = logits + bias.to(hidden.dtype)
    return cross_entropy(logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap=softcap,
                         logit_scale=logit_scale)
