"""Cross-entropy of hidden @ weight.T (+ bias), its [N, V] logits never kept as logits,
seen through cross_entropy's logit scale and soft cap.

Two paths, chosen by the size of the logits against a memory budget:

- Stored gradient (the [N, V] tensor fits the budget and a gradient is wanted): one
  matmul writes the logits, and one cross-entropy launch reduces them to per-row
  loss and logsumexp and turns them in place into the gradient of each row's loss
  with unit weight (the second pass over a row reads it from L2). The backward only scales: with g the per-row upstream
  gradient, grad_hidden = g * (G @ weight) and grad_weight = G.T @ (g * hidden), so
  any reduction works and no matmul is repeated (3 matmuls of N*V*D, not 4).
- Chunked (larger, or no gradient wanted): tokens go through in chunks, each
  chunk's logits computed, reduced and dropped; the backward recomputes each chunk's
  logits (the same matmul, so the same bits), turns them into their gradient with
  the saved logsumexp and folds them into grad_hidden and a float32 grad_weight.
  Peak extra memory is one chunk of logits plus the gradients.

The budget defaults to 1/8 of the device's memory on CUDA (a fixed figure, not the
free memory of the moment: the choice must be the same every step, for CUDA graphs
and compiled graphs alike) and 256 MiB elsewhere; memory_budget=0 forces chunks. The
forward op decides, from its target's memory (kernels._launch.Target).
"""
from typing import Optional

import torch

from ._launch import check_device, check_float, check_same_dtype, op_on_target, target_of
from .linear import accumulate_float32, check_working_copy, mm_float32
from .cross_entropy import (check_logit_transform, check_loss_options, check_target_range, cross_entropy_grad_rows,
                            cross_entropy_rows, reduce_loss)


def default_chunk_size(n, v, d):
    """Rows per chunk: chunk logits of max(n * d, 2^26) elements (the size of hidden, or
    128 MiB in bf16 when hidden is smaller, so each matmul is large enough to run
    near peak), rounded down to a power of two, at least 256 rows, at most n."""
    rows = max(n * d, 1 << 26) // v
    return max(1, min(n, max(256, 1 << max(rows, 1).bit_length() - 1)))


def stores_gradient(target, n, v, itemsize, wants_grad, memory_budget):
    """Whether the forward forms the [N, V] gradient: a gradient is wanted and it fits the
    budget (None: 1/8 of the target's memory; the interpreter's and CPU's is 256 MiB)."""
    budget = target.memory // 8 if memory_budget is None else memory_budget
    return wants_grad and n * v * itemsize <= budget


def _logits(hidden, weight, bias):
    """hidden @ weight.T (+ bias, in the same GEMM): the forward and the backward's
    recomputation make the same call, so the same bits."""
    return hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)


@op_on_target("tinyfuse::linear_cross_entropy_forward")
def linear_cross_entropy_forward(target, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                 target_ids: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                                 logit_scale: float, softcap: float, chunk_size: int, wants_grad: bool,
                                 memory_budget: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row float32 loss and logsumexp; when the gradient is stored (stores_gradient)
    also the unit-weight gradient of the logits [N, V] (otherwise an empty [0, V] tensor)."""
    n, v = hidden.shape[0], weight.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if stores_gradient(target, n, v, hidden.element_size(), wants_grad, memory_budget):
        grad_logits = _logits(hidden, weight, bias)
        unit = torch.ones((), dtype=torch.float32, device=hidden.device)
        cross_entropy_rows(target, grad_logits, target_ids, ignore_index, label_smoothing, z_loss, loss, lse,
                           grad_logits, unit, logit_scale, softcap)
        return loss, lse, grad_logits
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        cross_entropy_rows(target, _logits(hidden[rows], weight, bias), target_ids[rows], ignore_index,
                           label_smoothing, z_loss, loss[rows], lse[rows], logit_scale=logit_scale, softcap=softcap)
    return loss, lse, hidden.new_empty((0, v))


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, bias, target_ids, ignore_index, label_smoothing, z_loss, logit_scale, softcap, chunk_size,
      wants_grad, memory_budget):
    n, v = hidden.shape[0], weight.shape[0]
    stored = stores_gradient(target_of(hidden.device), n, v, hidden.element_size(), wants_grad, memory_budget)
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32),
            hidden.new_empty((n if stored else 0, v)))


@op_on_target("tinyfuse::linear_cross_entropy_backward")
def linear_cross_entropy_backward(target, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                  target_ids: torch.Tensor, lse: torch.Tensor, grad_logits: torch.Tensor,
                                  grad_loss: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                                  logit_scale: float, softcap: float,
                                  chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of hidden (its dtype), weight and bias (float32; bias's empty without one)
    from the stored unit-weight gradient (when grad_logits has rows) or by recomputing
    each chunk's logits. The bias's gradient is the column sums of the logits' gradient,
    a product with a vector (of g, or of ones) so that it accumulates in float32 as the
    weight's does."""
    n, v = hidden.shape[0], weight.shape[0]
    if grad_logits.shape[0] == n and n > 0:
        # Ignored rows carry a zero gradient whatever the upstream value (inf for an all-ignored "mean").
        g = torch.where(target_ids != ignore_index, grad_loss, 0.0)[:, None]
        grad_hidden = (mm_float32.on_target(target, grad_logits, weight) * g).to(hidden.dtype)
        grad_bias = (mm_float32.on_target(target, grad_logits.T, g.to(hidden.dtype))[:, 0] if bias is not None
                     else g.new_empty(0))
        return grad_hidden, mm_float32.on_target(target, grad_logits.T, (hidden * g).to(hidden.dtype)), grad_bias
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    grad_bias = torch.zeros((v if bias is not None else 0, 1), dtype=torch.float32, device=weight.device)
    ones = hidden.new_ones((min(chunk_size, n), 1)) if bias is not None else None
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        logits = _logits(hidden[rows], weight, bias)
        cross_entropy_grad_rows(target, logits, target_ids[rows], lse[rows], grad_loss[rows], ignore_index,
                                label_smoothing, z_loss, logits, logit_scale, softcap)
        torch.mm(logits, weight, out=grad_hidden[rows])
        accumulate_float32(target, grad_weight, logits.T, hidden[rows])
        if bias is not None:
            accumulate_float32(target, grad_bias, logits.T, ones[: logits.shape[0]])
    return grad_hidden, grad_weight, grad_bias[:, 0]


@linear_cross_entropy_backward.register_fake
def _(hidden, weight, bias, target_ids, lse, grad_logits, grad_loss, ignore_index, label_smoothing, z_loss,
      logit_scale, softcap, chunk_size):
    return (hidden.new_empty(hidden.shape), weight.new_empty(weight.shape, dtype=torch.float32),
            weight.new_empty(weight.shape[0] if bias is not None else 0, dtype=torch.float32))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, logit_scale, softcap,
                chunk_size, wants_grad, memory_budget, working_weight):
        # Float32 master weights with half activations: the products run in hidden's dtype
        # (from the caller's working copy, else from one cast), and the weight's gradient
        # comes back from its float32 accumulation as it is (never rounded to half and
        # cast back).
        w = weight.to(hidden.dtype) if working_weight is None else working_weight
        b = bias.to(hidden.dtype) if bias is not None else None
        loss, lse, grad_logits = torch.ops.tinyfuse.linear_cross_entropy_forward(
            hidden, w, b, target, ignore_index, label_smoothing, z_loss, logit_scale, softcap, chunk_size, wants_grad,
            memory_budget)
        ctx.save_for_backward(hidden, w, b, target, lse, grad_logits)
        ctx.options = ignore_index, label_smoothing, z_loss, logit_scale, softcap, chunk_size
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, bias.dtype if bias is not None else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, w, b, target, lse, grad_logits = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = torch.ops.tinyfuse.linear_cross_entropy_backward(
            hidden, w, b, target, lse, grad_logits, grad_loss, *ctx.options)
        grad_bias = grad_bias.to(ctx.bias_dtype) if b is not None else None
        return (grad_hidden, grad_weight.to(ctx.weight_dtype), grad_bias, None, None, None, None, None, None, None,
                None, None, None)


def linear_cross_entropy(hidden, weight, target, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, chunk_size=None, memory_budget=None, working_weight=None, softcap=None,
                         logit_scale=1.0, bias=None):
    """cross_entropy(hidden @ weight.T + bias, target, ..., softcap, logit_scale) for hidden
    [N, D], weight [V, D] and an optional bias [V] (its gradient accumulated in float32).

    When a gradient is wanted and the [N, V] gradient fits memory_budget bytes (None:
    1/8 of a CUDA device's memory, 256 MiB elsewhere), it is formed in the forward and
    the backward needs no second logits matmul; otherwise tokens go through chunk by
    chunk (chunk_size rows; chosen from N, V and D when None) and the backward
    recomputes them. A tied embedding matrix works as weight: gradients reach both.
    weight may be float32 with half hidden (master weights): the products run in hidden's
    dtype and the weight's gradient is returned in float32, as accumulated; working_weight,
    a copy of that weight in hidden's dtype kept by the caller (training's working
    copies, see tinyfuse.kernels.linear), saves casting it at every call."""
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dtype != torch.float32:
        check_same_dtype(hidden=hidden, weight=weight)
    if working_weight is not None:
        check_working_copy(working_weight, weight, hidden.dtype)
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected 2 dims [N, D]; got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected shape (V, {hidden.shape[1]}) to match hidden's D; "
                         f"got {tuple(weight.shape)}")
    check_loss_options(target, hidden.shape[0], ignore_index, reduction, label_smoothing, z_loss, weight.shape[0])
    logit_scale, softcap = check_logit_transform(logit_scale, softcap)
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), one a class; got {tuple(bias.shape)}")
    check_device(hidden=hidden, weight=weight, target=target, **({"bias": bias} if bias is not None else {}))
    n, d = hidden.shape
    v = weight.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(n, v, d)
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None; got {chunk_size!r}")
    if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget < 0):
        raise ValueError(f"memory_budget: expected bytes as an int >= 0 or None; got {memory_budget!r}")
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or
                                              (bias is not None and bias.requires_grad))
    check_target_range(target, v, ignore_index)
    loss = LinearCrossEntropyFunction.apply(hidden, weight, bias, target, ignore_index, float(label_smoothing),
                                            float(z_loss), logit_scale, softcap, chunk_size, wants_grad,
                                            memory_budget, working_weight)
    return reduce_loss(loss, target, ignore_index, reduction).to(hidden.dtype)


class LinearCrossEntropyLoss(torch.nn.Module):
    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, chunk_size=None,
                 memory_budget=None, softcap=None, logit_scale=1.0):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.chunk_size = label_smoothing, z_loss, chunk_size
        self.memory_budget, self.softcap, self.logit_scale = memory_budget, softcap, logit_scale

    def forward(self, hidden, weight, target, bias=None):
        return linear_cross_entropy(hidden, weight, target, self.ignore_index, self.reduction, self.label_smoothing,
                                    self.z_loss, self.chunk_size, self.memory_budget, softcap=self.softcap,
                                    logit_scale=self.logit_scale, bias=bias)
