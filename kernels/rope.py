"""Rotary position embedding applied to q and k in one launch.

Each program rotates a block of tokens across all q heads and then all k heads,
reading the cos/sin row of each token once for both. The tables hold one row per
position ([T, D/2], shared by the batch) or one per token ([B, T, D/2]: Hugging
Face's position ids, left padding, a KV cache's offsets). The backward is the same
rotation by the opposite angle, so one kernel serves both directions.
"""
import torch
import triton
import triton.language as tl

from ._launch import check_device, check_float, check_same_dtype, op_on_target, plan_rows, unit_last_stride


@triton.jit
def _rotate_heads(X, OUT, b, t, tok, tok_mask, n_heads, stride_b, stride_t, stride_h, stride_out, cos, sin,
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr,
                  HEADS_PACKED: tl.constexpr):
    """Rotate every head of a block of tokens. Each head's row is read and written whole
    and contiguous (16-byte accesses where rows are 16-byte aligned); interleaved pairs
    are split and joined in registers. HEADS_PACKED: heads follow each other (stride D),
    said as a constant so the compiler sees rows aligned even when D is not a multiple
    of 16 (Triton only assumes that divisibility of integer arguments)."""
    if HEADS_PACKED:
        stride_h = 2 * HALF
    h = tl.arange(0, BLOCK_H)
    head_mask = tok_mask[:, None, None] & (h < n_heads)[None, :, None]
    src = X + b[:, None, None] * stride_b + t[:, None, None] * stride_t + h[None, :, None] * stride_h
    dst = OUT + tok[:, None, None] * stride_out + h[None, :, None] * (2 * HALF)
    c = cos[:, None, :]
    s = sin[:, None, :]
    if INTERLEAVED:
        d = tl.arange(0, 2 * BLOCK_HALF)
        mask = head_mask & (d < 2 * HALF)[None, None, :]
        x = tl.load(src + d[None, None, :], mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [x.shape[0], BLOCK_H, BLOCK_HALF, 2]))
        y = tl.reshape(tl.join(x1 * c - x2 * s, x1 * s + x2 * c), [x.shape[0], BLOCK_H, 2 * BLOCK_HALF])
        tl.store(dst + d[None, None, :], y.to(OUT.dtype.element_ty), mask=mask)
    else:
        j = tl.arange(0, BLOCK_HALF)
        mask = head_mask & (j < HALF)[None, None, :]
        x1 = tl.load(src + j[None, None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + j[None, None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + j[None, None, :], (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=mask)
        tl.store(dst + HALF + j[None, None, :], (x1 * s + x2 * c).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, COS, SIN, QO, KO, n_tokens, T, HQ, HK,
                 sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sqo, sko, ko_start, stride_cb, stride_ct,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, TOKENS: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr, Q_PACKED: tl.constexpr,
                 K_PACKED: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    tok_mask = tok < n_tokens
    b = tok // T
    t = tok % T
    j = tl.arange(0, BLOCK_HALF)
    j_mask = j < HALF
    cs_mask = tok_mask[:, None] & j_mask[None, :]
    cs = b[:, None] * stride_cb + t[:, None] * stride_ct + j[None, :]
    cos = tl.load(COS + cs, mask=cs_mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + cs, mask=cs_mask, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    _rotate_heads(Q, QO, b, t, tok, tok_mask, HQ, sq_b, sq_t, sq_h, sqo, cos, sin, HALF, BLOCK_HALF, INTERLEAVED,
                  BLOCK_HQ, Q_PACKED)
    _rotate_heads(K, KO + ko_start, b, t, tok, tok_mask, HK, sk_b, sk_t, sk_h, sko, cos, sin, HALF, BLOCK_HALF, INTERLEAVED,
                  BLOCK_HK, K_PACKED)


@op_on_target("tinyfuse::rope")
def rope_rotate(target, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by the angles of cos/sin (by their negatives when inverse: the backward)."""
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch_rope(target, q, k, cos, sin, q_out, k_out, interleaved, inverse)
    return q_out, k_out


def plan_rope(target, operands, n_tokens, head_dim, interleaved, inverse):
    """The Plan: a token's q and k heads are its row, half of them read at a time (x1, x2)."""
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    hq, hk = operands["HQ"], operands["HK"]
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    constexprs = dict(HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
                      INTERLEAVED=interleaved, INVERSE=inverse, Q_PACKED=operands["sq_h"] == head_dim,
                      K_PACKED=operands["sk_h"] == head_dim)
    return plan_rows(target, _rope_kernel, operands, constexprs, n_tokens, (block_hq + block_hk) * block_half,
                     target_elements=2048, rows_arg="TOKENS")


def _launch_rope(target, q, k, cos, sin, q_out, k_out, interleaved, inverse, out_token_stride=None, k_start=0):
    """Rotate q, k [B, T, H, D] (any token and head strides) into q_out and k_out + k_start
    (elements), whose heads are packed: their own contiguous tensors, or (out_token_stride
    given) both the one [B, T, (Hq + 2 Hkv) D] gradient, passed whole with k's offset."""
    q, k, cos, sin = (unit_last_stride(t) for t in (q, k, cos, sin))
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    n_tokens = B * T
    if n_tokens > 0:
        stride_cb, stride_ct = _table_strides(cos)
        operands = dict(Q=q, K=k, COS=cos, SIN=sin, QO=q_out, KO=k_out, n_tokens=n_tokens, T=T, HQ=HQ, HK=HK,
                        sq_b=q.stride(0), sq_t=q.stride(1), sq_h=q.stride(2), sk_b=k.stride(0), sk_t=k.stride(1),
                        sk_h=k.stride(2), sqo=out_token_stride or HQ * D, sko=out_token_stride or HK * D,
                        ko_start=k_start, stride_cb=stride_cb, stride_ct=stride_ct)
        target.launch(plan_rope(target, operands, n_tokens, D, interleaved, inverse), operands)


def _table_strides(table):
    """(batch, position) strides of a [T, D/2] or [B, T, D/2] table; a shared one or B = 1 has batch stride 0."""
    if table.dim() == 2:
        return 0, table.stride(0)
    return (table.stride(0) if table.shape[0] > 1 else 0), table.stride(1)


@rope_rotate.register_fake
def _(q, k, cos, sin, interleaved, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, interleaved):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return torch.ops.tinyfuse.rope(q, k, cos, sin, interleaved, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = torch.ops.tinyfuse.rope(dq, dk, cos, sin, ctx.interleaved, True)
        return dq, dk, None, None, None


@op_on_target("tinyfuse::rope_qkv_backward")
def rope_qkv_backward(target, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      interleaved: bool) -> torch.Tensor:
    """The gradient of the fused projection's output [B, T, (Hq + 2 Hkv) D]: dq and dk rotated
    back straight into their parts, dv copied into its part (no concatenation afterwards)."""
    B, T, HQ, D = dq.shape
    HK = dk.shape[2]
    width = (HQ + 2 * HK) * D
    dqkv = torch.empty((B, T, width), dtype=dq.dtype, device=dq.device)
    _launch_rope(target, dq, dk, cos, sin, dqkv, dqkv, interleaved, True, out_token_stride=width, k_start=HQ * D)
    dqkv[..., (HQ + HK) * D:].view(B, T, HK, D).copy_(dv)
    return dqkv


@rope_qkv_backward.register_fake
def _(dq, dk, dv, cos, sin, interleaved):
    B, T, HQ, D = dq.shape
    return dq.new_empty((B, T, (HQ + 2 * dk.shape[2]) * D))


class RoPEQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, n_heads, n_kv_heads, interleaved):
        q, k, v = _split_qkv(qkv, n_heads, n_kv_heads)
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        q, k = torch.ops.tinyfuse.rope(q, k, cos, sin, interleaved, False)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        if dv is None:  # v unused
            dv = dk.new_zeros(dk.shape)
        return torch.ops.tinyfuse.rope_qkv_backward(dq, dk, dv, cos, sin, ctx.interleaved), None, None, None, None, None


def _split_qkv(qkv, n_heads, n_kv_heads):
    B, T, width = qkv.shape
    D = width // (n_heads + 2 * n_kv_heads)
    q, k, v = qkv.split([n_heads * D, n_kv_heads * D, n_kv_heads * D], dim=-1)
    return q.view(B, T, n_heads, D), k.view(B, T, n_kv_heads, D), v.view(B, T, n_kv_heads, D)


def rope_qkv(qkv, cos, sin, n_heads, n_kv_heads, interleaved=True):
    """q, k, v [B, T, heads, D] from the fused projection's output qkv [B, T, (Hq + 2 Hkv) D],
    q and k rotated as by `rope`. v is a view of qkv; the gradient comes back as one tensor
    shaped like qkv, so autograd concatenates nothing before the projection's backward."""
    check_float("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv: expected 3 dims [batch, seq, (heads + 2 kv_heads) * head_dim]; "
                         f"got shape {tuple(qkv.shape)}")
    if n_heads < 1 or n_kv_heads < 1 or qkv.shape[-1] % (n_heads + 2 * n_kv_heads):
        raise ValueError(f"qkv: last dim {qkv.shape[-1]} is not (n_heads + 2 n_kv_heads) * head_dim for "
                         f"n_heads={n_heads}, n_kv_heads={n_kv_heads}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q, k, _ = _split_qkv(qkv, n_heads, n_kv_heads)
    _check_rope(q, k, cos, sin)
    return RoPEQKVFunction.apply(qkv, cos, sin, n_heads, n_kv_heads, interleaved)


def rope(q, k, cos, sin, interleaved=True):
    """Rotate q [B, T, Hq, D] and k [B, T, Hkv, D] by the tables cos, sin: [>=T, D/2] (one
    row per position, shared by the batch) or [B or 1, >=T, D/2] (one row per token). Tables
    may be any float dtype; the math is float32 and q and k keep their dtype.

    interleaved=True rotates the pairs (2i, 2i+1) (llama2.c, Meta's Llama);
    interleaved=False rotates (i, i + D/2) (Hugging Face Llama). A position
    offset is a slice of the tables: cos[offset:], sin[offset:].
    """
    _check_rope(q, k, cos, sin)
    return RoPEFunction.apply(q, k, cos, sin, interleaved)


def _check_rope(q, k, cos, sin):
    check_float("q", q)
    check_float("k", k)
    check_same_dtype(q=q, k=k)
    check_float("cos", cos)
    check_float("sin", sin)
    if q.dim() != 4:
        raise ValueError(f"q: expected 4 dims [batch, seq, heads, head_dim]; got shape {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k: expected 4 dims [batch, seq, kv_heads, head_dim]; got shape {tuple(k.shape)}")
    B, T, HQ, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k: expected shape ({B}, {T}, kv_heads, {D}) to match q {tuple(q.shape)}; "
                         f"got {tuple(k.shape)}")
    if D % 2:
        raise ValueError(f"q: head_dim must be even to rotate pairs; got {D}")
    if k.shape[2] == 0 or HQ % k.shape[2]:
        raise ValueError(f"k: kv_heads must divide q's heads ({HQ}); got {k.shape[2]}")
    for name, table in (("cos", cos), ("sin", sin)):
        per_token = table.dim() == 3 and table.shape[0] in (1, B) and table.shape[1] >= T
        if not (per_token or table.dim() == 2 and table.shape[0] >= T) or table.shape[-1] != D // 2:
            raise ValueError(f"{name}: expected shape (>= {T}, {D // 2}) or ({B}, >= {T}, {D // 2}) for batch {B}, "
                             f"seq {T} and head_dim {D}; got {tuple(table.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"sin: expected the shape of cos {tuple(cos.shape)}; got {tuple(sin.shape)}")
    check_device(q=q, k=k, cos=cos, sin=sin)


def rope_tables(seq_len, head_dim, theta=10000.0, device=None):
    """cos, sin float32 [seq_len, head_dim / 2] for rope, with Llama's frequencies theta^(-2i/D)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)[: head_dim // 2] / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)
