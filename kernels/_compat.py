"""Workarounds for bugs of the library versions tinyfuse supports, each guarded so that it
does nothing where the bug is fixed, and each applied once, when tinyfuse.kernels is
imported (before any kernel is decorated or any model compiled)."""
import torch


def interpreter_loop_bounds_fix():
    """Triton 3.6's interpreter turns a scalar kernel argument used as a loop bound
    (`range(0, n)`) into an int with `int(array)`, on a one-element array; NumPy 2.4 made
    that an error (triton-lang/triton#9171, fixed after 3.6). Every kernel with a loop
    over a runtime size hit it. Convert with `.item()` instead, inside the interpreter's
    own patch scope, so the patch lives exactly as long as the interpreter's."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "tinyfuse_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.tinyfuse_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def interpreter_bf16_rounding_fix():
    """Triton 3.6's interpreter casts float32 to bfloat16 by dropping the low 16 bits
    (rounding toward zero); the GPU rounds to nearest even (cvt.rn.bf16.f32). Truncation
    doubles the error of every bf16 output on a CPU (relative norm on normal samples: 3.3e-3
    against 1.7e-3), so the CPU tests and `tinyfuse check` would judge the kernels by a
    rounding the GPU does not do. Round to nearest even there too (NaN stays NaN, overflow
    goes to inf). Guarded by a probe: a cast that already rounds is left alone."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.cast_impl
    if getattr(original, "tinyfuse_fixed", False):
        return
    probe = interpreter.TensorHandle(np.array([1 + 3 * 2.0 ** -9], dtype=np.float32), tl.float32)
    if int(original(None, probe, tl.bfloat16).data.view(np.uint16)[0]) == 0x3F81:  # 1 + 2^-7: rounded already
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
            return interpreter.TensorHandle(np.where(np.isnan(src.data), np.uint16(0x7FC0), rounded), tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl.tinyfuse_fixed = True
    builder.cast_impl = cast_impl


class _Lazy:
    """A message formatted only when something prints it."""

    def __init__(self, format, *args):
        self._format, self._args = format, args

    def __str__(self):
        return self._format(*self._args)


def inductor_fallback_message_fix():
    """Inductor before torch 2.13 formats the text of its "Creating implicit fallback"
    log line whether or not the line is logged: `OperatorIssue.operator_str` prints every
    argument's IR, and for an op that consumes the whole forward graph (the fused loss,
    tinyfuse::linear_cross_entropy_forward) that text grows exponentially with depth (on
    torch 2.11, CPU, as audited: 1 layer 1.4 M characters, 3 layers 520 M and 513 s of
    compile; 6 layers compile in 15 s with this). torch
    2.13 passes a lazy string there; this makes the formatter return one, so the text is
    built only if the line is logged or the error raised (`str()` of the exception is
    unchanged). Patched on the class, for every op, because the log line is emitted for
    any custom op and inductor has no per-op hook before it."""
    if torch.__version__ >= (2, 13):
        return
    from torch._inductor import exc

    original = exc.OperatorIssue.__dict__["operator_str"]
    if getattr(original, "tinyfuse_lazy", False):
        return
    format = original.__func__

    def operator_str(target, args, kwargs):
        return _Lazy(format, target, args, kwargs)

    operator_str.tinyfuse_lazy = True
    exc.OperatorIssue.operator_str = staticmethod(operator_str)
