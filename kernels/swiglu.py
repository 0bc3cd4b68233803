"""SwiGLU, silu(gate) * up (Llama's gated MLP), and GeGLU, gelu_tanh(gate) * up (Gemma's):
one set of kernels, the activation a compile-time choice.

Forward reads gate and up once and writes y; backward reads dy, gate and up
once and writes both gradients, recomputing the sigmoid instead of storing it.
gate and up may be row-strided views. Given the fused projection's output
[gate | up] as one tensor, the backward writes both gradients into one tensor of
that shape, so autograd makes no concatenation copy before the projection's
backward (one read and one write of [N, 2H] less per layer).
"""
import torch
import triton
import triton.language as tl

from ._launch import as_rows, check_device, check_float, check_same_dtype, op_on_target, plan_rows


# GELU's tanh form through a sigmoid: 0.5 (1 + tanh(a)) = sigmoid(2a), a = sqrt(2/pi) (g + 0.044715 g^3)
_GELU_2K = tl.constexpr(1.5957691216057308)  # 2 sqrt(2/pi)
_GELU_C = tl.constexpr(0.044715)


@triton.jit
def _gate_sigmoid(g, GELU: tl.constexpr):
    """s with act(g) = g * s: sigmoid(g) for SiLU, sigmoid(2a) for GELU's tanh form."""
    if GELU:
        s = tl.sigmoid(_GELU_2K * (g + _GELU_C * g * g * g))
    else:
        s = tl.sigmoid(g)
    return s


@triton.jit
def _swiglu_forward_kernel(G, U, Y, M, N, stride_g, stride_u, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                           GELU: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    g = tl.load(G + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g * _gate_sigmoid(g, GELU) * u
    tl.store(Y + rows64 * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(DY, G, U, DG, DU, M, N, stride_dy, stride_g, stride_u, stride_dgu,
                            ROWS: tl.constexpr, BLOCK_N: tl.constexpr, GELU: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _gate_sigmoid(g, GELU)
    silu = g * s  # act(g), SiLU's or GELU's
    if GELU:  # act' = s + g s (1 - s) 2a'
        dg = dy * u * (s + silu * (1.0 - s) * _GELU_2K * (1.0 + 3.0 * _GELU_C * g * g))
    else:
        dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * silu
    tl.store(DG + rows64 * stride_dgu + cols[None, :], dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows64 * stride_dgu + cols[None, :], du.to(DU.dtype.element_ty), mask=mask)


def plan_tiles(target, kernel, operands, m, n, activation):
    """The Plan of kernel over [m, n] in tiles of ROWS x BLOCK_N (at most 2048 values a
    program: an elementwise op needs no whole row), for activation "silu" or "gelu_tanh"."""
    block_n = min(triton.next_power_of_2(n), 2048)
    return plan_rows(target, kernel, operands, dict(BLOCK_N=block_n, GELU=activation == "gelu_tanh"), m, block_n,
                     columns=triton.cdiv(n, block_n), target_elements=2048)


@op_on_target("tinyfuse::swiglu_forward")
def swiglu_forward(target, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    g2, u2 = as_rows(gate), as_rows(up)
    m, n = g2.shape
    y = torch.empty((m, n), dtype=gate.dtype, device=gate.device)
    if y.numel() > 0:
        operands = dict(G=g2, U=u2, Y=y, M=m, N=n, stride_g=g2.stride(0), stride_u=u2.stride(0))
        target.launch(plan_tiles(target, _swiglu_forward_kernel, operands, m, n, activation), operands)
    return y.view(gate.shape)


@swiglu_forward.register_fake
def _(gate, up, activation):
    return gate.new_empty(gate.shape)


def _backward(target, dy, gate, up, dg, du, activation):
    """Launch the backward on row views; dg and du share one row stride (two tensors, or the halves of one)."""
    dy2, g2, u2 = as_rows(dy), as_rows(gate), as_rows(up)
    m, n = g2.shape
    if m * n > 0:
        operands = dict(DY=dy2, G=g2, U=u2, DG=dg, DU=du, M=m, N=n, stride_dy=dy2.stride(0), stride_g=g2.stride(0),
                        stride_u=u2.stride(0), stride_dgu=dg.stride(0))
        target.launch(plan_tiles(target, _swiglu_backward_kernel, operands, m, n, activation), operands)


@op_on_target("tinyfuse::swiglu_backward")
def swiglu_backward(target, dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = gate.shape[-1]
    dg = torch.empty((gate.numel() // max(n, 1), n), dtype=gate.dtype, device=gate.device)
    du = torch.empty_like(dg)
    _backward(target, dy, gate, up, dg, du, activation)
    return dg.view(gate.shape), du.view(up.shape)


@swiglu_backward.register_fake
def _(dy, gate, up, activation):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


@op_on_target("tinyfuse::swiglu_packed_backward")
def swiglu_packed_backward(target, dy: torch.Tensor, gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """The gradient of swiglu(gate_up) as one tensor shaped like gate_up ([..., 2H])."""
    n = gate_up.shape[-1] // 2
    dgu = torch.empty((gate_up.numel() // max(2 * n, 1), 2 * n), dtype=gate_up.dtype, device=gate_up.device)
    _backward(target, dy, gate_up[..., :n], gate_up[..., n:], dgu, dgu[:, n:], activation)
    return dgu.view(gate_up.shape)


@swiglu_packed_backward.register_fake
def _(dy, gate_up, activation):
    return gate_up.new_empty(gate_up.shape)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, activation):
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return torch.ops.tinyfuse.swiglu_forward(gate, up, activation)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return (*torch.ops.tinyfuse.swiglu_backward(dy, gate, up, ctx.activation), None)


class SwiGLUPackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, activation):
        ctx.save_for_backward(gate_up)
        ctx.activation = activation
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.ops.tinyfuse.swiglu_forward(gate, up, activation)

    @staticmethod
    def backward(ctx, dy):
        gate_up, = ctx.saved_tensors
        return torch.ops.tinyfuse.swiglu_packed_backward(dy, gate_up, ctx.activation), None


def swiglu(gate, up=None):
    """silu(gate) * up in float32 math, returned in gate's dtype.

    With up=None, gate is the fused projection's output [..., 2H] holding gate then
    up along its last dimension; the result is [..., H] and the gradient comes back
    as one [..., 2H] tensor.
    """
    return _gated(gate, up, "silu")


def geglu(gate, up=None):
    """gelu(gate, approximate="tanh") * up (Gemma's MLP), as swiglu in all else: the same
    kernels, the activation chosen when they are compiled."""
    return _gated(gate, up, "gelu_tanh")


def _gated(gate, up, activation):
    check_float("gate", gate)
    if gate.dim() == 0:
        raise ValueError("gate: expected at least one dimension; got a scalar")
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"gate: with up=None the last dim holds [gate | up] and must be even; "
                             f"got {gate.shape[-1]}")
        check_device(gate=gate)
        return SwiGLUPackedFunction.apply(gate, activation)
    check_float("up", up)
    check_same_dtype(gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"up: expected the shape of gate {tuple(gate.shape)}; got {tuple(up.shape)}")
    check_device(gate=gate, up=up)
    return SwiGLUFunction.apply(gate, up, activation)


class SwiGLU(torch.nn.Module):
    """The Llama MLP: w2(swiglu(w1 x, w3 x)), with w1 and w3 fused into one projection."""

    def __init__(self, dim, hidden_dim, device=None, dtype=None):
        super().__init__()
        self.w13 = torch.nn.Linear(dim, 2 * hidden_dim, bias=False, device=device, dtype=dtype)
        self.w2 = torch.nn.Linear(hidden_dim, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return self.w2(swiglu(self.w13(x)))
