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
