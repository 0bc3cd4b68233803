"""A Llama block's fused ops under full inductor compilation (the per-op compile
tests use aot_eager on CPU to stay fast; see conftest)."""
import torch

from helpers import DEVICE, as_float64_leaf, leaf, rel_err
from tinyfuse.kernels import add_rms_norm, reference, rope, rope_tables, swiglu


def test_block_compiles_with_inductor_fullgraph():
    B, T, H, D = 2, 4, 2, 8
    dim = H * D
    cos, sin = rope_tables(T, D, device=DEVICE)
    x, r, w = leaf((B, T, dim), torch.float32), leaf((B, T, dim), torch.float32), leaf((dim,), torch.float32)

    def block(ops, x, r, w):
        y, h = ops.add_rms_norm(x, r, w)
        q, k = ops.rope(y.view(B, T, H, D), h.view(B, T, H, D), cos, sin)
        return ops.swiglu(q.flatten(2), k.flatten(2)) + h

    class Fused:
        add_rms_norm, rope, swiglu = staticmethod(add_rms_norm), staticmethod(rope), staticmethod(swiglu)

    out = torch.compile(lambda *a: block(Fused, *a), fullgraph=True, backend="inductor")(x, r, w)
    out.sum().backward()
    x64, r64, w64 = as_float64_leaf(x), as_float64_leaf(r), as_float64_leaf(w)
    ref = block(reference, x64, r64, w64)
    ref.sum().backward()
    assert rel_err(out, ref) < 1e-5
    for ours, theirs in ((x, x64), (r, r64), (w, w64)):
        assert rel_err(ours.grad, theirs.grad) < 1e-5


def test_model_compiles_fullgraph_with_the_fused_ops():
    """The whole Transformer (rope_qkv returning a view of its input, the packed SwiGLU,
    the stored-gradient loss) as one graph, equal to the same model run eagerly."""
    from helpers import COMPILE_BACKEND, TINY_MODEL
    from tinyfuse.engine.model import ModelConfig, Transformer

    config = ModelConfig.from_dict({**TINY_MODEL, "vocab_size": 64})
    eager = Transformer(config, kernels="triton").to(DEVICE)
    compiled = Transformer(config, kernels="triton").to(DEVICE)
    compiled.load_state_dict(eager.state_dict())
    tokens = torch.randint(0, 64, (2, 12), device=DEVICE)
    targets = torch.randint(0, 64, (2, 12), device=DEVICE)
    loss = torch.compile(compiled, fullgraph=True, backend=COMPILE_BACKEND)(tokens, targets)
    ref = eager(tokens, targets)
    loss.backward()
    ref.backward()
    assert rel_err(loss, ref) < 1e-5
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert rel_err(q.grad, p.grad) < 1e-5, name
