"""kernels.linear and the working copies behind it: the product reads a bf16 copy of a
float32 master weight, the master's gradient comes back in float32 (no cast kernel either
way), the model keeps the copies equal to the masters, and the fused loss reads the output
layer's copy. References are float64 products of the same bf16 operands."""
import pytest
import torch
import torch.nn.functional as F

from helpers import COMPILE_BACKEND, DEVICE, TINY_MODEL, rel_err
from tinyfuse.engine.model import ModelConfig, Transformer
from tinyfuse.kernels import linear, linear_cross_entropy, reference


def _operands(n=37, d_in=48, d_out=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n, d_in, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    weight = torch.randn(d_out, d_in, generator=g).to(DEVICE).requires_grad_()
    grad_y = torch.randn(3, n, d_out, generator=g).to(DEVICE, torch.bfloat16)
    return x, weight, weight.detach().to(torch.bfloat16), grad_y


def test_linear_reads_the_copy_and_returns_a_float32_master_gradient():
    x, weight, working, grad_y = _operands()
    y = linear(x, weight, working)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.detach(), working)), "the product of the copy, as autocast's cast would give"
    y.backward(grad_y)
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    x64, g64 = x.detach().double().reshape(-1, 48), grad_y.double().reshape(-1, 40)
    # The weight gradient is never rounded to bf16: float32 accumulation of exact bf16 products.
    assert rel_err(weight.grad, g64.T @ x64) < 1e-6
    assert rel_err(x.grad, (g64 @ working.double()).view(x.shape)) < 1e-2
    # A second micro-batch accumulates in float32 too.
    first = weight.grad.clone()
    linear(x.detach(), weight, working).backward(grad_y)
    assert rel_err(weight.grad, 2 * first) < 1e-6


def test_linear_without_a_matching_copy_is_plain_linear():
    x, weight, working, _ = _operands()
    x32 = x.detach().float()
    assert torch.equal(linear(x32, weight, working), F.linear(x32, weight)), "float32 input: the master is read"
    assert torch.equal(linear(x32, weight), F.linear(x32, weight))


def test_linear_compiles_fullgraph():
    x, weight, working, grad_y = _operands()
    compiled = torch.compile(linear, fullgraph=True, backend=COMPILE_BACKEND)
    compiled(x, weight, working).backward(grad_y)
    eager_grad = weight.grad.clone()
    weight.grad = None
    linear(x, weight, working).backward(grad_y)
    assert rel_err(eager_grad, weight.grad) < 1e-6


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_linear_cross_entropy_reads_the_working_copy(fused):
    loss_fn = linear_cross_entropy if fused else reference.linear_cross_entropy
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(29, 32, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    weight = (0.2 * torch.randn(70, 32, generator=g)).to(DEVICE).requires_grad_()
    target = torch.randint(0, 70, (29,), generator=g).to(DEVICE)
    loss = loss_fn(hidden, weight, target, working_weight=weight.detach().to(torch.bfloat16))
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = loss_fn(hidden, weight, target)
    plain.backward()
    assert weight.grad.dtype == grads[1].dtype == torch.float32
    assert rel_err(loss, plain) < 1e-6
    assert rel_err(grads[0], hidden.grad) < 1e-2 and rel_err(grads[1], weight.grad) < 1e-2
    with pytest.raises(ValueError, match="working_weight: expected weight's shape \\(70, 32\\)"):
        loss_fn(hidden, weight, target, working_weight=weight.detach()[:5].to(torch.bfloat16))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_model_keeps_working_copies_equal_to_the_masters(tie):
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY_MODEL, vocab_size=96, tie_embeddings=tie)
    model = Transformer(cfg).to(DEVICE)
    model.keep_working_copies(torch.bfloat16)
    copies, masters = model._working
    assert len(copies) == 4 * cfg.n_layers + 1, "every projection and the output layer"
    assert len({c.untyped_storage().data_ptr() for c in copies}) == 1, "one buffer"

    def in_step():
        return all(torch.equal(c, m.detach().to(torch.bfloat16)) for c, m in zip(copies, masters))

    assert in_step()
    with torch.no_grad():
        for m in masters:
            m.add_(0.01)
    assert not in_step()
    model.refresh_working_copies()
    assert in_step()
    other = Transformer(cfg).to(DEVICE)
    model.load_state_dict(other.state_dict())  # a resume, an --init-from
    assert in_step() and torch.equal(copies[0], other.layers[0].attention.wqkv.weight.detach().to(torch.bfloat16))

    # Under bf16 autocast the loss is the one autocast's own casts give (the same bf16
    # operands), and the masters' gradients are float32.
    tokens = torch.randint(0, 96, (2, 16), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    plain = Transformer(cfg).to(DEVICE)
    plain.load_state_dict(model.state_dict())
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        expected = plain(tokens[:, :-1], tokens[:, 1:])
    expected.backward()
    assert rel_err(loss, expected) < 1e-6
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.grad.dtype == torch.float32
        assert rel_err(p.grad, q.grad) < 2e-2, name
