"""Benchmark: swiglu, silu(gate) * up, and geglu, gelu_tanh(gate) * up, against torch.

    python -m tinyfuse.bench.swiglu [--smoke] [--json FILE]

Byte model, gate and up of [M, N] elements of the input dtype: forward reads both and
writes the product (3MN); backward reads dy, gate and up and writes both gradients (5MN).
geglu has the same kernels and byte model; it runs at the presets' shapes only.
"""
import sys

from tinyfuse import kernels
from tinyfuse.kernels import reference

from .kernels import Case, compiled, leaf, liger, main_for, preset_shapes, sweep_hidden

OPS = ("swiglu", "geglu")


def cases(op, smoke):
    shapes = [(name, b * t, cfg.hidden_dim) for name, b, t, cfg in preset_shapes(smoke)]
    if op == "swiglu":
        shapes += [("sweep", m, n) for m, n in sweep_hidden(smoke)]
    return [Case(op, group, (m, n), n,
                 (lambda m, n: lambda device, dtype: (leaf((m, n), device, dtype), leaf((m, n), device, dtype)))(m, n),
                 {"fwd": 3 * m * n, "bwd": 5 * m * n, "fwd+bwd": 8 * m * n})
            for group, m, n in shapes]


def impls(op, backend):
    ours, plain = (kernels.swiglu, reference.swiglu) if op == "swiglu" else (kernels.geglu, reference.geglu)
    found = {"tinyfuse": ours, "torch": plain, "torch.compile": compiled(lambda g, u: plain(g, u), backend)}
    lk = liger()
    if lk:
        found["liger"] = lk.liger_swiglu if op == "swiglu" else lk.liger_geglu
    return found


if __name__ == "__main__":
    main_for(sys.modules[__name__])
