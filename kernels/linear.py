"""x @ weight.T from a half working copy of a float32 master weight.

Under autocast every nn.Linear casts its float32 weight to bf16 in the forward and
autograd casts the bf16 weight gradient back to float32 in the backward: two cast
kernels per weight per micro-step (about 50 at stories15M, 100 at stories110M, plus a
fresh bf16 copy of the 32000 x D embedding for the loss). Training instead keeps one bf16
copy of every matrix, rewritten once per optimizer step (engine.model
Transformer.keep_working_copies), and `linear` reads it: the forward casts nothing, and
the weight gradient comes out of the GEMM in float32 (cuBLAS accumulates in float32 and
writes float32 from bf16 operands), so nothing is cast back either. The master weight
stays the autograd leaf: its gradient is float32, accumulated as such over micro-batches.

The float32-output products (`mm_float32`, `accumulate_float32`) are also what the fused
linear cross-entropy uses for its weight gradient. Whether a device has them is its
target's `float32_products` (kernels._launch.Target): cuBLAS does, CPU does not. The
model's weight gradient is an op (`tinyfuse::mm_float32`) so that the static report can
run it on its sm_90 target, as every other target-dependent choice (measured on this
CPU: 6.6 us of host time a call over its body's; a CUDA graph replays none of it).
"""
import torch
import torch.nn.functional as F

from ._launch import op_on_target


@op_on_target("tinyfuse::mm_float32", kernels=False)
def mm_float32(target, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result: where the target has float32 products (CUDA) the
    product stays on the bf16/fp16 tensor cores."""
    if a.dtype == torch.float32:
        return a @ b
    if target.float32_products:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


@mm_float32.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)


def accumulate_float32(target, acc, a, b):
    """acc += a @ b in place, acc float32; where the target has float32 products (CUDA)
    the product stays on the bf16/fp16 tensor cores and cuBLAS adds it into acc (beta = 1),
    with no float32 temporary."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif target.float32_products:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def check_working_copy(working, weight, dtype):
    """A one-line error for a working copy that is not weight's shape in the compute dtype."""
    if working.shape != weight.shape or working.dtype != dtype:
        raise ValueError(f"working_weight: expected weight's shape {tuple(weight.shape)} in {dtype}; "
                         f"got {tuple(working.shape)} in {working.dtype}")


class WorkingCopyLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, working):
        ctx.save_for_backward(x, working)
        return F.linear(x, working)

    @staticmethod
    def backward(ctx, grad_y):
        x, working = ctx.saved_tensors
        grad_x = grad_y @ working if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = mm_float32(grad_y.reshape(-1, grad_y.shape[-1]).T, x.reshape(-1, x.shape[-1]))
        return grad_x, grad_weight, None


def linear(x, weight, working=None):
    """F.linear(x, weight) (no bias). With `working`, a copy of weight in x's dtype that
    the caller keeps equal to weight.to(x.dtype), the product reads the copy and weight's
    gradient comes back in weight's dtype without a cast kernel either way. Inputs of
    another dtype than the copy (float32 evaluation, autocast off) take the plain path."""
    if working is None or x.dtype != working.dtype or weight.dtype != torch.float32:
        return F.linear(x, weight)
    return WorkingCopyLinear.apply(x, weight, working)
