"""Benchmark: rope (q and k rotated in one launch) against torch.

    python -m tinyfuse.bench.rope [--smoke] [--json FILE]

Byte model, q of [B, T, Hq, D] and k of [B, T, Hk, D] elements of the input dtype (the
float32 cos/sin tables, T x D, are left out): forward reads q and k and writes both
rotated (2 (Q + K)); backward the same for their gradients (2 (Q + K)).
Layouts: tinyfuse and torch rotate llama2.c's interleaved pairs in [B, T, H, D]; Liger
rotates Hugging Face's halves in [B, H, T, D], given as a transposed view of the same
tensors (same bytes, its own layout).
"""
import sys

import torch
from tinyfuse import kernels
from tinyfuse.kernels import reference

from .kernels import Case, compiled, leaf, liger, main_for, preset_shapes, sweep_hidden

OPS = ("rope",)


def _make(b, t, hq, hk, d):
    def make(device, dtype):
        cos, sin = kernels.rope_tables(t, d, device=device)
        return leaf((b, t, hq, d), device, dtype), leaf((b, t, hk, d), device, dtype), cos, sin
    return make


def cases(op, smoke):
    shapes = [(name, b, t, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) for name, b, t, cfg in preset_shapes(smoke)]
    d = 64 if smoke else 128
    for m, n in sweep_hidden(smoke):
        b = max(1, m // 2048)
        shapes.append(("sweep", b, m // b, n // d, n // d, d))
    out = []
    for group, b, t, hq, hk, d in shapes:
        elements = b * t * (hq + hk) * d
        out.append(Case(op, group, (b, t, hq, hk, d), hq * d, _make(b, t, hq, hk, d),
                        {"fwd": 2 * elements, "bwd": 2 * elements, "fwd+bwd": 4 * elements}))
    return out


def impls(op, backend):
    found = {"tinyfuse": lambda q, k, cos, sin: kernels.rope(q, k, cos, sin, interleaved=True),
             "torch": lambda q, k, cos, sin: reference.rope(q, k, cos, sin, interleaved=True),
             "torch.compile": compiled(lambda q, k, cos, sin: reference.rope(q, k, cos, sin, interleaved=True), backend)}
    lk = liger()
    if lk:
        def liger_rope(q, k, cos, sin):
            full_cos, full_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
            return lk.liger_rope(q.transpose(1, 2), k.transpose(1, 2), full_cos, full_sin)
        found["liger"] = liger_rope
    return found


if __name__ == "__main__":
    main_for(sys.modules[__name__])
