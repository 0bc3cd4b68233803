"""RMSNorm and the fused residual-add + RMSNorm of a pre-norm Llama block.

Forward: one read of x (and the residual), one write of y (and h = x + residual),
plus a float32 rstd per row kept for the backward. Backward: one read of dy, h
and rstd, one write of dx. The weight gradient is summed by each program into its
own float32 partial row, and the partials by a small kernel in a fixed order (no
atomics), so gradients are bit-identical from run to run. The backward runs one
wave of programs, sized from the compiled kernel's registers and shared memory (the
fewest partials that keep every SM busy; fewer where rows are so few that the
partials would weigh), each looping over its rows in two pipelined stages.
"""
import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import (Plan, as_rows, check_device, check_float, check_hidden, check_same_dtype, op_on_target,
                      plan_rows, resident_programs, warps_for)


@triton.jit
def _scale(w, OFFSET: tl.constexpr):
    """The norm's scale in float32: w, or OFFSET + w (Gemma's 1 + w), the add compiled in
    only where it is asked for, so the kernels without it stay as they were."""
    w = w.to(tl.float32)
    if OFFSET != 0.0:
        w = w + OFFSET
    return w


@triton.jit
def _load_h(X, R, H, rows64, cols, mask, N, stride_x, stride_r, HAS_RESIDUAL: tl.constexpr):
    """x, or h = x + residual (written to H), for a [rows, cols] tile. h is rounded to the
    input dtype first: the norm sees exactly the h it returns."""
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + rows64[:, None] * N + cols[None, :], x, mask=mask)
    return x


@triton.jit
def _rms_norm_forward_kernel(X, R, W, Y, H, RSTD, M, N, stride_x, stride_r, eps, OFFSET: tl.constexpr,
                             HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                             CHUNKS: tl.constexpr):
    """y (and h = x + residual) for ROWS rows held in registers; or, CHUNKS > 1 (ROWS == 1),
    one row too wide to hold, in two passes over CHUNKS pieces: the sum of squares (h
    written on the way), then y from the row read again (from L2). The scale is
    OFFSET + w (Gemma's 1 + w), added in float32 as the weight is read (see _scale)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    if CHUNKS == 1:
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        xf = _load_h(X, R, H, rows64, cols, mask, N, stride_x, stride_r, HAS_RESIDUAL).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)
        w = _scale(tl.load(W + cols, mask=col_mask, other=0.0), OFFSET)
        y = xf * rstd[:, None] * w[None, :]
        tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for chunk in range(0, CHUNKS):
            c_cols = chunk * BLOCK_N + cols
            mask = row_mask[:, None] & (c_cols < N)[None, :]
            xf = _load_h(X, R, H, rows64, c_cols, mask, N, stride_x, stride_r, HAS_RESIDUAL).to(tl.float32)
            acc += xf * xf
        rstd = tl.math.rsqrt(tl.sum(acc, axis=1) / N + eps)
        for chunk in range(0, CHUNKS):
            c_cols = chunk * BLOCK_N + cols
            mask = row_mask[:, None] & (c_cols < N)[None, :]
            if HAS_RESIDUAL:
                xf = tl.load(H + rows64[:, None] * N + c_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                xf = tl.load(X + rows64[:, None] * stride_x + c_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            w = _scale(tl.load(W + c_cols, mask=c_cols < N, other=0.0), OFFSET)
            y = xf * rstd[:, None] * w[None, :]
            tl.store(Y + rows64[:, None] * N + c_cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows64, rstd, mask=row_mask)


@triton.jit
def _chunk_operands(DY, X, W, row64, c_cols, mask, stride_dy, stride_x, OFFSET: tl.constexpr):
    """dy, x and the scale OFFSET + w of one chunk of a wide row, in float32 (both passes
    of the chunked backward)."""
    dy = tl.load(DY + row64 * stride_dy + c_cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row64 * stride_x + c_cols, mask=mask, other=0.0).to(tl.float32)
    return dy, x, _scale(tl.load(W + c_cols, mask=mask, other=0.0), OFFSET)


@triton.jit
def _rms_norm_backward_kernel(DY, DH, X, W, RSTD, DX, DW_PARTIAL, M, N, stride_dy, stride_dh, stride_x,
                              blocks_per_program, OFFSET: tl.constexpr,
                              HAS_DH: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    """dx for blocks_per_program consecutive blocks of ROWS rows, and the sum of their
    weight gradients in this program's own float32 row of DW_PARTIAL (the scale is
    OFFSET + w; its gradient, dy * xhat, is the weight's whatever the offset).

    CHUNKS == 1: a whole row fits in BLOCK_N and stays in registers; the weight gradient
    accumulates in registers. CHUNKS > 1 (ROWS == 1): rows too wide to hold go in CHUNKS
    pieces, twice: the first pass sums x * w * dy, the second (the row again, from L2)
    writes dx and adds to the partial row, which no other program touches.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    partial = DW_PARTIAL + pid.to(tl.int64) * N
    if CHUNKS == 1:
        col_mask = cols < N
        w = _scale(tl.load(W + cols, mask=col_mask, other=0.0), OFFSET)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        # Blocks past the last row are fully masked: no bound check needed. Two stages: the
        # next block's dy, x (and dh) are copied to shared memory (cp.async) while this one
        # is reduced, so loads stay in flight across the row reduction (static sm_90: 24-33
        # KB of shared memory a block, registers unchanged, still 2 blocks/SM).
        for i in tl.range(0, blocks_per_program, num_stages=2):
            rows = (pid * blocks_per_program + i) * ROWS + tl.arange(0, ROWS)
            row_mask = rows < M
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows.to(tl.int64)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows64, mask=row_mask, other=0.0)
            xhat = x * rstd[:, None]
            wdy = w[None, :] * dy
            c = tl.sum(xhat * wdy, axis=1) / N
            dx = (wdy - xhat * c[:, None]) * rstd[:, None]
            if HAS_DH:
                dx += tl.load(DH + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * xhat, axis=0)
        tl.store(partial + cols, dw, mask=col_mask)
    else:
        for chunk in range(0, CHUNKS):
            c_cols = chunk * BLOCK_N + cols
            tl.store(partial + c_cols, tl.zeros([BLOCK_N], dtype=tl.float32), mask=c_cols < N)
        for i in range(0, blocks_per_program):
            row = pid * blocks_per_program + i
            row_ok = row < M
            row64 = row.to(tl.int64)
            rstd = tl.load(RSTD + row64, mask=row_ok, other=0.0)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for chunk in range(0, CHUNKS):
                c_cols = chunk * BLOCK_N + cols
                mask = (c_cols < N) & row_ok
                dy, x, w = _chunk_operands(DY, X, W, row64, c_cols, mask, stride_dy, stride_x, OFFSET)
                acc += x * w * dy
            # dx = (w dy - xhat c) rstd with xhat = x rstd and c = sum(xhat w dy) / N
            k = tl.sum(acc, axis=0) * rstd * rstd / N
            for chunk in range(0, CHUNKS):
                c_cols = chunk * BLOCK_N + cols
                mask = (c_cols < N) & row_ok
                dy, x, w = _chunk_operands(DY, X, W, row64, c_cols, mask, stride_dy, stride_x, OFFSET)
                dx = (w * dy - x * k) * rstd
                if HAS_DH:
                    dx += tl.load(DH + row64 * stride_dh + c_cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row64 * N + c_cols, dx.to(DX.dtype.element_ty), mask=mask)
                p = tl.load(partial + c_cols, mask=mask, other=0.0)
                tl.store(partial + c_cols, p + dy * x * rstd, mask=mask)


@triton.jit
def _rms_norm_weight_grad_kernel(DW_PARTIAL, DW, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """dw = the sum of the P float32 partial rows, in a fixed order, stored in dw's dtype."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & col_mask[None, :]
        acc += tl.sum(tl.load(DW_PARTIAL + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0),
                      axis=0)
    tl.store(DW + cols, acc.to(DW.dtype.element_ty), mask=col_mask)


# Widest row the kernels hold in registers; wider ones go in chunks of this width (the
# forward spilled from 32768 wide with float32 weights, the backward from 16384).
_WHOLE_ROW = 8192
# The backward's float32 partial rows cost 8 bytes a column each (written, then read by the
# weight-gradient kernel), rstd 4 bytes a row, against 3 x itemsize bytes an element of
# rows: programs are capped so these stay within this share of the rows' bytes, but never
# below half the SMs (an H100 SM draws ~2x its share of DRAM bandwidth, 64 B a clock from
# L2, given ~50 KB in flight: two chunks of dy and x). Of the report's shapes only the
# sweep's 2048 x 32768 meets the cap (69 programs, 1.045 x the minimum bytes; 1.086 at 132).
_OVERHEAD_SHARE = 0.045


def plan_forward(target, operands, m, n, offset, has_residual):
    """The forward's Plan: whole rows held in registers, ROWS of them a program (the row
    rule), or one row a program in chunks of _WHOLE_ROW beyond that."""
    constexprs = dict(OFFSET=offset, HAS_RESIDUAL=has_residual)
    if n > _WHOLE_ROW:
        return Plan(_rms_norm_forward_kernel, (m,), warps_for(_WHOLE_ROW),
                    (*constexprs.items(), ("BLOCK_N", _WHOLE_ROW), ("CHUNKS", triton.cdiv(n, _WHOLE_ROW)), ("ROWS", 1)))
    block_n = triton.next_power_of_2(n)
    return plan_rows(target, _rms_norm_forward_kernel, operands, dict(constexprs, BLOCK_N=block_n, CHUNKS=1), m, block_n)


def _forward(target, x, residual, weight, eps, offset):
    n = x.shape[-1]
    x2 = as_rows(x)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = as_rows(residual)
        h = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        r2, h = x2, y
    if m > 0:
        operands = dict(X=x2, R=r2, W=weight, Y=y, H=h, RSTD=rstd, M=m, N=n, stride_x=x2.stride(0),
                        stride_r=r2.stride(0), eps=eps)
        target.launch(plan_forward(target, operands, m, n, offset, residual is not None), operands)
    return y.view(x.shape), h.view(x.shape), rstd


@op_on_target("tinyfuse::rms_norm_forward")
def rms_norm_forward(target, x: torch.Tensor, weight: torch.Tensor, eps: float,
                     offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _forward(target, x, None, weight, eps, offset)
    return y, rstd


@rms_norm_forward.register_fake
def _(x, weight, eps, offset):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1].numel(), dtype=torch.float32)


@op_on_target("tinyfuse::add_rms_norm_forward")
def add_rms_norm_forward(target, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(target, x, residual, weight, eps, offset)


@add_rms_norm_forward.register_fake
def _(x, residual, weight, eps, offset):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1].numel(), dtype=torch.float32)


def plan_backward(target, sizing, m, n, itemsize, offset, has_dh):
    """The backward's Plan, one wave of programs at most, each taking an equal share of
    the row blocks, and that share (blocks_per_program). sizing: the launch's operands,
    with stand-ins for the partials and blocks_per_program (2: 1 would be specialised into
    a different binary)."""
    if n > _WHOLE_ROW:
        # One program an SM at most: a partial row is 32-256 KiB against a few MB of rows.
        plan = Plan(_rms_norm_backward_kernel, (m,), warps_for(_WHOLE_ROW, per_thread=16),
                    (("OFFSET", offset), ("HAS_DH", has_dh), ("BLOCK_N", _WHOLE_ROW),
                     ("CHUNKS", triton.cdiv(n, _WHOLE_ROW)), ("ROWS", 1)))
        resident = target.sms
    else:
        # Whole rows in registers, 16 values of dy and x a thread (4 warps held 32 at 4096
        # wide: 204 registers, 2 blocks/SM).
        block_n = triton.next_power_of_2(n)
        plan = plan_rows(target, _rms_norm_backward_kernel, sizing,
                         dict(OFFSET=offset, HAS_DH=has_dh, BLOCK_N=block_n, CHUNKS=1), m,
                         block_n, per_thread=16)
        resident = resident_programs(target, plan, sizing)
    budget = int((_OVERHEAD_SHARE * 3 * n * itemsize - 4) * m / (8 * n))
    cap = min(resident, max(budget, target.sms // 2))
    blocks = triton.cdiv(m, dict(plan.constexprs)["ROWS"])
    per_program = triton.cdiv(blocks, max(1, min(blocks, cap)))
    programs = triton.cdiv(blocks, per_program) if m > 0 else 1
    return dataclasses.replace(plan, grid=(programs,)), per_program


def plan_weight_grad(n):
    """32 columns a program, one warp: N/32 programs (9 at stories15M), each reading its
    columns of 64 partials (8 KiB) per step, all loads 16 bytes wide."""
    return Plan(_rms_norm_weight_grad_kernel, (triton.cdiv(n, 32),), 1, (("BLOCK_P", 64), ("BLOCK_N", 32)))


@op_on_target("tinyfuse::rms_norm_backward")
def rms_norm_backward(target, dy: torch.Tensor, dh: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of y = rms_norm(x) w.r.t. x and weight; dh, the gradient reaching
    h = x + residual directly, is added to dx when the residual stream carries one."""
    n = x.shape[-1]
    x2, dy2 = as_rows(x), as_rows(dy)
    dh2 = as_rows(dh) if dh is not None else dy2
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    operands = dict(DY=dy2, DH=dh2, X=x2, W=weight, RSTD=rstd, DX=dx, M=m, N=n, stride_dy=dy2.stride(0),
                    stride_dh=dh2.stride(0), stride_x=x2.stride(0))
    # While the launch is planned, rstd (float32) stands in for the partials.
    plan, per_program = plan_backward(target, dict(operands, DW_PARTIAL=rstd, blocks_per_program=2), m, n,
                                      x.element_size(), offset, dh is not None)
    dw_partial = torch.empty((plan.grid[0], n), dtype=torch.float32, device=x.device)
    if m > 0:
        target.launch(plan, dict(operands, DW_PARTIAL=dw_partial, blocks_per_program=per_program))
    else:
        dw_partial.zero_()
    target.launch(plan_weight_grad(n), dict(DW_PARTIAL=dw_partial, DW=dw, P=plan.grid[0], N=n))
    return dx.view(x.shape), dw


@rms_norm_backward.register_fake
def _(dy, dh, x, weight, rstd, offset):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        y, rstd = torch.ops.tinyfuse.rms_norm_forward(x, weight, eps, offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.tinyfuse.rms_norm_backward(dy, None, x, weight, rstd, ctx.offset)
        return dx, dw, None, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, offset):
        y, h, rstd = torch.ops.tinyfuse.add_rms_norm_forward(x, residual, weight, eps, offset)
        ctx.save_for_backward(h, weight, rstd)
        ctx.offset = offset
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.tinyfuse.rms_norm_backward(dy, dh, h, weight, rstd, ctx.offset)
        return dx, dx, dw, None, None


def _check(x, weight, **others):
    check_float("x", x)
    check_float("weight", weight)
    for name, t in others.items():
        check_float(name, t)
        check_same_dtype(x=x, **{name: t})
        if t.shape != x.shape:
            raise ValueError(f"{name}: expected the shape of x {tuple(x.shape)}; got {tuple(t.shape)}")
    check_device(x=x, weight=weight, **others)
    if x.dim() == 0:
        raise ValueError("x: expected at least one dimension; got a scalar")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight: expected shape ({x.shape[-1]},), the last dim of x; got {tuple(weight.shape)}")
    check_hidden("x", x.shape[-1])


def rms_norm(x, weight, eps=1e-5, offset=0.0):
    """x * rsqrt(mean(x**2, -1) + eps) * (offset + weight), in float32 math, returned in
    x's dtype. offset=1.0 is Gemma's norm, whose weight is stored around 0; the offset is
    added in the kernel as the weight is read, so no shifted copy of the weight is made."""
    _check(x, weight)
    return RMSNormFunction.apply(x, weight, eps, float(offset))


def add_rms_norm(x, residual, weight, eps=1e-5, offset=0.0):
    """(rms_norm(x + residual, weight, eps, offset), x + residual) in one pass: the pre-norm
    residual stream."""
    _check(x, weight, residual=residual)
    return AddRMSNormFunction.apply(x, residual, weight, eps, float(offset))


class RMSNorm(torch.nn.Module):
    """Drop-in for torch.nn.RMSNorm(dim, eps) backed by the fused kernel; with offset=1.0,
    Gemma's norm (the weight starts at 0 and scales by 1 + weight)."""

    def __init__(self, dim, eps=1e-5, offset=0.0, device=None, dtype=None):
        super().__init__()
        self.eps, self.offset = eps, float(offset)
        self.weight = torch.nn.Parameter(torch.full((dim,), 1.0 - self.offset, device=device, dtype=dtype))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.offset)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}" + (f", offset={self.offset}" if self.offset else "")
