"""Cross-entropy over [N, V] logits, with label smoothing and PaLM's z-loss.

Forward: one read of the logits. Each program streams one row in vocabulary
blocks with an online softmax (a running max and a rescaled running sum per
lane, float32), and writes the row's loss and logsumexp. Backward: one more read
of the row and one write of its gradient, optionally into the logits buffer
itself. Reductions ("sum", "mean") are plain torch ops on the per-row losses, so
the count of non-ignored tokens stays on the device and nothing synchronises.

Gradient accumulation: over micro-batches, sum `cross_entropy(..., reduction="sum")`
and divide by the total count of non-ignored targets of the whole batch
(`(target != ignore_index).sum()` over all micro-batches, a device tensor); the
loss and the gradients then equal the full batch's "mean".

Targets outside [0, V) other than ignore_index: with TINYFUSE_DEBUG=1 the call
raises (at the cost of a host sync); otherwise no memory outside the row is read
and the row's loss and gradient are NaN, so the error shows in the loss.
"""
import os

import torch
import triton
import triton.language as tl

from ._launch import check_device, check_float, unit_last_stride

_FLOOR = tl.constexpr(-1.0e30)  # stands in for -inf in masked lanes: exp(_FLOOR - m) is 0, never NaN


@triton.jit
def _cross_entropy_forward_kernel(X, TARGET, LOSS, LSE, V, stride_x, ignore_index, label_smoothing, z_loss,
                                  BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    m = tl.full([BLOCK_V], _FLOOR, tl.float32)
    d = tl.zeros([BLOCK_V], tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.where(mask, tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32), _FLOOR)
        m_new = tl.maximum(m, x)
        d = d * tl.exp(m - m_new) + tl.where(mask, tl.exp(x - m_new), 0.0)
        s += tl.where(mask, x, 0.0)
        m = m_new
    row_max = tl.max(m, axis=0)
    lse = row_max + tl.log(tl.sum(d * tl.exp(m - row_max), axis=0))
    target = tl.load(TARGET + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    x_target = tl.load(x_row + target, mask=valid & in_range, other=0.0).to(tl.float32)
    loss = lse - (1.0 - label_smoothing) * x_target - label_smoothing * tl.sum(s, axis=0) / V + z_loss * lse * lse
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _cross_entropy_backward_kernel(X, TARGET, LSE, DLOSS, DX, V, stride_x, stride_dx, stride_dloss, ignore_index,
                                   label_smoothing, z_loss, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    dx_row = DX + row * stride_dx
    target = tl.load(TARGET + row)
    lse = tl.load(LSE + row)
    # Ignored rows get exactly 0, even when the upstream gradient is inf (an all-ignored "mean").
    scale = tl.where(target != ignore_index, tl.load(DLOSS + row * stride_dloss), 0.0)
    scale = tl.where((target == ignore_index) | ((target >= 0) & (target < V)), scale, float("nan"))
    p_scale = 1.0 + 2.0 * z_loss * lse
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) * p_scale - label_smoothing / V - tl.where(cols == target, 1.0 - label_smoothing, 0.0)
        tl.store(dx_row + cols, (grad * scale).to(DX.dtype.element_ty), mask=mask)


def _block_v(v):
    return min(triton.next_power_of_2(v), 4096)


def cross_entropy_rows(logits, target, ignore_index, label_smoothing, z_loss, loss, lse):
    """Per-row float32 loss and logsumexp of logits [N, V] into loss and lse (launch only)."""
    n, v = logits.shape
    if n > 0:
        _cross_entropy_forward_kernel[(n,)](logits, target, loss, lse, v, logits.stride(0), ignore_index,
                                            label_smoothing, z_loss, BLOCK_V=_block_v(v), num_warps=8)


def cross_entropy_grad_rows(logits, target, lse, grad_loss, ignore_index, label_smoothing, z_loss, grad_logits):
    """Gradient of the per-row losses, scaled by grad_loss [N], into grad_logits (may be logits itself)."""
    n, v = logits.shape
    if n > 0:
        _cross_entropy_backward_kernel[(n,)](logits, target, lse, grad_loss, grad_logits, v, logits.stride(0),
                                             grad_logits.stride(0), grad_loss.stride(0), ignore_index,
                                             label_smoothing, z_loss, BLOCK_V=_block_v(v), num_warps=8)


@torch.library.custom_op("tinyfuse::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float,
                          z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = unit_last_stride(logits)
    n = logits.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    cross_entropy_rows(logits, target, ignore_index, label_smoothing, z_loss, loss, lse)
    return loss, lse


@cross_entropy_forward.register_fake
def _(logits, target, ignore_index, label_smoothing, z_loss):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("tinyfuse::cross_entropy_backward", mutates_args=("grad_logits",))
def cross_entropy_backward(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor,
                           ignore_index: int, label_smoothing: float, z_loss: float,
                           grad_logits: torch.Tensor) -> None:
    cross_entropy_grad_rows(unit_last_stride(logits), target, lse, grad_loss, ignore_index, label_smoothing,
                            z_loss, grad_logits)


@cross_entropy_backward.register_fake
def _(logits, target, lse, grad_loss, ignore_index, label_smoothing, z_loss, grad_logits):
    return None


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, z_loss, inplace_backward):
        loss, lse = torch.ops.tinyfuse.cross_entropy_forward(logits, target, ignore_index, label_smoothing, z_loss)
        ctx.save_for_backward(logits, target, lse)
        ctx.options = ignore_index, label_smoothing, z_loss, inplace_backward
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse = ctx.saved_tensors
        ignore_index, label_smoothing, z_loss, inplace_backward = ctx.options
        grad = logits if inplace_backward else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        torch.ops.tinyfuse.cross_entropy_backward(logits, target, lse, grad_loss, ignore_index, label_smoothing,
                                                  z_loss, grad)
        return grad, None, None, None, None, None


REDUCTIONS = ("mean", "sum", "none")


def check_loss_options(target, n_rows, ignore_index, reduction, label_smoothing, z_loss, n_classes):
    if n_classes == 0:
        raise ValueError("logits: expected at least one class (V > 0); got V = 0")
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        got = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise TypeError(f"target: expected an int64 (or int32) tensor of class indices; got {got}")
    if target.shape != (n_rows,):
        raise ValueError(f"target: expected shape ({n_rows},), one class index per row; got {tuple(target.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1]; got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"z_loss: expected a value >= 0; got {z_loss}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int; got {type(ignore_index).__name__}")


def check_target_range(target, vocab, ignore_index):
    """With TINYFUSE_DEBUG=1, raise on out-of-range targets (a host sync); otherwise do nothing."""
    if os.environ.get("TINYFUSE_DEBUG") == "1":
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if bool(bad.any()):
            raise IndexError(f"target: values must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                             f"got {int(target[bad][0])}")


def reduce_loss(loss, target, ignore_index, reduction, dtype):
    """Reduce float32 per-row losses like torch: "mean" divides by the non-ignored count (NaN when it is 0)."""
    if reduction == "none":
        return loss.to(dtype)
    total = loss.sum()
    if reduction == "mean":
        total = total / (target != ignore_index).sum()
    return total.to(dtype)


def cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                  inplace_backward=False):
    """torch.nn.functional.cross_entropy on logits [N, V], plus z_loss * logsumexp(logits)**2 per token.

    inplace_backward=True writes the gradient into the logits buffer instead of a new
    [N, V] tensor. Use it only when nothing else reads these logits after the loss's
    backward: no other loss or op consumes them, and you do not inspect them afterwards
    (logits produced by a matmul are fine: its backward needs its inputs, not its output).
    The logits must have a contiguous last dimension.
    """
    check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits: expected 2 dims [N, V]; got shape {tuple(logits.shape)}")
    check_loss_options(target, logits.shape[0], ignore_index, reduction, label_smoothing, z_loss, logits.shape[1])
    check_device(logits=logits, target=target)
    if inplace_backward and logits.stride(-1) != 1:
        raise ValueError("logits: inplace_backward needs a contiguous last dimension; got stride "
                         f"{logits.stride(-1)}")
    check_target_range(target, logits.shape[1], ignore_index)
    loss = CrossEntropyFunction.apply(logits, target, ignore_index, float(label_smoothing), float(z_loss),
                                      inplace_backward)
    return reduce_loss(loss, target, ignore_index, reduction, logits.dtype)


class CrossEntropyLoss(torch.nn.Module):
    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, inplace_backward=False):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.inplace_backward = label_smoothing, z_loss, inplace_backward

    def forward(self, logits, target):
        return cross_entropy(logits, target, self.ignore_index, self.reduction, self.label_smoothing, self.z_loss,
                             self.inplace_backward)
