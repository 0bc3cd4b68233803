"""Shared test set-up.

Kernel tests run on CUDA when it is present and in Triton's interpreter on CPU
tensors otherwise; the interpreter must be switched on before triton is first
imported, which is why this happens at the top of conftest.
"""
import os
import sys

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    assert "triton" not in sys.modules, "triton was imported before conftest could enable its interpreter"
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"

# Inductor on CPU spends ~30 s compiling C++ per graph; aot_eager runs the same
# dynamo tracing, fake-tensor propagation and AOT autograd that our torch.library
# registrations must survive. test_compile.py runs full inductor once on CPU too.
COMPILE_BACKEND = "inductor" if CUDA else "aot_eager"

# Relative-norm error bounds against a float64 reference: a bound on the output
# rounding of each dtype (2^-24, 2^-11, 2^-8 unit roundoff) with headroom.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN or inf: an element was left unwritten or overflowed"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """Every torch.empty comes back NaN-filled, so an element a kernel forgets to write fails."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


@pytest.fixture
def device():
    return DEVICE


def leaf(shape, dtype, scale=1.0):
    """Fresh random input that requires grad (a new draw every test run)."""
    return (torch.randn(shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype).requires_grad_()


def as_float64_leaf(t):
    return t.detach().double().requires_grad_()


SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture
def shared_data():
    """../shared/data beside the checkout: skipped when absent, except under CI=true."""
    if not os.path.isdir(SHARED_DATA):
        message = f"shared data folder {SHARED_DATA} is absent (it holds stories260K.bin, tok512.model, ...)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must provide it")
        pytest.skip(message)
    return SHARED_DATA
