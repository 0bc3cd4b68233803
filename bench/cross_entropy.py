"""Benchmark: cross_entropy and linear_cross_entropy against torch.

    python -m tinyfuse.bench.cross_entropy [--smoke] [--json FILE]

cross_entropy ("mean", logits that need a gradient), logits of [N, V] elements of the
input dtype (targets and per-row statistics left out): the least any implementation
must move is 2NV, the logits read once and their gradient written once, and tinyfuse
does all of it in the forward (the backward moves nothing at a unit upstream gradient).
So the model is forward 2NV, backward 0 (no GB/s), forward+backward 2NV. Per pass, the
work is split differently between implementations (torch's forward only reads, its
backward reads again and writes): compare them on forward+backward, where a two-pass
implementation shows below 100% by design.

The torch baselines are what a user writes: F.cross_entropy on float32 logits (and on
hidden @ weight.T for the linear one), eager and under torch.compile.

softcap_cross_entropy is cross_entropy with Gemma 2's soft cap (30 * tanh(logits / 30)),
the same byte model, at the presets' shapes only: one more exponential a logit each
pass, to see whether it stays memory-bound.

linear_cross_entropy (hidden [N, D], weight [V, D]) is bound by its matmuls: it reports
TFLOP/s from 2NVD FLOPs forward and 4NVD backward (6NVD together; recomputing the logits
in the backward, as tinyfuse does, is not counted).
"""
import sys

import torch
import torch.nn.functional as F
from tinyfuse import kernels

from .kernels import Case, compiled, leaf, liger, main_for, preset_shapes, sweep_vocab, targets

OPS = ("cross_entropy", "softcap_cross_entropy", "linear_cross_entropy")
SOFTCAP = 30.0


def _make_ce(n, v):
    def make(device, dtype):
        return leaf((n, v), device, dtype, scale=4.0), targets(n, v, device)
    return make


def _make_lce(n, d, v):
    def make(device, dtype):
        return leaf((n, d), device, dtype), leaf((v, d), device, dtype, scale=0.02), targets(n, v, device)
    return make


def cases(op, smoke):
    presets = preset_shapes(smoke)
    if op in ("cross_entropy", "softcap_cross_entropy"):
        shapes = [(name, b * t, cfg.vocab_size) for name, b, t, cfg in presets]
        if op == "cross_entropy":
            shapes += [("sweep", n, v) for n, v in sweep_vocab(smoke)]
        return [Case(op, group, (n, v), v, _make_ce(n, v), {"fwd": 2 * n * v, "bwd": 0, "fwd+bwd": 2 * n * v})
                for group, n, v in shapes]
    n, d = (8, 64) if smoke else (8192, 1024)
    shapes = [(name, b * t, cfg.dim, cfg.vocab_size) for name, b, t, cfg in presets] + \
             [("sweep", n, d, v) for _, v in sweep_vocab(smoke)]
    return [Case(op, group, (n, d, v), v, _make_lce(n, d, v),
                 flops={"fwd": 2 * n * v * d, "bwd": 4 * n * v * d, "fwd+bwd": 6 * n * v * d})
            for group, n, d, v in shapes]


def torch_cross_entropy(logits, target):
    return F.cross_entropy(logits.float(), target)


def torch_softcap_cross_entropy(logits, target):
    return F.cross_entropy(SOFTCAP * torch.tanh(logits.float() / SOFTCAP), target)


def torch_linear_cross_entropy(hidden, weight, target):
    return F.cross_entropy((hidden @ weight.T).float(), target)


def impls(op, backend):
    lk = liger()
    if op == "cross_entropy":
        found = {"tinyfuse": kernels.cross_entropy, "torch": torch_cross_entropy,
                 "torch.compile": compiled(torch_cross_entropy, backend)}
        if lk:
            found["liger"] = lk.liger_cross_entropy
        return found
    if op == "softcap_cross_entropy":
        found = {"tinyfuse": lambda logits, target: kernels.cross_entropy(logits, target, softcap=SOFTCAP),
                 "torch": torch_softcap_cross_entropy,
                 "torch.compile": compiled(torch_softcap_cross_entropy, backend)}
        if lk:
            found["liger"] = lambda logits, target: lk.liger_cross_entropy(logits, target, softcap=SOFTCAP)
        return found
    found = {"tinyfuse": kernels.linear_cross_entropy, "torch": torch_linear_cross_entropy,
             "torch.compile": compiled(torch_linear_cross_entropy, backend)}
    if lk:
        found["liger"] = lk.liger_fused_linear_cross_entropy
    return found


if __name__ == "__main__":
    main_for(sys.modules[__name__])
