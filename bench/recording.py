"""Recording what an op does without running it on a GPU (the static report's first job):
`Account` runs tinyfuse's ops on a Target for an architecture (kernels._launch.Target:
its SMs, and the occupancy of each binary read from the compiled cubin) whose launch
keeps every Triton launch as (kernel, grid, args, kwargs) instead of executing it, and
records every aten op around them (running none that moves data: outputs are empty
tensors shaped on the meta device); `host_syncs` records the Python-level tensor-to-host
calls (observed, not patched). Nothing of Triton or torch is replaced.
"""
import dataclasses
import functools
import os
import sys
import traceback
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from tinyfuse.kernels._launch import ARCHITECTURES

from .cubin import compile_launch, occupancy


def _resident_blocks(arch, plan, operands):
    """Blocks of plan's binary resident per SM of sm_<arch>, from its cubin."""
    usage, _, _, num_warps = compile_launch(plan.kernel, (), plan.kwargs(operands), arch)
    return occupancy(usage, num_warps, arch)


def _storage_key(t):
    return t.untyped_storage().data_ptr(), t.data_ptr(), tuple(t.shape), tuple(t.stride())


def tensor_bytes(t):
    """Bytes a kernel reads or writes of a tensor argument: its elements' extent."""
    return t.numel() * t.element_size()


def distinct_bytes(values):
    """Bytes of the tensors among values, a tensor passed twice (the same view) counted once."""
    seen, moved = set(), 0
    for t in values:
        if isinstance(t, torch.Tensor) and _storage_key(t) not in seen:
            seen.add(_storage_key(t))
            moved += tensor_bytes(t)
    return moved


_SYNC_CALLS = ("item", "tolist", "cpu", "numpy")
_FREE = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
         "aten.new_empty.default", "aten.new_empty_strided.default", "aten.detach.default", "aten.lift_fresh.default"}
_RUN_REAL = {"aten.reshape.default", "aten.contiguous.default", "aten._unsafe_view.default"}
_DATA_DEPENDENT = {"aten.nonzero.default", "aten.masked_select.default", "aten._unique2.default"}


def _tinyfuse_line():
    """file:line of the innermost tinyfuse frame that is not this module."""
    here = os.path.abspath(__file__)
    root = os.path.dirname(os.path.dirname(here))
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path != here and path.startswith(root + os.sep) and "/tests/" not in path:
            return f"{os.path.relpath(path, root)}:{frame.lineno}"
    return "outside tinyfuse"


def _to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def _empty_like_meta(m, zero=False):
    if isinstance(m, torch.Tensor):
        t = torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device="cpu")
        return t.zero_() if zero else t
    return m


SMALL = 1 << 16  # ops on tensors of at most this many elements are run for real: their values can matter


class Account(TorchDispatchMode):
    """Records every aten op (and runs none that move data: their outputs are empty tensors
    shaped on the meta device); runs tinyfuse's custom ops' own Python on `target`, sm_<arch>'s
    Target, so their launches (planned for that architecture, recorded in `launches`, never
    run: CPU tensors stand in for device ones) and the torch ops inside them are recorded
    too. zero: fake outputs, and every tensor a launch touches, are zeros instead, so a
    training step that reads the results (a finite loss, a gradient norm) goes on as it would."""

    def __init__(self, arch=90, zero=False):
        super().__init__()
        self.zero = zero
        self.target = dataclasses.replace(ARCHITECTURES[arch], occupancy=functools.partial(_resident_blocks, arch),
                                          launch=self._launch)
        self.launches = []  # (kernel, grid, args, kwargs)
        self.ops = []  # {"op", "bytes", "line", "cast": (from, to) or None}
        self.syncs = []
        self.allocated = 0
        self._in_sync = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if func.namespace == "tinyfuse":
            from torch._library.custom_ops import OPDEFS

            with self:
                return OPDEFS[func._schema.name].on_target(self.target, *args, **kwargs)
        if name == "aten._local_scalar_dense.default" and not self._in_sync:
            self.syncs.append({"call": name, "line": _tinyfuse_line()})
        if name in _DATA_DEPENDENT:
            self.syncs.append({"call": name, "line": _tinyfuse_line()})
        if func.is_view or name in _RUN_REAL or name in _DATA_DEPENDENT or name.startswith("aten._local_scalar"):
            out = func(*args, **kwargs)
            if name in _RUN_REAL and not self._aliases(out, args):
                self._record(name, args, kwargs, out)
            return out
        try:
            meta_out = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
        except Exception:  # no meta kernel: run it (only small ops get here)
            meta_out = None
        sizes = [t.numel() for t in tree_flatten((args, kwargs, meta_out))[0] if isinstance(t, torch.Tensor)]
        if meta_out is None or max(sizes, default=0) <= SMALL:
            try:
                out = func(*args, **kwargs)
            except NotImplementedError:  # a CUDA-only op (mm with out_dtype) recorded on CPU tensors
                out = self._returns(func, args, kwargs, meta_out, self.zero)
        else:
            out = self._returns(func, args, kwargs, meta_out, self.zero)
        if name in _FREE:
            self.allocated += sum(tensor_bytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        else:
            self._record(name, args, kwargs, out)
        return out

    def _launch(self, plan, operands):
        # Kept as aliases (same storage, offset, strides): holding the tensors themselves
        # would make autograd copy a gradient it could otherwise take as it is.
        with _disable_current_modes():
            kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in plan.kwargs(operands).items()}
        self.launches.append((plan.kernel, plan.grid, (), kwargs))
        if self.zero:
            with _disable_current_modes(), torch.no_grad():
                for a in operands.values():
                    if isinstance(a, torch.Tensor) and a.is_floating_point():
                        # through an alias with its own version counter: autograd must not see it
                        torch.empty(0, dtype=a.dtype).set_(a.untyped_storage(), a.storage_offset(), a.shape,
                                                           a.stride()).zero_()

    @staticmethod
    def _aliases(out, args):
        ins = {t.untyped_storage().data_ptr() for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)}
        return all(t.untyped_storage().data_ptr() in ins for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))

    @staticmethod
    def _returns(func, args, kwargs, meta_out, zero):
        """Real outputs: the argument a return aliases (in-place and out= ops), else an empty tensor."""
        by_set = {}
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is not None:
                value = args[i] if i < len(args) else kwargs.get(a.name)
                for s in a.alias_info.before_set:
                    by_set[s] = value
        returns = func._schema.returns
        if not returns:
            return meta_out
        single = len(returns) == 1
        outs = (meta_out,) if single else meta_out
        real = []
        for r, m in zip(returns, outs):
            if r.alias_info is not None and by_set.get(next(iter(r.alias_info.before_set))) is not None:
                real.append(by_set[next(iter(r.alias_info.before_set))])
            else:
                real.append(tree_map(lambda x: _empty_like_meta(x, zero), m))
        return real[0] if single else type(meta_out)(real)

    def _record(self, name, args, kwargs, out):
        moved = distinct_bytes(tree_flatten((args, kwargs, out))[0])
        new = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        self.allocated += sum(tensor_bytes(t) for t in new if t.untyped_storage().data_ptr() not in ins)
        cast = None
        if name in ("aten._to_copy.default", "aten.copy_.default"):
            src = args[1] if name == "aten.copy_.default" else args[0]
            dst = args[0] if name == "aten.copy_.default" else out
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.dtype != dst.dtype:
                cast = (str(src.dtype).removeprefix("torch."), str(dst.dtype).removeprefix("torch."))
        self.ops.append({"op": name, "bytes": moved, "line": _tinyfuse_line(), "cast": cast})


@contextmanager
def host_syncs(account):
    """Python-level tensor-to-host calls (item, tolist, cpu, numpy) recorded with their line,
    seen through the interpreter's profile hook as they are called: nothing of torch is
    replaced. bool(), float() and int() of a tensor reach no Python-level call; they reach
    aten._local_scalar_dense, which Account records."""
    def profile(frame, event, arg):
        if event not in ("c_call", "c_return", "c_exception") or getattr(arg, "__name__", None) not in _SYNC_CALLS \
                or not isinstance(getattr(arg, "__self__", None), torch.Tensor):
            return
        if event == "c_call":
            account.syncs.append({"call": f"Tensor.{arg.__name__}", "line": _tinyfuse_line()})
            account._in_sync += 1  # the aten._local_scalar_dense it makes is this call
        else:
            account._in_sync -= 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(previous)
