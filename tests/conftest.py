"""Shared fixtures. The helpers the tests import live in helpers.py; importing it here first
switches Triton's interpreter on (without CUDA) before any test module imports triton."""
import os

import pytest
import torch

from helpers import DEVICE, SHARED_DATA
from tinyfuse.engine.runtime import keep_checkout_off_path

# `python -m pytest` puts the checkout's root on sys.path: the tests use the installed tinyfuse.
keep_checkout_off_path(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Deterministic algorithms (the fixture below) make cuBLAS refuse to run on CUDA unless its
# workspace is fixed; cuBLAS reads this when its first handle is made.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


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


@pytest.fixture
def shared_data():
    """../shared/data beside the checkout: skipped when absent, except under CI=true."""
    if not os.path.isdir(SHARED_DATA):
        message = f"shared data folder {SHARED_DATA} is absent (it holds stories260K.bin, tok512.model, ...)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must provide it")
        pytest.skip(message)
    return SHARED_DATA
