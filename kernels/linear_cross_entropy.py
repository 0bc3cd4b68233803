"""Cross-entropy of hidden @ weight.T without ever holding the [N, V] logits.

Tokens go through in chunks: each chunk's logits are computed by one matmul,
reduced to per-row loss and logsumexp by the cross-entropy kernel, and dropped.
The backward recomputes each chunk's logits (the same matmul, so the same bits),
turns them into their gradient in place with the saved logsumexp, and folds
them into grad_hidden and a float32 grad_weight. Peak extra memory is one chunk
of logits plus the gradients (grad_weight accumulated in float32); the price is
one more matmul than the materialised path.
"""
import torch

from ._launch import check_device, check_float, check_same_dtype
from .cross_entropy import (check_loss_options, check_target_range, cross_entropy_grad_rows, cross_entropy_rows,
                            reduce_loss)


def default_chunk_size(n, v, d):
    """Rows per chunk: chunk logits of max(n * d, 2^26) elements (the size of hidden, or
    128 MiB in bf16 when hidden is smaller, so each matmul is large enough to run
    near peak), rounded down to a power of two, at least 256 rows, at most n."""
    rows = max(n * d, 1 << 26) // v
    return max(1, min(n, max(256, 1 << max(rows, 1).bit_length() - 1)))


def _accumulate_float32(acc, a, b):
    """acc += a @ b in place, acc float32; on CUDA the product stays on the bf16/fp16
    tensor cores and cuBLAS adds it into acc (beta = 1), with no float32 temporary."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


@torch.library.custom_op("tinyfuse::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                 ignore_index: int, label_smoothing: float, z_loss: float,
                                 chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        logits = hidden[rows] @ weight.T
        cross_entropy_rows(logits, target[rows], ignore_index, label_smoothing, z_loss, loss[rows], lse[rows])
    return loss, lse


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, target, ignore_index, label_smoothing, z_loss, chunk_size):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("tinyfuse::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                  lse: torch.Tensor, grad_loss: torch.Tensor, ignore_index: int,
                                  label_smoothing: float, z_loss: float,
                                  chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = hidden.shape[0]
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        logits = hidden[rows] @ weight.T
        cross_entropy_grad_rows(logits, target[rows], lse[rows], grad_loss[rows], ignore_index, label_smoothing,
                                z_loss, logits)
        torch.mm(logits, weight, out=grad_hidden[rows])
        _accumulate_float32(grad_weight, logits.T, hidden[rows])
    return grad_hidden, grad_weight.to(weight.dtype)


@linear_cross_entropy_backward.register_fake
def _(hidden, weight, target, lse, grad_loss, ignore_index, label_smoothing, z_loss, chunk_size):
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index, label_smoothing, z_loss, chunk_size):
        loss, lse = torch.ops.tinyfuse.linear_cross_entropy_forward(hidden, weight, target, ignore_index,
                                                                    label_smoothing, z_loss, chunk_size)
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.options = ignore_index, label_smoothing, z_loss, chunk_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, target, lse = ctx.saved_tensors
        grad_hidden, grad_weight = torch.ops.tinyfuse.linear_cross_entropy_backward(
            hidden, weight, target, lse, grad_loss, *ctx.options)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(hidden, weight, target, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, chunk_size=None):
    """cross_entropy(hidden @ weight.T, target, ...) for hidden [N, D] and weight [V, D],
    computed chunk by chunk (chunk_size rows; chosen from N, V and D when None). A tied
    embedding matrix works as weight: gradients reach both hidden and weight."""
    check_float("hidden", hidden)
    check_float("weight", weight)
    check_same_dtype(hidden=hidden, weight=weight)
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected 2 dims [N, D]; got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected shape (V, {hidden.shape[1]}) to match hidden's D; "
                         f"got {tuple(weight.shape)}")
    check_loss_options(target, hidden.shape[0], ignore_index, reduction, label_smoothing, z_loss, weight.shape[0])
    check_device(hidden=hidden, weight=weight, target=target)
    n, d = hidden.shape
    v = weight.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(n, v, d)
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None; got {chunk_size!r}")
    check_target_range(target, v, ignore_index)
    loss = LinearCrossEntropyFunction.apply(hidden, weight, target, ignore_index, float(label_smoothing),
                                            float(z_loss), chunk_size)
    return reduce_loss(loss, target, ignore_index, reduction, hidden.dtype)


class LinearCrossEntropyLoss(torch.nn.Module):
    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, chunk_size=None):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.chunk_size = label_smoothing, z_loss, chunk_size

    def forward(self, hidden, weight, target):
        return linear_cross_entropy(hidden, weight, target, self.ignore_index, self.reduction, self.label_smoothing,
                                    self.z_loss, self.chunk_size)
