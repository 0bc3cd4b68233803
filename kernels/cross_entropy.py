"""Cross-entropy over [N, V] logits, with label smoothing, PaLM's z-loss, and the logit
transforms of Granite (a logit scale) and Gemma 2 (soft-capping: cap * tanh(logits / cap)),
applied inside the same pass.

Forward: one read of the logits. Each program streams one row in vocabulary
blocks with an online softmax (a running max per row and a rescaled running sum,
float32: one exponential per element), and writes the row's loss and logsumexp.
For "mean" and "sum" when a gradient is wanted, the same program then reads its
row again (from L2: a row is at most a few hundred KB) and writes the gradient,
so the logits leave DRAM once; the backward only rescales it when its upstream
gradient is not exactly 1, decided on the device. For "none" the backward reads
the logits again. The count of non-ignored tokens stays on the device: nothing
synchronises.

Gradient accumulation: over micro-batches, sum `cross_entropy(..., reduction="sum")`
and divide by the total count of non-ignored targets of the whole batch
(`(target != ignore_index).sum()` over all micro-batches, a device tensor); the
loss and the gradients then equal the full batch's "mean".

Targets outside [0, V) other than ignore_index: with TINYFUSE_DEBUG=1 the call
raises (at the cost of a host sync); otherwise no memory outside the row is read
and the row's loss and gradient are NaN, so the error shows in the loss.
"""
import dataclasses
import math
import os

import torch
import triton
import triton.language as tl

from ._launch import Plan, check_device, check_float, op_on_target, resident_programs, unit_last_stride, warps_for

_FLOOR = tl.constexpr(-1.0e30)  # stands in for -inf in masked lanes: exp(_FLOOR - m) is 0, never NaN


@triton.jit
def _logit(x, LOGIT_SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """The logit the softmax sees, in float32: x * LOGIT_SCALE, then soft-capped to
    SOFTCAP * tanh(. / SOFTCAP) when SOFTCAP > 0. Each step is compiled in only where it is
    asked for, so the plain loss's kernels stay as they were."""
    x = x.to(tl.float32)
    if LOGIT_SCALE != 1.0:
        x = x * LOGIT_SCALE
    if SOFTCAP > 0.0:
        # tanh(u) = 1 - 2 / (exp(2u) + 1): exact at both ends (exp overflows to inf: 1;
        # underflows to 0: -1), absolute error ~1e-7 near 0, which the cap multiplies
        x = SOFTCAP * (1.0 - 2.0 / (tl.exp(x * (2.0 / SOFTCAP)) + 1.0))
    return x


@triton.jit
def _store_grad_row(x_row, dx_row, target, lse, upstream, ignore_index, V, label_smoothing, z_loss,
                    BLOCK_V: tl.constexpr, LOGIT_SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """One row's gradient times upstream into dx_row: softmax (times the z-loss factor) less
    the smoothed one-hot target, times the logit transform's slope. Ignored rows get
    exactly 0, even when upstream is inf (an all-ignored "mean"); an out-of-range target
    gets NaN."""
    scale = tl.where(target != ignore_index, upstream, 0.0)
    scale = tl.where((target == ignore_index) | ((target >= 0) & (target < V)), scale, float("nan"))
    p_scale = 1.0 + 2.0 * z_loss * lse
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = _logit(tl.load(x_row + cols, mask=mask, other=0.0), LOGIT_SCALE, SOFTCAP)
        grad = tl.exp(x - lse) * p_scale - label_smoothing / V - tl.where(cols == target, 1.0 - label_smoothing, 0.0)
        # times d logit / d x = LOGIT_SCALE * (1 - (logit / SOFTCAP)^2), each factor only where asked for
        if SOFTCAP > 0.0:
            u = x / SOFTCAP
            grad = grad * (1.0 - u * u)
        if LOGIT_SCALE != 1.0:
            grad = grad * LOGIT_SCALE
        tl.store(dx_row + cols, (grad * scale).to(dx_row.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_forward_kernel(X, TARGET, LOSS, LSE, DX, GRAD_SCALE, V, stride_x, stride_dx, ignore_index,
                                  label_smoothing, z_loss, BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr,
                                  LOGIT_SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """One row: its loss and logsumexp, and with WRITE_GRAD its gradient times the device
    scalar GRAD_SCALE, written from a second pass over the row (read again from L2).
    The running max is one scalar per row, so each element takes one exponential a pass."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    m = tl.full([], _FLOOR, tl.float32)
    d = tl.zeros([], tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.where(mask, _logit(tl.load(x_row + cols, mask=mask, other=0.0), LOGIT_SCALE, SOFTCAP), _FLOOR)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)  # masked lanes: exp(_FLOOR - m) = 0
        s += tl.where(mask, x, 0.0)
        m = m_new
    lse = m + tl.log(d)
    target = tl.load(TARGET + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    x_target = _logit(tl.load(x_row + target, mask=valid & in_range, other=0.0), LOGIT_SCALE, SOFTCAP)
    loss = lse - (1.0 - label_smoothing) * x_target - label_smoothing * tl.sum(s, axis=0) / V + z_loss * lse * lse
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, lse)
    if WRITE_GRAD:
        _store_grad_row(x_row, DX + row * stride_dx, target, lse, tl.load(GRAD_SCALE), ignore_index, V,
                        label_smoothing, z_loss, BLOCK_V, LOGIT_SCALE, SOFTCAP)


@triton.jit
def _cross_entropy_backward_kernel(X, TARGET, LSE, DLOSS, DX, V, stride_x, stride_dx, stride_dloss, ignore_index,
                                   label_smoothing, z_loss, BLOCK_V: tl.constexpr, LOGIT_SCALE: tl.constexpr,
                                   SOFTCAP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _store_grad_row(X + row * stride_x, DX + row * stride_dx, tl.load(TARGET + row), tl.load(LSE + row),
                    tl.load(DLOSS + row * stride_dloss), ignore_index, V, label_smoothing, z_loss, BLOCK_V,
                    LOGIT_SCALE, SOFTCAP)


@triton.jit
def _scale_unless_one_kernel(G, SCALE, N, V, stride_g, blocks_per_program, BLOCK_V: tl.constexpr):
    """G *= SCALE in place, and nothing at all (no read, no write) when SCALE is exactly 1:
    the upstream gradient of a loss's own backward(). Decided on the device: no sync. One
    wave of programs, each taking blocks_per_program consecutive [1, BLOCK_V] blocks: at a
    unit scale the launch is that one wave of programs that return at once (a program a
    block was 131,072 of them at 16384 x 32000)."""
    scale = tl.load(SCALE).to(tl.float32)
    if scale != 1.0:
        col_blocks = tl.cdiv(V, BLOCK_V)
        for i in range(0, blocks_per_program):
            block = tl.program_id(0).to(tl.int64) * blocks_per_program + i
            row = block // col_blocks
            cols = (block % col_blocks) * BLOCK_V + tl.arange(0, BLOCK_V)
            mask = (cols < V) & (row < N)
            g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(G + row * stride_g + cols, (g * scale).to(G.dtype.element_ty), mask=mask)


# The static report counts no bytes for this kernel: what it moves at a unit scale.
_scale_unless_one_kernel.moves_nothing_at_unit_scale = True


def _block_v(v):
    return min(triton.next_power_of_2(v), 4096)


def _row_warps(block_v):
    """Warps for a row's blocks: 8 at 4096 wide, fewer for narrower rows, so each thread
    keeps at least 8 elements (16-byte loads of 16-bit logits: at V = 512, 8 warps made
    them 4-byte)."""
    return warps_for(block_v, per_thread=8, least=1, most=8)


def plan_row_kernel(kernel, n, v, **constexprs):
    """One program a row of V logits, in blocks of min(V, 4096)."""
    block_v = _block_v(v)
    return Plan(kernel, (n,), _row_warps(block_v), (("BLOCK_V", block_v), *constexprs.items()))


def cross_entropy_rows(target, logits, target_ids, ignore_index, label_smoothing, z_loss, loss, lse, grad_logits=None,
                       grad_scale=None, logit_scale=1.0, softcap=0.0):
    """Per-row float32 loss and logsumexp of logits [N, V] (seen through the logit scale
    and the soft cap; softcap 0: none) into loss and lse; with grad_logits (may be logits
    itself) also the rows' gradient times the device scalar grad_scale, in the same
    launch (launch only)."""
    n, v = logits.shape
    write_grad = grad_logits is not None
    if n > 0:
        plan = plan_row_kernel(_cross_entropy_forward_kernel, n, v, WRITE_GRAD=write_grad, LOGIT_SCALE=logit_scale,
                               SOFTCAP=softcap)
        target.launch(plan, dict(X=logits, TARGET=target_ids, LOSS=loss, LSE=lse,
                                 DX=grad_logits if write_grad else logits, GRAD_SCALE=grad_scale if write_grad else lse,
                                 V=v, stride_x=logits.stride(0), stride_dx=grad_logits.stride(0) if write_grad else 0,
                                 ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss))


def cross_entropy_grad_rows(target, logits, target_ids, lse, grad_loss, ignore_index, label_smoothing, z_loss,
                            grad_logits, logit_scale=1.0, softcap=0.0):
    """Gradient of the per-row losses, scaled by grad_loss [N], into grad_logits (may be logits itself)."""
    n, v = logits.shape
    if n > 0:
        plan = plan_row_kernel(_cross_entropy_backward_kernel, n, v, LOGIT_SCALE=logit_scale, SOFTCAP=softcap)
        target.launch(plan, dict(X=logits, TARGET=target_ids, LSE=lse, DLOSS=grad_loss, DX=grad_logits, V=v,
                                 stride_x=logits.stride(0), stride_dx=grad_logits.stride(0),
                                 stride_dloss=grad_loss.stride(0), ignore_index=ignore_index,
                                 label_smoothing=label_smoothing, z_loss=z_loss))


@op_on_target("tinyfuse::cross_entropy_forward")
def cross_entropy_forward(target, logits: torch.Tensor, target_ids: torch.Tensor, ignore_index: int,
                          label_smoothing: float, z_loss: float, logit_scale: float,
                          softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = unit_last_stride(logits)
    n = logits.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    cross_entropy_rows(target, logits, target_ids, ignore_index, label_smoothing, z_loss, loss, lse,
                       logit_scale=logit_scale, softcap=softcap)
    return loss, lse


@cross_entropy_forward.register_fake
def _(logits, target_ids, ignore_index, label_smoothing, z_loss, logit_scale, softcap):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@op_on_target("tinyfuse::cross_entropy_backward", mutates_args=("grad_logits",))
def cross_entropy_backward(target, logits: torch.Tensor, target_ids: torch.Tensor, lse: torch.Tensor,
                           grad_loss: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                           logit_scale: float, softcap: float, grad_logits: torch.Tensor) -> None:
    cross_entropy_grad_rows(target, unit_last_stride(logits), target_ids, lse, grad_loss, ignore_index,
                            label_smoothing, z_loss, grad_logits, logit_scale, softcap)


@cross_entropy_backward.register_fake
def _(logits, target_ids, lse, grad_loss, ignore_index, label_smoothing, z_loss, logit_scale, softcap, grad_logits):
    return None


@op_on_target("tinyfuse::cross_entropy_forward_grad", mutates_args=("grad_logits",))
def cross_entropy_forward_grad(target, logits: torch.Tensor, target_ids: torch.Tensor, grad_scale: torch.Tensor,
                               ignore_index: int, label_smoothing: float, z_loss: float, logit_scale: float,
                               softcap: float, grad_logits: torch.Tensor) -> torch.Tensor:
    """Per-row float32 losses, and into grad_logits (may be logits itself) the gradient of
    their sum times grad_scale, a float32 device scalar, in one launch."""
    n = logits.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    cross_entropy_rows(target, unit_last_stride(logits), target_ids, ignore_index, label_smoothing, z_loss, loss, lse,
                       grad_logits, grad_scale, logit_scale, softcap)
    return loss


@cross_entropy_forward_grad.register_fake
def _(logits, target_ids, grad_scale, ignore_index, label_smoothing, z_loss, logit_scale, softcap, grad_logits):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def plan_scale(target, operands, blocks):
    """One wave of programs at most (sized with 2 blocks a program: 1 would be specialised
    into a different binary), each taking an equal run of [1, 4096] blocks."""
    plan = Plan(_scale_unless_one_kernel, (1,), 8, (("BLOCK_V", 4096),))
    programs = min(blocks, resident_programs(target, plan, dict(operands, blocks_per_program=2)))
    return dataclasses.replace(plan, grid=(programs,)), triton.cdiv(blocks, programs)


@op_on_target("tinyfuse::scale_gradient_", mutates_args=("grad",))
def scale_gradient_(target, grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad [N, V] *= scale (a device scalar) in place; no memory is touched when scale is 1."""
    n, v = grad.shape
    if grad.numel() > 0:
        operands = dict(G=grad, SCALE=scale, N=n, V=v, stride_g=grad.stride(0))
        plan, per_program = plan_scale(target, operands, n * triton.cdiv(v, 4096))
        target.launch(plan, dict(operands, blocks_per_program=per_program))


@scale_gradient_.register_fake
def _(grad, scale):
    return None


class CrossEntropyFunction(torch.autograd.Function):
    """Returns the reduced float32 loss ("mean", "sum") or the per-row losses ("none").

    "mean" and "sum" with a gradient wanted: the forward writes the gradient for an
    upstream gradient of 1 (1/count per row for "mean", count a device tensor) from one
    read of the logits, and the backward only rescales it, and only when the upstream
    gradient is not exactly 1. "none", where each row has its own upstream gradient:
    the backward reads the logits again.
    """

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, z_loss, inplace_backward, reduction, logit_scale,
                softcap):
        ctx.stored = reduction != "none" and ctx.needs_input_grad[0]
        if ctx.stored:
            count = (target != ignore_index).sum()
            scale = 1.0 / count if reduction == "mean" else torch.ones((), dtype=torch.float32, device=logits.device)
            grad = logits if inplace_backward else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            loss = torch.ops.tinyfuse.cross_entropy_forward_grad(logits, target, scale.float(), ignore_index,
                                                                 label_smoothing, z_loss, logit_scale, softcap, grad)
            ctx.save_for_backward(grad)
            return loss.sum() / count if reduction == "mean" else loss.sum()
        loss, lse = torch.ops.tinyfuse.cross_entropy_forward(logits, target, ignore_index, label_smoothing, z_loss,
                                                             logit_scale, softcap)
        ctx.save_for_backward(logits, target, lse)
        ctx.options = ignore_index, label_smoothing, z_loss, logit_scale, softcap, inplace_backward
        return reduce_loss(loss, target, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.stored:
            (grad,) = ctx.saved_tensors
            torch.ops.tinyfuse.scale_gradient_(grad, grad_loss.float())
            return grad, None, None, None, None, None, None, None, None
        logits, target, lse = ctx.saved_tensors
        ignore_index, label_smoothing, z_loss, logit_scale, softcap, inplace_backward = ctx.options
        grad = logits if inplace_backward else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        torch.ops.tinyfuse.cross_entropy_backward(logits, target, lse, grad_loss, ignore_index, label_smoothing,
                                                  z_loss, logit_scale, softcap, grad)
        return grad, None, None, None, None, None, None, None, None


REDUCTIONS = ("mean", "sum", "none")


def check_logit_transform(logit_scale, softcap):
    """The logit scale and soft cap as the kernels take them (softcap None: 0.0, none)."""
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale: expected a finite number > 0; got {logit_scale!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap: expected None or a finite number > 0; got {softcap!r}")
    return float(logit_scale), float(softcap or 0.0)


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


def reduce_loss(loss, target, ignore_index, reduction):
    """Reduce float32 per-row losses like torch: "mean" divides by the non-ignored count (NaN when it is 0)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / (target != ignore_index).sum() if reduction == "mean" else total


def cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                  inplace_backward=False, softcap=None, logit_scale=1.0):
    """torch.nn.functional.cross_entropy on logits [N, V], plus z_loss * logsumexp(logits)**2 per token.

    The softmax sees logits * logit_scale (Granite's 1 / logits_scaling), soft-capped to
    softcap * tanh(. / softcap) when softcap is given (Gemma 2's final_logit_softcapping),
    formed in the kernels as the logits are read; the gradient goes through both.

    With "mean" or "sum" and logits that need a gradient, the gradient is written during
    this call (one read of the logits in all) and the backward only scales it when its
    upstream gradient is not exactly 1; it serves one backward pass.

    inplace_backward=True writes the gradient into the logits buffer instead of a new
    [N, V] tensor: during this call for "mean" and "sum", in the backward for "none". Use
    it only when nothing else reads these logits afterwards: no other loss or op consumes
    them, and you do not inspect them (logits produced by a matmul are fine: its backward
    needs its inputs, not its output). The logits must have a contiguous last dimension.
    """
    check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits: expected 2 dims [N, V]; got shape {tuple(logits.shape)}")
    check_loss_options(target, logits.shape[0], ignore_index, reduction, label_smoothing, z_loss, logits.shape[1])
    check_device(logits=logits, target=target)
    if inplace_backward and logits.stride(-1) != 1:
        raise ValueError("logits: inplace_backward needs a contiguous last dimension; got stride "
                         f"{logits.stride(-1)}")
    logit_scale, softcap = check_logit_transform(logit_scale, softcap)
    check_target_range(target, logits.shape[1], ignore_index)
    loss = CrossEntropyFunction.apply(logits, target, ignore_index, float(label_smoothing), float(z_loss),
                                      inplace_backward, reduction, logit_scale, softcap)
    return loss.to(logits.dtype)


class CrossEntropyLoss(torch.nn.Module):
    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, inplace_backward=False,
                 softcap=None, logit_scale=1.0):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.inplace_backward = label_smoothing, z_loss, inplace_backward
        self.softcap, self.logit_scale = softcap, logit_scale

    def forward(self, logits, target):
        return cross_entropy(logits, target, self.ignore_index, self.reduction, self.label_smoothing, self.z_loss,
                             self.inplace_backward, self.softcap, self.logit_scale)
