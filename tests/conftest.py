"""Shared fixtures. The helpers the tests import live in helpers.py; importing it here first
switches Triton's interpreter on (without CUDA) before any test module imports triton."""
import os

import pytest

from helpers import DEVICE, SHARED_DATA, kernel_check
from tinyfuse.engine.runtime import keep_checkout_off_path

# `python -m pytest` puts the checkout's root on sys.path: the tests use the installed tinyfuse.
keep_checkout_off_path(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """Every torch.empty comes back NaN-filled, so an element a kernel forgets to write
    fails: the same poison `tinyfuse check` runs under."""
    with kernel_check.poisoned():
        yield


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
