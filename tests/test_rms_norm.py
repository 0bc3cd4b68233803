"""rms_norm: the cases outside `tinyfuse check`'s table. Its grid of dtypes x shapes against
float64 lives in kernels/check.py and runs in tests/test_check.py."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import COMPILE_BACKEND, DEVICE, DTYPES, TOLERANCE, as_float64_leaf, leaf, rel_err, gpu_only
from tinyfuse.kernels import RMSNorm, add_rms_norm, reference, rms_norm


def check_rms_norm(x, dtype, eps=1e-5):
    w = leaf(x.shape[-1:], dtype)
    y = rms_norm(x, w, eps)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = as_float64_leaf(x), as_float64_leaf(w)
    y64 = reference.rms_norm(x64, w64, eps)
    y64.backward(dy.double())
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, y64) < tol
    assert rel_err(x.grad, x64.grad) < tol
    assert rel_err(w.grad, w64.grad) < tol


def check_add_rms_norm(x, r, dtype, eps=1e-5):
    w = leaf(x.shape[-1:], dtype)
    y, h = add_rms_norm(x, r, w, eps)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    ((y.float() * dy.float()).sum() + (h.float() * dh.float()).sum()).backward()
    x64, r64, w64 = as_float64_leaf(x), as_float64_leaf(r), as_float64_leaf(w)
    y64, h64 = reference.add_rms_norm(x64, r64, w64, eps)
    ((y64 * dy.double()).sum() + (h64 * dh.double()).sum()).backward()
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and h.dtype == dtype
    assert rel_err(h, h64) < tol
    assert rel_err(y, y64) < tol
    assert rel_err(x.grad, x64.grad) < tol
    assert rel_err(r.grad, r64.grad) < tol
    assert rel_err(w.grad, w64.grad) < tol


# Rows over 8192 wide go through the backward in chunks (two passes, the partial row in
# memory): a ragged last chunk, an even split, and the widest supported row; 11 rows over
# the interpreter's 4 programs leave the last program a masked row.
@pytest.mark.parametrize("hidden", [8492, 16384, 65536])
def test_rms_norm_large_hidden(hidden):
    check_rms_norm(leaf((11, hidden), torch.bfloat16), torch.bfloat16)


def test_add_rms_norm_large_hidden():
    check_add_rms_norm(leaf((11, 8492), torch.float16), leaf((11, 8492), torch.float16), torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_weight_with_half_activations(dtype):
    """The model's case: float32 master weights, half activations. The output keeps the
    activations' dtype, the weight gradient comes back in float32 (no cast either way)."""
    x, r, w = leaf((3, 5, 288), dtype), leaf((3, 5, 288), dtype), leaf((288,), torch.float32)
    y, h = add_rms_norm(x, r, w)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, r64, w64 = as_float64_leaf(x), as_float64_leaf(r), as_float64_leaf(w)
    reference.add_rms_norm(x64, r64, w64)[0].backward(dy.double())
    assert y.dtype == dtype and w.grad.dtype == torch.float32
    assert rel_err(w.grad, w64.grad) < TOLERANCE[dtype] and rel_err(x.grad, x64.grad) < TOLERANCE[dtype]


def test_add_rms_norm_gradient_through_normed_output_only():
    x, r = leaf((9, 96), torch.float32), leaf((9, 96), torch.float32)
    w = leaf((96,), torch.float32)
    y, _ = add_rms_norm(x, r, w)
    y.sum().backward()
    x64, r64, w64 = as_float64_leaf(x), as_float64_leaf(r), as_float64_leaf(w)
    reference.add_rms_norm(x64, r64, w64)[0].sum().backward()
    assert rel_err(x.grad, x64.grad) < 1e-5
    assert rel_err(w.grad, w64.grad) < 1e-5


def test_non_contiguous_inputs():
    base = leaf((48, 3, 160), torch.float32)
    x = base.detach()[:, 1, :130].requires_grad_()  # row stride 480, width 130
    assert not x.is_contiguous()
    check_rms_norm(x, torch.float32)
    def transposed():  # last-dim stride != 1
        return leaf((130, 40), torch.float32).detach().t().requires_grad_()

    check_rms_norm(transposed(), torch.float32)
    r = leaf((40, 260), torch.float32).detach()[:, ::2].requires_grad_()
    check_add_rms_norm(transposed(), r, torch.float32)


def test_zero_rows():
    x = leaf((0, 64), torch.float32)
    w = leaf((64,), torch.float32)
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 64)
    assert torch.equal(w.grad, torch.zeros_like(w))
    y2, h2 = add_rms_norm(x, leaf((0, 64), torch.float32), w)
    assert y2.shape == h2.shape == (0, 64)


# hidden >= 2: at hidden 1, x / rms(x) is the constant sign(x), so the exact dx is
# the eps term alone (~1e-7) and any float32 evaluation loses it to cancellation.
@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 70), hidden=st.integers(2, 1100), lead=st.integers(1, 3),
       dtype=st.sampled_from(DTYPES))
def test_hypothesis_shapes(rows, hidden, lead, dtype):
    check_rms_norm(leaf((lead, rows, hidden), dtype, scale=2.0), dtype)


def test_weight_gradient_is_deterministic():
    # Enough rows that several programs each reduce a partial weight gradient.
    x = leaf((1000, 96), torch.float32)
    w = leaf((96,), torch.float32)
    dy = torch.randn(1000, 96, device=DEVICE)
    grads = []
    for _ in range(2):
        x.grad = w.grad = None
        add_rms_norm(x, x.detach().flip(0), w)[0].backward(dy)
        grads.append((x.grad.clone(), w.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])


def test_torch_compile_fullgraph():
    x, r, w = leaf((4, 8, 96), torch.float32), leaf((4, 8, 96), torch.float32), leaf((96,), torch.float32)

    def block(x, r, w):
        y, h = add_rms_norm(x, r, w)
        return rms_norm(y * 2.0, w) + h

    compiled = torch.compile(block, fullgraph=True, backend=COMPILE_BACKEND)
    out = compiled(x, r, w)
    out.sum().backward()
    x64, r64, w64 = as_float64_leaf(x), as_float64_leaf(r), as_float64_leaf(w)
    y64, h64 = reference.add_rms_norm(x64, r64, w64)
    ref = reference.rms_norm(y64 * 2.0, w64) + h64
    ref.sum().backward()
    assert rel_err(out, ref) < 1e-5
    assert rel_err(w.grad, w64.grad) < 1e-5
    assert rel_err(x.grad, x64.grad) < 1e-5


def test_module_is_drop_in_for_torch_rmsnorm():
    ours = RMSNorm(172, eps=1e-6).to(DEVICE)
    theirs = torch.nn.RMSNorm(172, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(172))
        theirs.weight.copy_(ours.weight)
    assert list(dict(ours.named_parameters())) == ["weight"]
    x = torch.randn(5, 172, device=DEVICE)
    assert rel_err(ours(x), theirs(x)) < 1e-5
    theirs.load_state_dict(ours.state_dict())


def test_gemma_offset_module_starts_as_a_unit_scale_and_compiles():
    """RMSNorm(offset=1.0): Gemma's norm, weight stored around 0 and scaled by 1 + weight
    (the float64 grid with the offset is in tinyfuse check's table); it starts at zeros,
    equal to a plain norm of unit weight, and compiles without a graph break."""
    x = leaf((3, 7, 96), torch.float32)
    gemma = RMSNorm(96, offset=1.0).to(DEVICE)
    assert torch.equal(gemma.weight.detach(), torch.zeros(96, device=DEVICE)) and "offset=1.0" in repr(gemma)
    assert rel_err(gemma(x), reference.rms_norm(x.detach(), torch.ones(96, device=DEVICE))) < 1e-6
    with torch.no_grad():
        gemma.weight.normal_()
    compiled = torch.compile(gemma, fullgraph=True, backend=COMPILE_BACKEND)
    compiled(x).sum().backward()
    x64, w64 = as_float64_leaf(x), as_float64_leaf(gemma.weight)
    reference.rms_norm(x64, w64, offset=1.0).sum().backward()
    assert rel_err(x.grad, x64.grad) < 1e-5 and rel_err(gemma.weight.grad, w64.grad) < 1e-5


def test_bad_inputs_get_clear_errors():
    x = torch.randn(4, 64, device=DEVICE)
    w = torch.randn(64, device=DEVICE)
    with pytest.raises(TypeError, match="x: expected dtype"):
        rms_norm(x.long(), w)
    with pytest.raises(ValueError, match=r"weight: expected shape \(64,\)"):
        rms_norm(x, torch.randn(63, device=DEVICE))
    with pytest.raises(ValueError, match="residual: expected the shape of x"):
        add_rms_norm(x, torch.randn(4, 65, device=DEVICE), w)
    with pytest.raises(TypeError, match="residual: expected the dtype of x"):
        add_rms_norm(x, x.half(), w)
    with pytest.raises(ValueError, match="last dimension at most"):
        rms_norm(torch.randn(1, 65537, device=DEVICE), torch.randn(65537, device=DEVICE))


@gpu_only("needs a CUDA device: tensors on two devices")
def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="weight: expected a tensor on cuda"):
        rms_norm(torch.randn(4, 64, device="cuda"), torch.randn(64))


@gpu_only("over 2^31 elements: needs a GPU (4 GiB), far too slow in the interpreter")
def test_int64_offsets():
    rows, hidden = (1 << 31) // 1024 + 64, 1024
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    y, h = add_rms_norm(x, r, w)
    tail = slice(rows - 128, rows)
    y64, h64 = reference.add_rms_norm(x[tail].double(), r[tail].double(), w.double())
    assert rel_err(y[tail], y64) < TOLERANCE[torch.bfloat16]
    assert rel_err(h[tail], h64) < TOLERANCE[torch.bfloat16]
