"""swiglu: the cases outside `tinyfuse check`'s table. Its grid of dtypes x shapes against
float64 lives in kernels/check.py and runs in tests/test_check.py."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import COMPILE_BACKEND, DEVICE, DTYPES, TOLERANCE, as_float64_leaf, leaf, rel_err, gpu_only
from tinyfuse.kernels import SwiGLU, reference, swiglu


def check_swiglu(gate, up, dtype):
    y = swiglu(gate, up)
    dy = torch.randn_like(y)
    y.backward(dy)
    g64, u64 = as_float64_leaf(gate), as_float64_leaf(up)
    reference.swiglu(g64, u64).backward(dy.double())
    y64 = reference.swiglu(g64.detach(), u64.detach())
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.shape == gate.shape
    assert rel_err(y, y64) < tol
    assert rel_err(gate.grad, g64.grad) < tol
    assert rel_err(up.grad, u64.grad) < tol


def test_halves_of_a_fused_projection():
    proj = leaf((2, 9, 2 * 172), torch.float32).detach()
    gate, up = (t.requires_grad_() for t in proj.split(172, dim=-1))
    assert not gate.is_contiguous()
    check_swiglu(gate, up, torch.float32)
    gate_t = leaf((40, 30), torch.float32).detach().t().requires_grad_()
    check_swiglu(gate_t, leaf((30, 40), torch.float32), torch.float32)


def test_packed_backward_is_one_kernel_without_a_concatenation():
    """The gradient of the fused projection's output comes from the kernel, not from an aten cat."""
    from torch.profiler import profile
    gate_up = leaf((6, 2 * 96), torch.float32)
    with profile() as prof:
        swiglu(gate_up).sum().backward()
    names = {e.name for e in prof.events()}
    assert "tinyfuse::swiglu_packed_backward" in names
    assert "aten::cat" not in names  # (copies are not checked: the interpreter makes its own)


def test_zero_rows():
    gate, up = leaf((0, 172), torch.float32), leaf((0, 172), torch.float32)
    y = swiglu(gate, up)
    y.sum().backward()
    assert y.shape == (0, 172) and gate.grad.shape == (0, 172)
    gate_up = leaf((0, 2 * 64), torch.float32)
    swiglu(gate_up).sum().backward()
    assert gate_up.grad.shape == (0, 128) and gate_up.grad.is_contiguous()


def test_packed_gradient_is_one_contiguous_tensor():
    gate_up = leaf((5, 2 * 96), torch.bfloat16)
    swiglu(gate_up).sum().backward()
    assert gate_up.grad.shape == gate_up.shape and gate_up.grad.is_contiguous()


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 50), width=st.integers(1, 3000), dtype=st.sampled_from(DTYPES))
def test_hypothesis_shapes(rows, width, dtype):
    check_swiglu(leaf((rows, width), dtype, scale=2.0), leaf((rows, width), dtype), dtype)


def test_module_matches_reference_mlp():
    mlp = SwiGLU(64, 172).to(DEVICE)
    x = torch.randn(3, 5, 64, device=DEVICE)
    gate, up = (x @ mlp.w13.weight.T).split(172, dim=-1)
    ref = reference.swiglu(gate, up) @ mlp.w2.weight.T
    assert rel_err(mlp(x), ref) < 1e-5


def test_torch_compile_fullgraph():
    gate, up = leaf((4, 300), torch.float32), leaf((4, 300), torch.float32)
    out = torch.compile(lambda g, u: swiglu(g * 2.0, u).sum(-1), fullgraph=True, backend=COMPILE_BACKEND)(gate, up)
    out.sum().backward()
    g64, u64 = as_float64_leaf(gate), as_float64_leaf(up)
    ref = reference.swiglu(g64 * 2.0, u64).sum(-1)
    ref.sum().backward()
    assert rel_err(out, ref) < 1e-5
    assert rel_err(gate.grad, g64.grad) < 1e-5 and rel_err(up.grad, u64.grad) < 1e-5


def test_bad_inputs_get_clear_errors():
    g = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="up: expected the shape of gate"):
        swiglu(g, torch.randn(4, 9, device=DEVICE))
    with pytest.raises(TypeError, match="up: expected the dtype of gate"):
        swiglu(g, g.bfloat16())
    with pytest.raises(TypeError, match="gate: expected dtype"):
        swiglu(g.int(), g)


@gpu_only("needs a CUDA device: tensors on two devices")
def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="up: expected a tensor on cuda"):
        swiglu(torch.randn(4, 8, device="cuda"), torch.randn(4, 8))


@gpu_only("over 2^31 elements: needs a GPU (4 GiB), far too slow in the interpreter")
def test_int64_offsets():
    rows, width = (1 << 31) // 4096 + 8, 4096
    gate = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    y = swiglu(gate, up)
    assert rel_err(y[-16:], reference.swiglu(gate[-16:].double(), up[-16:].double())) < TOLERANCE[torch.bfloat16]
