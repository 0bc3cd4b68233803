"""cross_entropy: the cases outside `tinyfuse check`'s table. Its grid of dtypes x shapes against
float64 lives in kernels/check.py and runs in tests/test_check.py."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from helpers import COMPILE_BACKEND, DEVICE, as_float64_leaf, rel_err, gpu_only
from tinyfuse.kernels import CrossEntropyLoss, cross_entropy, reference


def logits_leaf(n, v, dtype=torch.float32, scale=4.0):
    """Logits with a realistic spread (std 4: softmax far from uniform)."""
    return (torch.randn(n, v, device=DEVICE) * scale).to(dtype).requires_grad_()


def targets(n, v, ignored=(), ignore_index=-100):
    t = torch.randint(0, v, (n,), device=DEVICE)
    t[list(ignored)] = ignore_index
    return t


def torch_loss(logits64, target, ignore_index, reduction, label_smoothing, z_loss):
    loss = F.cross_entropy(logits64, target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        valid = target != ignore_index
        z = torch.where(valid, z_loss * torch.logsumexp(logits64, -1) ** 2, 0.0)
        loss = loss + {"none": z, "sum": z.sum(), "mean": z.sum() / valid.sum()}[reduction]
    return loss


def check(logits, target, tol, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    loss = cross_entropy(logits, target, ignore_index, reduction, label_smoothing, z_loss)
    upstream = torch.rand(loss.shape, device=DEVICE, dtype=torch.float64) + 0.5
    (loss.double() * upstream).sum().backward()
    logits64 = as_float64_leaf(logits)
    ref = torch_loss(logits64, target, ignore_index, reduction, label_smoothing, z_loss)
    (ref * upstream).sum().backward()
    assert loss.dtype == logits.dtype and loss.shape == ref.shape
    assert rel_err(loss, ref) < tol
    assert rel_err(logits.grad, logits64.grad) < tol


@pytest.mark.parametrize("reduction,label_smoothing,z_loss,ignore_index",
                         list(itertools.product(["mean", "sum", "none"], [0.0, 0.1], [0.0, 1e-4], [-100, 7])))
def test_every_option_matches_torch(reduction, label_smoothing, z_loss, ignore_index):
    target = targets(24, 512, ignored=(1, 5, 6), ignore_index=ignore_index)
    check(logits_leaf(24, 512), target, 1e-5, ignore_index, reduction, label_smoothing, z_loss)


def test_every_target_ignored_matches_torch():
    logits = logits_leaf(6, 512)
    target = torch.full((6,), -100, device=DEVICE)
    for reduction in ("mean", "sum", "none"):
        logits.grad = None
        loss = cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
        loss.sum().backward()
        ref = F.cross_entropy(logits.detach().double(), target, reduction=reduction, label_smoothing=0.1)
        assert torch.equal(loss.isnan(), ref.isnan())  # "mean" is NaN (0 / 0), as in torch
        torch.testing.assert_close(loss.double().nan_to_num(), ref.nan_to_num())
        assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_no_target_ignored():
    check(logits_leaf(10, 700), targets(10, 700), 1e-5)


def test_reference_matches_torch_and_z_loss_formula():
    logits, target = torch.randn(9, 300, dtype=torch.float64) * 3, targets(9, 300, ignored=(2,)).cpu()
    for reduction in ("mean", "sum", "none"):
        ref = reference.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.2, z_loss=1e-3)
        assert rel_err(ref, torch_loss(logits, target, -100, reduction, 0.2, 1e-3)) < 1e-12


def test_inplace_backward_writes_gradient_into_logits():
    x = logits_leaf(12, 640)
    target = targets(12, 640, ignored=(0,))
    logits = x * 1.0  # a non-leaf buffer, as a matmul's output would be
    loss = cross_entropy(logits, target, inplace_backward=True, label_smoothing=0.1)
    written = logits.detach().clone()  # "mean": the gradient is already there after the forward
    loss.backward()
    assert torch.equal(written, x.grad)
    x64 = as_float64_leaf(x)
    F.cross_entropy(x64, target, label_smoothing=0.1).backward()
    assert rel_err(x.grad, x64.grad) < 1e-5
    assert torch.equal(logits.detach(), x.grad)  # the buffer now holds the gradient


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logits_read_once_for_mean_and_sum(reduction):
    """"mean" and "sum" write the gradient in the forward: the backward runs only the
    rescaling op (which moves nothing at a unit upstream gradient), never the kernel that
    reads the logits again; "none" still needs that kernel."""
    logits = logits_leaf(6, 512)
    loss = cross_entropy(logits, targets(6, 512), reduction=reduction)
    with torch.profiler.profile() as prof:
        loss.sum().backward()
    ran = {e.name for e in prof.events()}
    assert ("tinyfuse::cross_entropy_backward" in ran) == (reduction == "none"), ran
    assert ("tinyfuse::scale_gradient_" in ran) == (reduction != "none"), ran


def test_rescaling_skips_a_unit_scale_and_scales_strided_rows():
    buffer = torch.randn(5, 700, device=DEVICE)
    grad = buffer[:, :600]  # rows with a stride past their width
    grad[0, 0] = float("nan")  # a read-multiply-write would keep NaN too: compare bits of the rest
    before = buffer.clone()
    torch.ops.tinyfuse.scale_gradient_(grad, torch.ones((), device=DEVICE))
    assert torch.equal(buffer.nan_to_num(), before.nan_to_num())
    torch.ops.tinyfuse.scale_gradient_(grad, torch.full((), 2.5, device=DEVICE))
    assert torch.equal(buffer[:, :600].nan_to_num(), (before[:, :600] * 2.5).nan_to_num())
    assert torch.equal(buffer[:, 600:], before[:, 600:])  # past each row's width: untouched
    # Rows of three 4096-wide blocks, more blocks than programs: each program takes a run of
    # blocks across rows.
    wide = torch.randn(3, 9000, device=DEVICE)
    expected = wide * 0.5
    torch.ops.tinyfuse.scale_gradient_(wide, torch.full((), 0.5, device=DEVICE))
    assert torch.equal(wide, expected)


def test_gradient_accumulation_recipe():
    logits = logits_leaf(30, 512)
    target = targets(30, 512, ignored=(0, 4, 11, 12, 29))
    micro_batches = [slice(0, 8), slice(8, 20), slice(20, 30)]
    total = (target != -100).sum()
    loss = sum(cross_entropy(logits[mb], target[mb], reduction="sum", label_smoothing=0.1) for mb in micro_batches)
    loss = loss / total
    loss.backward()
    full = as_float64_leaf(logits)
    ref = F.cross_entropy(full, target, label_smoothing=0.1)
    ref.backward()
    assert rel_err(loss, ref) < 1e-5
    assert rel_err(logits.grad, full.grad) < 1e-5


def test_torch_compile_fullgraph():
    logits = logits_leaf(8, 512)
    target = targets(8, 512, ignored=(1,))
    loss = torch.compile(lambda x, t: cross_entropy(x * 0.5, t, label_smoothing=0.1, z_loss=1e-4),
                         fullgraph=True, backend=COMPILE_BACKEND)(logits, target)
    loss.backward()
    x64 = as_float64_leaf(logits)
    ref = torch_loss(x64 * 0.5, target, -100, "mean", 0.1, 1e-4)
    ref.backward()
    assert rel_err(loss, ref) < 1e-5
    assert rel_err(logits.grad, x64.grad) < 1e-5


def test_deterministic():
    logits = logits_leaf(64, 1000)
    target = targets(64, 1000, ignored=(3,))
    grads = []
    for _ in range(2):
        logits.grad = None
        cross_entropy(logits, target, label_smoothing=0.1).backward()
        grads.append(logits.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_module():
    logits, target = logits_leaf(5, 100), targets(5, 100)
    loss = CrossEntropyLoss(reduction="sum", label_smoothing=0.1)(logits, target)
    ref = F.cross_entropy(logits.detach().double(), target, reduction="sum", label_smoothing=0.1)
    assert rel_err(loss, ref) < 1e-5


def test_out_of_range_target_nan_or_debug_error(monkeypatch):
    logits = logits_leaf(4, 64)
    target = torch.tensor([1, 64, -100, 3], device=DEVICE)
    loss = cross_entropy(logits, target, reduction="none")
    assert loss[1].isnan() and torch.isfinite(loss[[0, 2, 3]]).all()
    monkeypatch.setenv("TINYFUSE_DEBUG", "1")
    with pytest.raises(IndexError, match=r"target: values must lie in \[0, 64\)"):
        cross_entropy(logits, target)
    with pytest.raises(IndexError, match="target: values must lie"):
        reference.cross_entropy(logits, target)


def test_bad_inputs_get_clear_errors():
    logits, target = torch.randn(4, 10, device=DEVICE), targets(4, 10)
    with pytest.raises(TypeError, match="target: expected an int64"):
        cross_entropy(logits, target.float())
    with pytest.raises(ValueError, match=r"target: expected shape \(4,\)"):
        cross_entropy(logits, targets(5, 10))
    with pytest.raises(ValueError, match="reduction: expected one of"):
        cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing: expected a value in"):
        cross_entropy(logits, target, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="z_loss: expected a value >= 0"):
        cross_entropy(logits, target, z_loss=-1.0)
    with pytest.raises(ValueError, match=r"logits: expected 2 dims"):
        cross_entropy(logits[None], target)
    with pytest.raises(TypeError, match="logits: expected dtype"):
        cross_entropy(logits.long(), target)


@gpu_only("needs a CUDA device: tensors on two devices")
def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="target: expected a tensor on cuda"):
        cross_entropy(torch.randn(4, 10, device="cuda"), torch.zeros(4, dtype=torch.long))
