import torch

from helpers import DEVICE, rel_err


def test_uninitialized_memory_is_poisoned():
    assert torch.empty(16, device=DEVICE).isnan().all()
    assert torch.empty(16, device=DEVICE, dtype=torch.bfloat16).isnan().all()


def test_rel_err_rejects_unwritten_elements():
    out = torch.empty(8, device=DEVICE)
    out[:7] = 1.0
    try:
        rel_err(out, torch.ones(8, device=DEVICE))
    except AssertionError:
        return
    raise AssertionError("rel_err accepted an output with an unwritten (NaN) element")
