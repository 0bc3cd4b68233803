"""linear_cross_entropy: the cases outside `tinyfuse check`'s table. Its grid of dtypes x shapes against
float64 lives in kernels/check.py and runs in tests/test_check.py."""
import pytest
import torch

from helpers import COMPILE_BACKEND, DEVICE, TOLERANCE, as_float64_leaf, leaf, rel_err, gpu_only
from tinyfuse.kernels import LinearCrossEntropyLoss, linear_cross_entropy, reference
from tinyfuse.kernels.linear_cross_entropy import default_chunk_size


def targets(n, v, ignored=()):
    t = torch.randint(0, v, (n,), device=DEVICE)
    t[list(ignored)] = -100
    return t


def check(hidden, weight, target, tol, **options):
    loss = linear_cross_entropy(hidden, weight, target, **options)
    upstream = torch.rand(loss.shape, device=DEVICE, dtype=torch.float64) + 0.5
    (loss.double() * upstream).sum().backward()
    h64, w64 = as_float64_leaf(hidden), as_float64_leaf(weight)
    options.pop("chunk_size", None)
    options.pop("memory_budget", None)
    ref = reference.cross_entropy(h64 @ w64.T, target, **options)
    (ref * upstream).sum().backward()
    assert loss.dtype == hidden.dtype and loss.shape == ref.shape
    assert rel_err(loss, ref) < tol
    assert rel_err(hidden.grad, h64.grad) < tol
    assert rel_err(weight.grad, w64.grad) < tol


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16, 40, 1000])
def test_chunk_sizes_match_materialised(chunk_size):
    check(leaf((40, 48), torch.float32), leaf((500, 48), torch.float32, 0.5), targets(40, 500, ignored=(2, 9)),
          1e-5, chunk_size=chunk_size, label_smoothing=0.1, memory_budget=0)


@pytest.mark.parametrize("budget", [None, 0], ids=["stored", "chunked"])  # the two paths
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_master_weight_with_half_hidden(dtype, budget):
    """The model's case: a float32 weight and half activations. The products run in the
    activations' dtype; the weight's gradient comes back in float32 as accumulated, not
    rounded to half on the way (most of its values are not half-representable)."""
    hidden, weight = leaf((24, 64), dtype), leaf((512, 64), torch.float32, 0.5)
    check(hidden, weight, targets(24, 512, ignored=(5,)), TOLERANCE[dtype], chunk_size=10, memory_budget=budget)
    assert weight.grad.dtype == torch.float32
    assert (weight.grad != weight.grad.to(dtype).float()).float().mean() > 0.5


def test_stored_path_runs_three_matmuls_and_chunked_four():
    """The stored gradient saves the backward's recomputation of the logits; without a
    gradient (evaluation) nothing is stored and the forward is one matmul per chunk."""
    from torch.profiler import profile

    def matmuls(budget, grad=True):
        hidden, weight = leaf((12, 16), torch.float32), leaf((40, 16), torch.float32)
        with profile() as prof, torch.set_grad_enabled(grad):
            loss = linear_cross_entropy(hidden, weight, targets(12, 40), chunk_size=12, memory_budget=budget)
            if grad:
                loss.backward()
        return sum(e.name in ("aten::mm", "aten::addmm", "aten::addmm_") for e in prof.events())

    assert (matmuls(None), matmuls(0), matmuls(None, grad=False)) == (3, 4, 1)


@pytest.mark.parametrize("budget", [None, 0], ids=["stored", "chunked"])
def test_all_ignored_mean_is_nan_with_zero_gradients(budget):
    hidden, weight = leaf((5, 16), torch.float32), leaf((30, 16), torch.float32)
    loss = linear_cross_entropy(hidden, weight, torch.full((5,), -100, device=DEVICE), memory_budget=budget)
    loss.backward()
    assert torch.isnan(loss) and torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("budget", [None, 0], ids=["stored", "chunked"])  # the two paths
def test_tied_embedding_gets_both_gradients(budget):
    emb = leaf((256, 32), torch.float32)
    tokens = torch.randint(0, 256, (20,), device=DEVICE)
    target = targets(20, 256)
    loss = linear_cross_entropy(torch.nn.functional.embedding(tokens, emb) * 2.0, emb, target, chunk_size=6,
                                memory_budget=budget)
    loss.backward()
    emb64 = as_float64_leaf(emb)
    ref = reference.cross_entropy((torch.nn.functional.embedding(tokens, emb64) * 2.0) @ emb64.T, target)
    ref.backward()
    assert rel_err(loss, ref) < 1e-5
    assert rel_err(emb.grad, emb64.grad) < 1e-5


def test_default_chunk_size_bounds():
    assert default_chunk_size(8192, 32000, 288) == 2048  # 2^26 / 32000 = 2097 rows, rounded down
    assert default_chunk_size(100, 32000, 288) == 100  # never more than n
    assert default_chunk_size(1 << 20, 262144, 4096) == 16384  # chunk logits the size of hidden
    assert default_chunk_size(4096, 1 << 20, 64) == 256  # at least 256 rows
    n, v, d = 40, 500, 48
    check(leaf((n, d), torch.float32), leaf((v, d), torch.float32, 0.5), targets(n, v), 1e-5)


@pytest.mark.parametrize("budget", [None, 0], ids=["stored", "chunked"])  # the two paths
def test_torch_compile_fullgraph(budget):
    hidden, weight = leaf((16, 32), torch.float32), leaf((200, 32), torch.float32)
    target = targets(16, 200, ignored=(3,))
    loss = torch.compile(lambda h, w, t: linear_cross_entropy(h * 2.0, w, t, chunk_size=5, label_smoothing=0.1,
                                                              memory_budget=budget),
                         fullgraph=True, backend=COMPILE_BACKEND)(hidden, weight, target)
    loss.backward()
    h64, w64 = as_float64_leaf(hidden), as_float64_leaf(weight)
    ref = reference.cross_entropy((h64 * 2.0) @ w64.T, target, label_smoothing=0.1)
    ref.backward()
    assert rel_err(loss, ref) < 1e-5
    assert rel_err(hidden.grad, h64.grad) < 1e-5 and rel_err(weight.grad, w64.grad) < 1e-5


@pytest.mark.parametrize("budget", [None, 0], ids=["stored", "chunked"])  # the two paths
def test_deterministic(budget):
    hidden, weight = leaf((50, 32), torch.float32), leaf((300, 32), torch.float32)
    target = targets(50, 300)
    grads = []
    for _ in range(2):
        hidden.grad = weight.grad = None
        linear_cross_entropy(hidden, weight, target, chunk_size=8, memory_budget=budget).backward()
        grads.append((hidden.grad.clone(), weight.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_module():
    hidden, weight, target = leaf((6, 16), torch.float32), leaf((50, 16), torch.float32), targets(6, 50)
    loss = LinearCrossEntropyLoss(reduction="sum", chunk_size=4)(hidden, weight, target)
    ref = reference.cross_entropy(hidden.detach().double() @ weight.detach().double().T, target, reduction="sum")
    assert rel_err(loss, ref) < 1e-5


def test_bad_inputs_get_clear_errors():
    hidden, weight, target = torch.randn(4, 8, device=DEVICE), torch.randn(20, 8, device=DEVICE), targets(4, 20)
    with pytest.raises(ValueError, match=r"weight: expected shape \(V, 8\)"):
        linear_cross_entropy(hidden, torch.randn(20, 9, device=DEVICE), target)
    with pytest.raises(ValueError, match=r"target: expected shape \(4,\)"):
        linear_cross_entropy(hidden, weight, targets(3, 20))
    with pytest.raises(TypeError, match="target: expected an int64"):
        linear_cross_entropy(hidden, weight, target.float())
    with pytest.raises(TypeError, match="weight: expected the dtype of hidden"):
        linear_cross_entropy(hidden, weight.half(), target)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        linear_cross_entropy(hidden, weight, target, reduction="batchmean")
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, target, label_smoothing=-1.0)
    with pytest.raises(ValueError, match="z_loss"):
        linear_cross_entropy(hidden, weight, target, z_loss=-1e-4)
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        linear_cross_entropy(hidden, weight, target, chunk_size=0)
    with pytest.raises(ValueError, match="memory_budget: expected bytes as an int >= 0 or None; got -1"):
        linear_cross_entropy(hidden, weight, target, memory_budget=-1)


@gpu_only("peak memory is measured with the CUDA allocator")
def test_peak_memory_is_one_chunk_not_full_logits():
    n, d, v, chunk = 4096, 288, 32000, 256
    hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(v, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, v, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_cross_entropy(hidden, weight, target, chunk_size=chunk, memory_budget=0).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = hidden.numel() * 2 + weight.numel() * (2 + 4)  # grad_hidden, grad_weight and its float32 accumulator
    one_chunk = chunk * v * 2
    workspace = 32 << 20  # cuBLAS workspace and per-row loss/lse vectors
    assert extra < grads + one_chunk + workspace, (extra, grads + one_chunk + workspace)
    assert extra < n * v * 2  # less than the full bf16 logits alone
