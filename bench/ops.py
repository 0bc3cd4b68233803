"""The op scripts the kernel benchmarks and the static report share, each with its OPS,
cases and implementations."""
from . import cross_entropy, rms_norm, rope, swiglu


def op_modules():
    return [rms_norm, rope, swiglu, cross_entropy]


def all_ops():
    return [op for module in op_modules() for op in module.OPS]
