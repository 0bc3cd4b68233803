"""rope: the cases outside `tinyfuse check`'s table. Its grid of dtypes x shapes against
float64 lives in kernels/check.py and runs in tests/test_check.py."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import COMPILE_BACKEND, DEVICE, DTYPES, TOLERANCE, as_float64_leaf, leaf, rel_err, gpu_only
from tinyfuse.kernels import reference, rope, rope_qkv, rope_tables


def check_rope(q, k, cos, sin, interleaved, dtype):
    q_out, k_out = rope(q, k, cos, sin, interleaved)
    dq, dk = torch.randn_like(q_out), torch.randn_like(k_out)
    ((q_out.float() * dq.float()).sum() + (k_out.float() * dk.float()).sum()).backward()
    q64, k64 = as_float64_leaf(q), as_float64_leaf(k)
    q_ref, k_ref = reference.rope(q64, k64, cos.double(), sin.double(), interleaved)
    ((q_ref * dq.double()).sum() + (k_ref * dk.double()).sum()).backward()
    tol = TOLERANCE[dtype]
    assert q_out.dtype == dtype and q_out.shape == q.shape and k_out.shape == k.shape
    assert rel_err(q_out, q_ref) < tol
    assert rel_err(k_out, k_ref) < tol
    assert rel_err(q.grad, q64.grad) < tol
    assert rel_err(k.grad, k64.grad) < tol


def test_rope_qkv_gradient_needs_no_concatenation_and_v_may_go_unused():
    from torch.profiler import profile

    cos, sin = rope_tables(5, 16, device=DEVICE)
    qkv = leaf((1, 5, 4 * 16), torch.float32)
    with profile() as prof:
        q, k, v = rope_qkv(qkv, cos, sin, 2, 1)
        (q.sum() + k.sum()).backward()  # v unused: its part of the gradient is zero
    assert "tinyfuse::rope_qkv_backward" in {e.name for e in prof.events()}
    assert "aten::cat" not in {e.name for e in prof.events()}
    assert torch.equal(qkv.grad[..., 3 * 16:], torch.zeros_like(qkv.grad[..., 3 * 16:]))
    with pytest.raises(ValueError, match=r"qkv: last dim 64 is not \(n_heads \+ 2 n_kv_heads\) \* head_dim"):
        rope_qkv(qkv, cos, sin, 3, 1)


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch_rows", [1, 3])
def test_per_token_tables(batch_rows, table_dtype):
    """[B or 1, T, D/2] tables: each sequence at its own positions (Hugging Face's
    position ids, left padding); the tables may come in the activations' dtype."""
    B, T, D = 3, 9, 16
    cos_full, sin_full = rope_tables(40, D, device=DEVICE)
    positions = torch.randint(0, 40, (batch_rows, T), device=DEVICE)
    cos, sin = cos_full[positions].to(table_dtype), sin_full[positions].to(table_dtype)
    check_rope(leaf((B, T, 4, D), torch.float32), leaf((B, T, 2, D), torch.float32), cos, sin, False, torch.float32)
    if batch_rows == 3:  # sequence 1 alone, rotated by the shared table at its positions
        q, k = leaf((B, T, 4, D), torch.float32), leaf((B, T, 2, D), torch.float32)
        q_out, _ = rope(q, k, cos, sin, interleaved=False)
        alone, _ = reference.rope(q[1:2].double(), k[1:2].double(), cos[1].double(), sin[1].double(), False)
        assert rel_err(q_out[1:2], alone) < TOLERANCE[table_dtype]


def test_layouts_differ_and_are_rotations():
    q, k = torch.randn(1, 5, 2, 16, device=DEVICE), torch.randn(1, 5, 2, 16, device=DEVICE)
    cos, sin = rope_tables(5, 16, device=DEVICE)
    qi, _ = rope(q, k, cos, sin, interleaved=True)
    qh, _ = rope(q, k, cos, sin, interleaved=False)
    assert not torch.allclose(qi, qh)
    # A rotation keeps each pair's norm and leaves position 0 unchanged.
    torch.testing.assert_close(qi[:, 0], q[:, 0])
    torch.testing.assert_close(qi.norm(dim=-1), q.norm(dim=-1))


def test_position_offset_is_a_table_slice():
    T, offset, D = 6, 9, 16
    cos, sin = rope_tables(offset + T, D, device=DEVICE)
    q, k = leaf((2, T, 4, D), torch.float32), leaf((2, T, 2, D), torch.float32)
    check_rope(q, k, cos[offset:], sin[offset:], True, torch.float32)
    # Equal to the same tokens at positions offset.. in a longer sequence.
    full_q = torch.randn(2, offset + T, 4, D, device=DEVICE)
    full_q[:, offset:] = q.detach()
    full_k = torch.randn(2, offset + T, 2, D, device=DEVICE)
    full_k[:, offset:] = k.detach()
    fq, fk = rope(full_q, full_k, cos, sin)
    oq, ok = rope(q.detach(), k.detach(), cos[offset:], sin[offset:])
    assert rel_err(oq, fq[:, offset:]) < 1e-6 and rel_err(ok, fk[:, offset:]) < 1e-6


def test_non_contiguous_qk_from_a_fused_projection():
    B, T, H, KV, D = 2, 7, 4, 2, 16
    qkv = leaf((B, T, (H + 2 * KV) * D), torch.float32).detach()
    q = qkv[..., : H * D].view(B, T, H, D).requires_grad_()
    k = qkv[..., H * D:(H + KV) * D].view(B, T, KV, D).requires_grad_()
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = rope_tables(T, D, device=DEVICE)
    check_rope(q, k, cos, sin, True, torch.float32)
    qt = leaf((B, H, T, D), torch.float32).detach().transpose(1, 2).requires_grad_()
    kt = leaf((B, KV, T, D), torch.float32).detach().transpose(1, 2).requires_grad_()
    check_rope(qt, kt, cos, sin, False, torch.float32)


def test_zero_tokens():
    cos, sin = rope_tables(4, 8, device=DEVICE)
    q, k = leaf((0, 4, 2, 8), torch.float32), leaf((0, 4, 1, 8), torch.float32)
    q_out, k_out = rope(q, k, cos, sin)
    (q_out.sum() + k_out.sum()).backward()
    assert q_out.shape == (0, 4, 2, 8) and q.grad.shape == q.shape


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 40), kv=st.integers(1, 4), group=st.integers(1, 3),
       half=st.integers(1, 40), interleaved=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_hypothesis_shapes(B, T, kv, group, half, interleaved, dtype):
    D = 2 * half
    cos, sin = rope_tables(T + 3, D, device=DEVICE)
    check_rope(leaf((B, T, kv * group, D), dtype), leaf((B, T, kv, D), dtype), cos, sin, interleaved, dtype)


def test_torch_compile_fullgraph():
    B, T, H, KV, D = 2, 5, 4, 2, 16
    cos, sin = rope_tables(T, D, device=DEVICE)
    q, k = leaf((B, T, H, D), torch.float32), leaf((B, T, KV, D), torch.float32)

    def attention_inputs(q, k):
        q_out, k_out = rope(q * 2.0, k, cos, sin)
        return q_out.sum(-1) + k_out.repeat_interleave(H // KV, dim=2).sum(-1)

    out = torch.compile(attention_inputs, fullgraph=True, backend=COMPILE_BACKEND)(q, k)
    out.sum().backward()
    q64, k64 = as_float64_leaf(q), as_float64_leaf(k)
    qr, kr = reference.rope(q64 * 2.0, k64, cos.double(), sin.double())
    ref = qr.sum(-1) + kr.repeat_interleave(H // KV, dim=2).sum(-1)
    ref.sum().backward()
    assert rel_err(out, ref) < 1e-5
    assert rel_err(q.grad, q64.grad) < 1e-5 and rel_err(k.grad, k64.grad) < 1e-5


def test_bad_inputs_get_clear_errors():
    cos, sin = rope_tables(8, 16, device=DEVICE)
    q, k = torch.randn(1, 8, 4, 16, device=DEVICE), torch.randn(1, 8, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim must be even"):
        c, s = rope_tables(8, 15, device=DEVICE)
        rope(torch.randn(1, 8, 4, 15, device=DEVICE), torch.randn(1, 8, 2, 15, device=DEVICE), c[:, :7], s[:, :7])
    with pytest.raises(ValueError, match="kv_heads must divide"):
        rope(q, torch.randn(1, 8, 3, 16, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match=r"cos: expected shape \(>= 8, 8\)"):
        rope(q, k, cos[:7], sin)
    with pytest.raises(ValueError, match=r"sin: expected shape"):
        rope(q, k, cos, sin[:, :4])
    with pytest.raises(TypeError, match="cos: expected dtype float32"):
        rope(q, k, cos.double(), sin)
    with pytest.raises(TypeError, match="k: expected the dtype of q"):
        rope(q, k.half(), cos, sin)
    with pytest.raises(ValueError, match="k: expected shape"):
        rope(q, torch.randn(1, 7, 2, 16, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="q: expected 4 dims"):
        rope(q[0], k, cos, sin)


@gpu_only("needs a CUDA device: tensors on two devices")
def test_mixed_devices_rejected():
    cos, sin = rope_tables(8, 16)
    with pytest.raises(ValueError, match="cos: expected a tensor on cuda"):
        rope(torch.randn(1, 8, 4, 16, device="cuda"), torch.randn(1, 8, 2, 16, device="cuda"), cos, sin)


@gpu_only("over 2^31 elements: needs a GPU (4 GiB), far too slow in the interpreter")
def test_int64_offsets():
    B, T, H, D = 2, (1 << 30) // (8 * 128) + 16, 8, 128
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, T, 1, D, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope_tables(T, D, device="cuda")
    q_out, k_out = rope(q, k, cos, sin)
    q_ref, k_ref = reference.rope(q[1:, -8:].double(), k[1:, -8:].double(), cos[-8:].double(), sin[-8:].double())
    assert rel_err(q_out[1:, -8:], q_ref) < TOLERANCE[torch.bfloat16]
    assert rel_err(k_out[1:, -8:], k_ref) < TOLERANCE[torch.bfloat16]
