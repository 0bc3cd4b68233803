"""engine/model.py: configuration, presets, the two kernel paths, causality, the KV cache."""
import math

import pytest
import torch

from helpers import TINY_MODEL, rel_err
from tinyfuse.engine.model import PRESETS, ModelConfig, Transformer, preset

TINY = {**TINY_MODEL, "vocab_size": 96, "max_seq_len": 24}


def test_presets_match_llama2c():
    assert set(PRESETS) == {"stories260K", "stories15M", "stories42M", "stories110M"}
    cfg = preset("stories260K")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.max_seq_len, cfg.vocab_size) == (64, 5, 8, 4, 512, 512)
    assert cfg.hidden_dim == 4 * math.ceil(int(8 * 64 / 3) / 4) == 172
    assert preset("stories15M").hidden_dim == 768 and preset("stories110M").hidden_dim == 2048
    # llama2.c's stories15M has 15,191,712 parameters (tied embedding counted once).
    with torch.device("meta"):
        assert Transformer(preset("stories15M")).num_params() == 15_191_712
    assert preset("stories42M", vocab_size=4096).vocab_size == 4096


@pytest.mark.parametrize("changes, message", [
    (dict(dim=30), "not divisible by n_heads"),
    (dict(n_kv_heads=3), "not divisible by n_kv_heads"),
    (dict(dim=36, n_heads=12, n_kv_heads=12), "odd"),
    (dict(n_layers=0), "n_layers must be a positive"),
    (dict(vocab_size=-1), "vocab_size must be a positive"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_bad_configs(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**TINY, **changes}).validate()
    with pytest.raises(ValueError, match="unknown preset"):
        preset("stories1B")


def _models(dtype):
    torch.manual_seed(0)
    fused = Transformer(ModelConfig(**TINY), kernels="triton")
    plain = Transformer(ModelConfig(**TINY), kernels="torch")
    plain.load_state_dict(fused.state_dict())
    return fused.to(dtype), plain.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_and_torch_kernels_agree(dtype, device):
    fused, plain = (m.to(device) for m in _models(dtype))
    tokens = torch.randint(0, TINY["vocab_size"], (3, 17), device=device)
    targets = torch.randint(0, TINY["vocab_size"], (3, 17), device=device)
    losses, grads = [], []
    for model in (fused, plain):
        loss = model(tokens, targets)
        loss.backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(losses[0].item() - losses[1].item()) <= tol * abs(losses[1].item())
    for name in grads[1]:
        assert rel_err(grads[0][name], grads[1][name]) < tol, name
    assert math.isclose(losses[1].item(), math.log(TINY["vocab_size"]), rel_tol=0.05), "a fresh model is near uniform"


def test_causal_and_cache_match_the_full_forward():
    torch.manual_seed(1)
    model = Transformer(ModelConfig(**TINY)).eval()
    tokens = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad():
        full = model(tokens)
        changed = tokens.clone()
        changed[0, 8:] = (changed[0, 8:] + 1) % TINY["vocab_size"]
        assert torch.equal(model(changed)[0, :8], full[0, :8]), "a position must not see later tokens"
        caches = model.new_cache(1, "cpu", torch.float32)
        step = [model.forward_cached(tokens[:, :5], caches, 0)]
        for pos in range(5, 12):
            step.append(model.forward_cached(tokens[:, pos:pos + 1], caches, pos))
    assert rel_err(torch.cat(step), full[0, 4:]) < 1e-5


def test_initialisation():
    torch.manual_seed(2)
    cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=8)
    model = Transformer(cfg)
    assert model.tok_embeddings.weight is not None and model.layers[0].attention_norm.eq(1).all()
    assert abs(model.layers[0].attention.wqkv.weight.std().item() - 0.02) < 1e-3
    scaled = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert abs(model.layers[0].attention.wo.weight.std().item() - scaled) < 1e-3 * scaled / 0.02 * 5
    assert abs(model.layers[0].feed_forward.w2.weight.std().item() - scaled) < 1e-3
    assert model.layers[0].attention.wqkv.bias is None


def test_flash_attn_missing_and_too_long_sequences():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="flash-attn"):
            Transformer(ModelConfig(**TINY), attention="flash-attn")
    model = Transformer(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="max_seq_len 24"):
        model(torch.zeros(1, 25, dtype=torch.long))
