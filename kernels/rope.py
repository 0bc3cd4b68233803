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

from ._launch import check_device, check_float, check_same_dtype, unit_last_stride, warps_for


@triton.jit
def _rotate_heads(X, OUT, b, t, tok, tok_mask, n_heads, stride_b, stride_t, stride_h, cos, sin, j, j_mask,
                  HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    mask = tok_mask[:, None, None] & (h < n_heads)[None, :, None] & j_mask[None, None, :]
    src = X + b[:, None, None] * stride_b + t[:, None, None] * stride_t + h[None, :, None] * stride_h
    dst = OUT + tok[:, None, None] * (n_heads * 2 * HALF) + h[None, :, None] * (2 * HALF)
    if INTERLEAVED:
        i1 = 2 * j
        i2 = 2 * j + 1
    else:
        i1 = j
        i2 = j + HALF
    x1 = tl.load(src + i1[None, None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + i2[None, None, :], mask=mask, other=0.0).to(tl.float32)
    c = cos[:, None, :]
    s = sin[:, None, :]
    tl.store(dst + i1[None, None, :], (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=mask)
    tl.store(dst + i2[None, None, :], (x1 * s + x2 * c).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, COS, SIN, QO, KO, n_tokens, T, HQ, HK,
                 sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, stride_cb, stride_ct,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, TOKENS: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr):
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
    _rotate_heads(Q, QO, b, t, tok, tok_mask, HQ, sq_b, sq_t, sq_h, cos, sin, j, j_mask,
                  HALF, INTERLEAVED, BLOCK_HQ)
    _rotate_heads(K, KO, b, t, tok, tok_mask, HK, sk_b, sk_t, sk_h, cos, sin, j, j_mask,
                  HALF, INTERLEAVED, BLOCK_HK)


@torch.library.custom_op("tinyfuse::rope", mutates_args=())
def rope_rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by the angles of cos/sin (by their negatives when inverse: the backward)."""
    q, k, cos, sin = (unit_last_stride(t) for t in (q, k, cos, sin))
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    q_out = torch.empty((B, T, HQ, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, T, HK, D), dtype=k.dtype, device=k.device)
    n_tokens = B * T
    if n_tokens > 0:
        half = D // 2
        block_half = triton.next_power_of_2(half)
        block_hq, block_hk = triton.next_power_of_2(HQ), triton.next_power_of_2(HK)
        per_token = (block_hq + block_hk) * block_half * 2
        tokens = max(1, min(64, triton.next_power_of_2(max(1, 4096 // per_token))))
        _rope_kernel[(triton.cdiv(n_tokens, tokens),)](
            q, k, cos, sin, q_out, k_out, n_tokens, T, HQ, HK,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            *_table_strides(cos),
            HALF=half, BLOCK_HALF=block_half, TOKENS=tokens, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
            INTERLEAVED=interleaved, INVERSE=inverse, num_warps=warps_for(tokens * per_token // 2))
    return q_out, k_out


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


def rope(q, k, cos, sin, interleaved=True):
    """Rotate q [B, T, Hq, D] and k [B, T, Hkv, D] by the tables cos, sin: [>=T, D/2] (one
    row per position, shared by the batch) or [B or 1, >=T, D/2] (one row per token). Tables
    may be any float dtype; the math is float32 and q and k keep their dtype.

    interleaved=True rotates the pairs (2i, 2i+1) (llama2.c, Meta's Llama);
    interleaved=False rotates (i, i + D/2) (Hugging Face Llama). A position
    offset is a slice of the tables: cos[offset:], sin[offset:].
    """
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
    return RoPEFunction.apply(q, k, cos, sin, interleaved)


def rope_tables(seq_len, head_dim, theta=10000.0, device=None):
    """cos, sin float32 [seq_len, head_dim / 2] for rope, with Llama's frequencies theta^(-2i/D)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)[: head_dim // 2] / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)
