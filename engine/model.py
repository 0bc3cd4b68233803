"""The Llama model of llama2.c, readable top to bottom.

Token embedding tied to the output layer (llama2.c's default; untied when imported so),
pre-norm RMSNorm, rotary embeddings (interleaved
pairs, theta 10000), grouped-query attention, SwiGLU MLP, no biases. The q/k/v and the
gate/up projections are fused into one matrix each (one GEMM instead of three or two);
interop splits them back into llama2.c's wq/wk/wv and w1/w3.

kernels="triton" runs the fused ops of tinyfuse.kernels; kernels="torch" the same functions
from tinyfuse.kernels.reference. The residual stream runs in the compute dtype (bf16 under
autocast), which both paths share, so they agree to that dtype's rounding.
"""
import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from .runtime import SDPA_BACKENDS, sdpa_backend
from .settings import setting, settings_from_dict


# What a configuration (and so a checkpoint's header or config.json) may ask for: far above
# the TinyStories family, low enough that no header makes the tool allocate without bound.
MODEL_LIMITS = {"dim": 65536, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024, "vocab_size": 1 << 24,
                "hidden_dim": 1 << 20, "max_seq_len": 1 << 20}


@dataclass
class ModelConfig:
    """The model's shape; every field is also a `tinyfuse train` flag."""
    dim: int = setting(288, "width of the residual stream")
    n_layers: int = setting(6, "transformer blocks")
    n_heads: int = setting(6, "attention heads")
    n_kv_heads: int | None = setting(None, "key/value heads (grouped-query attention); default: n_heads")
    vocab_size: int = setting(32000, "vocabulary size; default: the data's")
    hidden_dim: int | None = setting(None, "SwiGLU width; default: multiple_of * ceil(int(8 * dim / 3) / multiple_of)")
    multiple_of: int = setting(32, "round the default hidden_dim up to a multiple of this")
    norm_eps: float = setting(1e-5, "RMSNorm epsilon")
    max_seq_len: int = setting(256, "the longest context (RoPE tables, KV cache)")
    rope_theta: float = setting(10000.0, "RoPE base")
    tie_embeddings: bool = setting(True, "the output layer reuses the token embedding")

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None and self.multiple_of > 0:
            self.hidden_dim = self.multiple_of * math.ceil(int(8 * self.dim / 3) / self.multiple_of)

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def validate(self):
        """Raise ValueError with one clear line for a configuration that cannot be built."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model {name} must be a positive integer; got {value!r}")
            if value > MODEL_LIMITS.get(name, value):
                raise ValueError(f"model {name} {value} is above tinyfuse's limit of {MODEL_LIMITS[name]}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"model {name} must be a positive finite number; got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"model dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model head dim {self.head_dim} (dim / n_heads) is odd; RoPE rotates pairs")
        return self

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        return settings_from_dict(cls, values, "model")


PRESETS = {
    "stories260K": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, multiple_of=4, max_seq_len=512, vocab_size=512),
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, max_seq_len=256, vocab_size=32000),
    "stories42M": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, max_seq_len=1024, vocab_size=32000),
    "stories110M": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq_len=1024, vocab_size=32000),
}


def preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})


# Attention: SDPA's own choice of backend, one of its backends, or the flash-attn package.
ATTENTION = ("sdpa", *SDPA_BACKENDS, "flash-attn")


def _ops(kernels):
    if kernels == "triton":
        import tinyfuse.kernels as ops
    elif kernels == "torch":
        from tinyfuse.kernels import reference as ops
    else:
        raise ValueError(f"kernels must be 'triton' or 'torch'; got {kernels!r}")
    return ops


def default_kernels(device):
    """The fused kernels where Triton compiles them (CUDA); the reference ops elsewhere."""
    return "triton" if torch.device(device).type == "cuda" else "torch"


class Linear(nn.Linear):
    """nn.Linear without bias whose product reads `working`, a half copy of its float32
    weight, when one is kept (Transformer.keep_working_copies): no cast kernel in the
    forward or the backward (see tinyfuse.kernels.linear)."""
    working = None

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x):
        from tinyfuse.kernels.linear import linear

        return linear(x, self.weight, self.working)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: str):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.attention = attention
        self.backend = sdpa_backend(attention) if attention in SDPA_BACKENDS else None
        if attention == "flash-attn":
            try:
                from flash_attn import flash_attn_func
            except ImportError as e:
                raise ImportError("attention='flash-attn' needs the flash-attn package: pip install -e \".[flash-attn]\"") from e
            self._flash = flash_attn_func
        elif attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}; got {attention!r}")

    def forward(self, x, cos, sin, ops, cache=None, start=0):
        b, t, _ = x.shape
        # q, k rotated, v: [B, T, heads, head_dim]; one [B, T, (H + 2 Hkv) D] gradient back into wqkv
        q, k, v = ops.rope_qkv(self.wqkv(x), cos[start:start + t], sin[start:start + t], self.n_heads,
                               self.n_kv_heads, interleaved=True)
        if cache is not None:  # [B, max_seq, kv_heads, head_dim] each, filled up to start + t
            cache[0][:b, start:start + t] = k
            cache[1][:b, start:start + t] = v
            k, v = cache[0][:b, :start + t], cache[1][:b, :start + t]
        if self.attention == "flash-attn":
            y = self._flash(q, k, v, causal=True)
        else:
            # Causal within the new tokens; a single new token attends to the whole cache.
            with sdpa_kernel(self.backend) if self.backend is not None else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                    is_causal=t > 1, enable_gqa=self.n_heads != self.n_kv_heads,
                ).transpose(1, 2)
        return self.wo(y.reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = Linear(cfg.dim, 2 * cfg.hidden_dim)  # [gate; up]
        self.w2 = Linear(cfg.hidden_dim, cfg.dim)

    def forward(self, x, ops):
        return self.w2(ops.swiglu(self.w13(x)))  # one [N, 2H] gradient back into w13


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: str):
        super().__init__()
        self.eps = cfg.norm_eps
        self.attention_norm = nn.Parameter(torch.ones(cfg.dim))
        self.attention = Attention(cfg, attention)
        self.ffn_norm = nn.Parameter(torch.ones(cfg.dim))
        self.feed_forward = FeedForward(cfg)

    def forward(self, delta, residual, cos, sin, ops, cache=None, start=0):
        """Takes the previous block's output `delta` and the residual stream before it; the
        add and the norm are one fused op. The norm weights go in as they are (float32): the
        ops do float32 math on any weight dtype, so there is no cast forward and their
        float32 gradient needs none backward."""
        if residual is None:
            residual = delta
            h = ops.rms_norm(residual, self.attention_norm, self.eps)
        else:
            h, residual = ops.add_rms_norm(delta, residual, self.attention_norm, self.eps)
        delta = self.attention(h, cos, sin, ops, cache, start)
        h, residual = ops.add_rms_norm(delta, residual, self.ffn_norm, self.eps)
        return self.feed_forward(h, ops), residual


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels="torch", attention="sdpa"):
        super().__init__()
        self.config = cfg.validate()
        self.kernels = kernels
        self.ops = _ops(kernels)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, attention) for _ in range(cfg.n_layers))
        self.norm = nn.Parameter(torch.ones(cfg.dim))
        self.output = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size)
        self._rope = None  # float32 tables, kept out of .to(dtype)'s reach
        self._working = None  # (copies, masters) while keep_working_copies is on
        self.reset_parameters()
        self.register_load_state_dict_post_hook(lambda module, keys: module.refresh_working_copies())

    def reset_parameters(self):
        """N(0, 0.02); the projections that write into the residual stream (wo, w2) get
        0.02 / sqrt(2 * n_layers), as in GPT-2 and llama2.c."""
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, 0.02)

    def output_weight(self):
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def keep_working_copies(self, dtype):
        """Keep a `dtype` copy of every matrix that a product reads (the projections and the
        output layer, tied or not) in one buffer, for training under autocast: the forward
        then reads the copies and launches no weight casts. The float32 parameters stay the
        masters the optimizer updates; refresh_working_copies() after each update (one
        multi-tensor copy) keeps the copies equal to them, and loading a state dict
        refreshes them too."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        masters = [m.weight for m in linears] + ([self.tok_embeddings.weight] if self.output is None else [])
        flat = torch.empty(sum(p.numel() for p in masters), dtype=dtype, device=masters[0].device)
        copies = [c.view(p.shape) for c, p in zip(flat.split([p.numel() for p in masters]), masters)]
        for m, c in zip(linears, copies):
            m.working = c
        self._working = (copies, masters)
        self.refresh_working_copies()

    @torch.no_grad()
    def refresh_working_copies(self):
        if self._working is not None:
            torch._foreach_copy_(*self._working)

    def _output_working_for(self, h):
        """The output layer's working copy, when one is kept in h's dtype."""
        if self._working is None:
            return None
        working = self._working[0][-1] if self.output is None else self.output.working
        return working if working.dtype == h.dtype else None

    def num_params(self):
        """Parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def rope_tables(self, device, length):
        """cos, sin for at least `length` positions; grown on demand (to a power of two, at most
        max_seq_len), so a long max_seq_len costs nothing until it is used."""
        if self._rope is None or self._rope[0].device != device or self._rope[0].shape[0] < length:
            from tinyfuse.kernels.rope import rope_tables

            cfg = self.config
            rows = min(cfg.max_seq_len, max(256, 1 << (length - 1).bit_length()))
            self._rope = rope_tables(rows, cfg.head_dim, theta=cfg.rope_theta, device=device)
        return self._rope

    def _trunk(self, tokens, caches=None, start=0):
        b, t = tokens.shape
        if start + t > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds the model's max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_tables(tokens.device, start + t)
        dtype = torch.get_autocast_dtype(tokens.device.type) if torch.is_autocast_enabled(tokens.device.type) \
            else self.tok_embeddings.weight.dtype
        delta, residual = self.tok_embeddings(tokens).to(dtype), None
        for i, layer in enumerate(self.layers):
            delta, residual = layer(delta, residual, cos, sin, self.ops,
                                    None if caches is None else caches[i], start)
        h, _ = self.ops.add_rms_norm(delta, residual, self.norm, self.config.norm_eps)
        return h

    def forward(self, tokens, targets=None):
        """With targets: the mean next-token loss (fused linear cross-entropy, no [N, V]
        logits). Without: the logits of every position."""
        h = self._trunk(tokens)
        if targets is None:
            return h @ self.output_weight().to(h.dtype).T
        # The float32 weight goes in as it is: its gradient comes back in float32.
        loss = self.ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.output_weight(), targets.reshape(-1),
                                             working_weight=self._output_working_for(h))
        return loss.float()

    def token_losses(self, tokens, targets):
        """Float32 next-token losses [B, T] (0 where the target is -100), the output layer in
        float32 whatever the trunk's dtype: what evaluation sums."""
        h = self._trunk(tokens)
        loss = self.ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]).float(), self.output_weight().float(),
                                             targets.reshape(-1), reduction="none")
        return loss.view(targets.shape)

    def new_cache(self, batch_size, device, dtype, length=None):
        """Key and value buffers per layer for `length` positions (default: max_seq_len)."""
        cfg = self.config
        shape = (batch_size, min(length or cfg.max_seq_len, cfg.max_seq_len), cfg.n_kv_heads, cfg.head_dim)
        return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                for _ in range(cfg.n_layers)]

    def forward_cached(self, tokens, caches, start):
        """Logits of the last position, appending the tokens' keys and values to the caches."""
        h = self._trunk(tokens, caches, start)[:, -1]
        return h @ self.output_weight().to(h.dtype).T

    def flops_per_token(self, seq_len):
        """PaLM's estimate: 6 N for the matmuls with weights, 12 L H Q T for attention."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
