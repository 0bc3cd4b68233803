"""Benchmark: rms_norm and add_rms_norm (the residual add fused in) against torch.

    python -m tinyfuse.bench.rms_norm [--smoke] [--json FILE]

Byte model, x of [M, N] elements of the input dtype (the weight and the float32 row
statistics are under 1% and left out):
- rms_norm: forward reads x, writes y (2MN); backward reads dy and x, writes dx (3MN).
- add_rms_norm: forward reads x and the residual, writes y and the sum h (4MN); backward
  reads dy, dh and h, writes dx, which is also the residual's gradient (4MN).
- gemma_rms_norm: rms_norm scaling by 1 + weight (offset=1.0), as rms_norm; at the
  presets' shapes only (its kernels differ from rms_norm's by one add a weight element).
"""
import sys

from tinyfuse import kernels
from tinyfuse.kernels import reference

from .kernels import Case, compiled, leaf, liger, main_for, preset_shapes, sweep_hidden

OPS = ("rms_norm", "add_rms_norm", "gemma_rms_norm")
EPS = 1e-5


def cases(op, smoke):
    shapes = [(name, b * t, cfg.dim) for name, b, t, cfg in preset_shapes(smoke)]
    if op != "gemma_rms_norm":
        shapes += [("sweep", m, n) for m, n in sweep_hidden(smoke)]
    out = []
    for group, m, n in shapes:
        if op in ("rms_norm", "gemma_rms_norm"):
            make = (lambda m, n: lambda device, dtype: (leaf((m, n), device, dtype), leaf((n,), device, dtype)))(m, n)
            moved = {"fwd": 2 * m * n, "bwd": 3 * m * n, "fwd+bwd": 5 * m * n}
        else:
            make = (lambda m, n: lambda device, dtype: (leaf((m, n), device, dtype), leaf((m, n), device, dtype),
                                                        leaf((n,), device, dtype)))(m, n)
            moved = {"fwd": 4 * m * n, "bwd": 4 * m * n, "fwd+bwd": 8 * m * n}
        out.append(Case(op, group, (m, n), n, make, moved))
    return out


def impls(op, backend):
    if op == "rms_norm":
        found = {"tinyfuse": lambda x, w: kernels.rms_norm(x, w, EPS),
                 "torch": lambda x, w: reference.rms_norm(x, w, EPS),
                 "torch.compile": compiled(lambda x, w: reference.rms_norm(x, w, EPS), backend)}
        lk = liger()
        if lk:
            found["liger"] = lambda x, w: lk.liger_rms_norm(x, w, EPS)
        return found
    if op == "gemma_rms_norm":
        found = {"tinyfuse": lambda x, w: kernels.rms_norm(x, w, EPS, offset=1.0),
                 "torch": lambda x, w: reference.rms_norm(x, w, EPS, offset=1.0),
                 "torch.compile": compiled(lambda x, w: reference.rms_norm(x, w, EPS, offset=1.0), backend)}
        lk = liger()
        if lk:
            found["liger"] = lambda x, w: lk.liger_rms_norm(x, w, EPS, offset=1.0, casting_mode="gemma")
        return found
    found = {"tinyfuse": lambda x, r, w: kernels.add_rms_norm(x, r, w, EPS),
             "torch": lambda x, r, w: reference.add_rms_norm(x, r, w, EPS),
             "torch.compile": compiled(lambda x, r, w: reference.add_rms_norm(x, r, w, EPS), backend)}
    lk = liger()
    if lk:
        found["liger"] = lambda x, r, w: lk.liger_fused_add_rms_norm(x, r, w, EPS)
    return found


if __name__ == "__main__":
    main_for(sys.modules[__name__])
