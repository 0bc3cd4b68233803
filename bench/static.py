"""`tinyfuse bench --static`: what every kernel costs on a GPU, read without one.

Each op runs its real launch path (the same block sizes, warps, rows per program and grid
as a training step would pick) on CPU tensors, with every Triton launch recorded instead of
executed and every aten op around it recorded instead of computed (outputs are empty
tensors of the right shape, found on the meta device). Each recorded launch is then
compiled for each architecture asked for, exactly as the JIT would specialise it for those
arguments (Triton's own binder: alignment and divisibility of every argument), and read:

- from the cubin (`cuobjdump -res-usage`): registers per thread and local memory (spills
  and stack); from the compiler, the shared memory a launch requests (reduction scratch,
  pipelined loops' buffers); from those and the warps, resident blocks per SM
  against the architecture's limits, then the waves of the grid over the SMs and how busy
  the last wave is;
- from the PTX: global loads and stores by width (128-, 64-, 32-bit, scalar 16-bit),
  cp.async copies by width (the reads of pipelined loops, "cp.128"), all cp.async and TMA
  (cp.async.bulk) instructions, 64-bit divisions and remainders, and the
  special-function instructions (ex2, rsqrt, lg2, rcp);
- the bytes the op moves: every tensor argument of each launch (a buffer passed twice, or
  read and written in place, counts once) plus the inputs and outputs of every aten op that
  moves data (views and allocations move nothing), against the op's minimum byte model
  from its benchmark file (each input read once, each output written once). A kernel
  marked `moves_nothing_at_unit_scale` (the loss-gradient rescaling, which touches no
  memory when the upstream gradient is exactly 1) counts nothing: the report is the
  cost of `loss.backward()`; with any other upstream gradient it adds one read and one
  write of the gradient.

`step_account` runs one training step of each preset the same way (bf16 autocast, a tiny
batch) and counts, per optimizer step, the work launched, the host synchronisations (with
the tinyfuse line that caused each), the casts and concatenations inserted around the
model, and the bytes allocated.

static.json:
    {"arch": [90, ...], "kernels": [row, ...], "steps": [step, ...], "seconds": float}
    row:  {"op", "pass" ("fwd"|"bwd"|"fwd+bwd"), "group", "arch", "shape", "dtype", "bytes", "min_bytes", "ratio",
           "launches": [{"kernel", "grid", "num_warps", "constexprs", "arch", "registers", "local_bytes",
                         "shared_bytes", "blocks_per_sm", "waves", "last_wave_busy",
                         "global": {"ld.128", "ld.64", "ld.32", "ld.16", "st.128", "cp.128", ...}, "cp_async", "tma",
                         "div64", "sfu": {"ex2", "rsqrt", "lg2", "rcp"}}],
           "aten": [{"op", "bytes"}]}
    step: {"preset", "tokens", "launches", "triton_launches", "aten_launches", "syncs": [{"call", "line"}],
           "casts": [{"op", "from", "to", "bytes", "line"}], "concats": [{"bytes", "line"}],
           "allocated_bytes"}
"""
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# SMs and shared memory per SM (the other per-SM limits are kernels._launch.blocks_per_sm's).
ARCHS = {
    90: {"name": "sm_90 (H100)", "sms": 132, "smem": 228 * 1024},
    80: {"name": "sm_80 (A100)", "sms": 108, "smem": 164 * 1024},
}


# ---------------------------------------------------------------- recording launches

@contextmanager
def recorded_launches(arch=90, zero=False):
    """Triton launches recorded as (kernel, grid, args, kwargs) and not executed; CPU
    tensors stand in for device ones, and launch sizes are chosen for sm_<arch>'s SMs.
    zero: every tensor a launch touches is zeroed instead, so a training step that reads
    the results (a finite loss, a gradient norm) goes on as it would."""
    from torch.utils._python_dispatch import _disable_current_modes
    from triton.runtime import jit

    from tinyfuse.kernels import _launch

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        # Kept as aliases (same storage, offset, strides): holding the tensors themselves
        # would make autograd copy a gradient it could otherwise take as it is.
        with _disable_current_modes():
            kept = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        launches.append((self, grid, kept, kwargs))
        if zero:
            with _disable_current_modes(), torch.no_grad():
                for a in args:
                    if isinstance(a, torch.Tensor) and a.is_floating_point():
                        # through an alias with its own version counter: autograd must not see it
                        torch.empty(0, dtype=a.dtype).set_(a.untyped_storage(), a.storage_offset(), a.shape,
                                                           a.stride()).zero_()

    def resident_blocks(fn, args, kwargs):
        usage, _, _, num_warps = compile_launch(fn, args, kwargs, arch)
        return occupancy(usage, num_warps, arch)

    saved = jit.JITFunction.run, _launch.RECORDING_SMS, _launch.RECORDING_OCCUPANCY
    jit.JITFunction.run, _launch.RECORDING, _launch.RECORDING_SMS = record, True, ARCHS[arch]["sms"]
    _launch.RECORDING_OCCUPANCY = resident_blocks
    try:
        yield launches
    finally:
        (jit.JITFunction.run, _launch.RECORDING_SMS, _launch.RECORDING_OCCUPANCY), _launch.RECORDING = saved, False


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


_SYNC_CALLS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
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
    shaped on the meta device); runs tinyfuse's custom ops' own Python, so the launches and
    the torch ops inside them are recorded too."""

    def __init__(self, zero=False):
        super().__init__()
        self.zero = zero  # fake outputs are zeros (a training step reads some of them)
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
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
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
    """Python-level tensor-to-host calls (item, tolist, ...) recorded with their line."""
    saved = {name: getattr(torch.Tensor, name) for name in _SYNC_CALLS}

    def wrap(name, original):
        @functools.wraps(original)
        def call(self, *args, **kwargs):
            account.syncs.append({"call": f"Tensor.{name}", "line": _tinyfuse_line()})
            account._in_sync += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                account._in_sync -= 1
        return call

    for name, original in saved.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


# ---------------------------------------------------------------- compiling a launch

@functools.lru_cache(maxsize=None)
def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_compiled = {}


def compile_launch(fn, args, kwargs, arch):
    """The kernel the JIT would build for these arguments, compiled for sm_<arch>:
    (resource usage, PTX)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {k: v for k, v in kwargs.items()}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = (fn.fn.__qualname__, arch, str(signature), str(constexprs), str(sorted(attrs.items())), str(options))
    if key not in _compiled:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                                   check=True).stdout
        found = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
        # What a launch asks for: the dynamic shared memory of the reductions' scratch and
        # the pipelined loops' buffers (cuobjdump shows only the static part), as on CUDA.
        found["SHARED"] = compiled.metadata.shared
        _compiled[key] = (found, compiled.asm["ptx"],
                          {k: v for k, v in constexprs.items()}, options.num_warps)
    return _compiled[key]


def ptx_counts(ptx):
    """Global accesses by width, async copies, 64-bit divisions and special functions."""
    counts = {}
    for kind, vec, width in re.findall(r"\b(ld|st)\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.[busf](\d+)\b", ptx):
        bits = int(width) * int(vec or 1)
        key = f"{kind}.{bits}"
        counts[key] = counts.get(key, 0) + 1
    # Global reads of pipelined loops: cp.async copies to shared memory, by size in bytes.
    for size in re.findall(r"\bcp\.async\.c[ag]\.shared\.global\s*\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-f]+|\d+)", ptx):
        key = f"cp.{int(size, 0) * 8}"
        counts[key] = counts.get(key, 0) + 1
    return {
        "global": counts,
        "cp_async": len(re.findall(r"\bcp\.async\.(?!bulk)", ptx)),
        "tma": len(re.findall(r"\bcp\.async\.bulk", ptx)),
        "div64": len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx)),
        "sfu": {f: len(re.findall(rf"\b{f}\.approx", ptx)) for f in ("ex2", "rsqrt", "lg2", "rcp")},
    }


def occupancy(usage, num_warps, arch):
    """Resident blocks per SM from registers, shared memory and warps."""
    from tinyfuse.kernels._launch import blocks_per_sm

    return blocks_per_sm(usage.get("REG", 0), usage.get("SHARED", 0), num_warps, ARCHS[arch]["smem"])


def launch_row(fn, grid, args, kwargs, arch):
    usage, ptx, constexprs, num_warps = compile_launch(fn, args, kwargs, arch)
    grid = tuple(grid) + (1,) * (3 - len(grid))
    programs = grid[0] * grid[1] * grid[2]
    blocks = occupancy(usage, num_warps, arch)
    per_wave = blocks * ARCHS[arch]["sms"]
    waves = programs / per_wave if per_wave else float("inf")
    last = waves - int(waves) if waves != int(waves) else 1.0
    return {"kernel": fn.fn.__name__, "grid": list(grid), "num_warps": num_warps,
            "constexprs": {fn.arg_names[k[0]]: v for k, v in constexprs.items()}, "arch": arch,
            "registers": usage.get("REG"), "local_bytes": usage.get("LOCAL", 0) + usage.get("STACK", 0),
            "shared_bytes": usage.get("SHARED", 0), "blocks_per_sm": blocks, "waves": waves, "last_wave_busy": last,
            **ptx_counts(ptx)}


# ---------------------------------------------------------------- the kernels

def _empty_leaf(make):
    """The case's inputs as empty tensors: values never matter when nothing runs."""
    def build(device, dtype):
        real_randn, real_randint = torch.randn, torch.randint
        torch.randn = lambda *s, **k: torch.empty(*s, **{x: y for x, y in k.items() if x != "generator"})
        torch.randint = lambda low, high=None, size=None, **k: torch.zeros(size if size is not None else high,
                                                                            dtype=torch.long)
        try:
            return make(device, dtype)
        finally:
            torch.randn, torch.randint = real_randn, real_randint
    return build


def measure_pass(fn, inputs, arch):
    """{pass: launches, aten ops and bytes} of fn's forward, then its backward, with launch
    sizes chosen for sm_<arch>."""
    account = Account()
    out = {}
    with recorded_launches(arch) as launches, account:
        result = fn(*inputs)
    out["fwd"] = (list(launches), list(account.ops))
    outs = result if isinstance(result, tuple) else (result,)
    leaves = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = [torch.empty_like(o) for o in outs]
    account = Account()
    with recorded_launches(arch) as launches, account:
        torch.autograd.grad(outs, leaves, grads, allow_unused=True)
    out["bwd"] = (list(launches), list(account.ops))
    rows = {}
    for p, (launched, ops) in out.items():
        moved = sum(distinct_bytes(list(a) + list(kw.values())) for f, _, a, kw in launched
                    if not getattr(f, "moves_nothing_at_unit_scale", False))
        moved += sum(o["bytes"] for o in ops)
        rows[p] = {"bytes": moved, "launches": [launch_row(f, g, a, kw, arch) for f, g, a, kw in launched],
                   "aten": [{"op": o["op"], "bytes": o["bytes"], "line": o["line"]} for o in ops]}
    return rows


def kernel_rows(arches, ops=None, progress=print):
    from .suite import op_modules

    dtype = torch.bfloat16
    rows = []
    for module in op_modules():
        for op in module.OPS:
            if ops and op not in ops:
                continue
            fn = module.impls(op, "aot_eager")["tinyfuse"]
            for case in module.cases(op, smoke=False):
                progress(f"static: {op} {case.group} {tuple(case.shape)}")
                itemsize = torch.empty((), dtype=dtype).element_size()
                for arch in arches:
                    inputs = _empty_leaf(case.make)("cpu", dtype)
                    passes = measure_pass(fn, inputs, arch)
                    passes["fwd+bwd"] = {k: passes["fwd"][k] + passes["bwd"][k] for k in ("bytes", "launches", "aten")}
                    for p, row in passes.items():
                        minimum = case.bytes.get(p, 0) * itemsize if case.bytes else None
                        rows.append({"op": op, "pass": p, "group": case.group, "shape": list(case.shape),
                                     "dtype": "bfloat16", "arch": arch, "min_bytes": minimum,
                                     "ratio": row["bytes"] / minimum if minimum else None, **row})
                    del inputs
    return rows


# ---------------------------------------------------------------- the training step

def step_account(name, tokens=64):
    """Per optimizer step of a preset (kernels="triton", bf16 autocast, `tokens` tokens):
    launches, host syncs, casts, concatenations and bytes allocated. The second step is
    counted (the first creates the optimizer's state)."""
    from tinyfuse.engine.model import preset
    from tinyfuse.engine.run_spec import resolve_run
    from tinyfuse.engine.train import TrainConfig, Trainer

    from .loader import make_corpus

    cfg = preset(name)
    seq = min(cfg.max_seq_len, tokens)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_corpus(os.path.join(tmp, "data"), tokens=1 << 16, shards=1, vocab=cfg.vocab_size,
                             val_tokens=1 << 12)
        trainer = Trainer(resolve_run(TrainConfig(preset=name, data=corpus, out=os.path.join(tmp, "run"), batch_size=1,
                                      seq_len=seq, device="cpu", kernels="triton", sample_tokens=0)), quiet=True)
        trainer.use_compute_dtype(torch.bfloat16)  # as on a GPU: bf16 autocast and working copies
        try:
            with recorded_launches(zero=True), Account(zero=True):  # CUDA-only ops are faked here too
                trainer.train_step()
            account = Account(zero=True)
            with recorded_launches(zero=True) as launches, host_syncs(account), account:
                trainer.train_step()
        finally:
            trainer.close()
    aten = [o for o in account.ops]
    casts = [{"op": o["op"], "from": o["cast"][0], "to": o["cast"][1], "bytes": o["bytes"], "line": o["line"]}
             for o in aten if o["cast"]]
    concats = [{"bytes": o["bytes"], "line": o["line"]} for o in aten if o["op"].startswith("aten.cat")]
    return {"preset": name, "tokens": seq, "launches": len(launches) + len(aten), "triton_launches": len(launches),
            "aten_launches": len(aten), "syncs": account.syncs, "casts": casts, "concats": concats,
            "allocated_bytes": account.allocated}


# ---------------------------------------------------------------- the report

def run(arches=(90,), ops=None, steps=True, progress=None):
    progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    unknown = [a for a in arches if a not in ARCHS]
    if unknown:
        raise ValueError(f"--arch {unknown}: known architectures are {', '.join(map(str, ARCHS))}")
    start = time.perf_counter()
    result = {"arch": list(arches), "kernels": kernel_rows(arches, ops, progress), "steps": []}
    if steps:
        from tinyfuse.engine.model import PRESETS

        for name in PRESETS:
            progress(f"static: training step of {name}")
            result["steps"].append(step_account(name))
    result["seconds"] = time.perf_counter() - start
    return result


def table(result):
    """The terminal table: one line per architecture, op, pass and shape, the worst launch's
    figures."""
    lines = [f"{'arch':<6}{'op':<22}{'pass':<9}{'group':<13}{'bytes/min':>10}{'regs':>6}{'spill':>7}{'blk/SM':>7}"
             f"{'waves':>8}{'last':>6}  global accesses (bits: count)"]
    for r in sorted(result["kernels"], key=lambda r: result["arch"].index(r["arch"])):  # the order asked for
        if not r["launches"]:
            continue
        worst = max(r["launches"], key=lambda launch: launch["registers"] or 0)
        access = " ".join(f"{k}:{v}" for k, v in sorted(worst["global"].items()))
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        lines.append(f"sm_{r['arch']:<3}{r['op']:<22}{r['pass']:<9}{r['group']:<13}{ratio:>10}{worst['registers']:>6}"
                     f"{worst['local_bytes']:>7}{worst['blocks_per_sm']:>7}{worst['waves']:>8.2f}"
                     f"{worst['last_wave_busy']:>6.2f}  {access}")
    for s in result["steps"]:
        lines.append(f"step {s['preset']}: {s['launches']} launches ({s['triton_launches']} Triton), "
                     f"{len(s['syncs'])} host syncs, {len(s['casts'])} casts, {len(s['concats'])} concatenations, "
                     f"{s['allocated_bytes'] / 1e6:.1f} MB allocated")
    return "\n".join(lines)


def write(result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "static.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path


def main(argv=None):
    """`python -m tinyfuse.bench.static`: the report in this process (Triton's interpreter
    must be off: kernels are compiled, never run). `tinyfuse bench --static` runs this."""
    import argparse

    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90", help="comma-separated compute capabilities: 90 (H100), 80 (A100)")
    parser.add_argument("--out", default="bench-results", help="folder for static.json")
    parser.add_argument("--ops", nargs="+", metavar="OP", help="these kernels only")
    parser.add_argument("--no-steps", action="store_true", help="leave out the training-step account")
    args = parser.parse_args(argv)
    if triton.knobs.runtime.interpret:
        print("tinyfuse bench --static: Triton's interpreter is on (TRITON_INTERPRET=1); the report compiles kernels "
              "and needs it off", file=sys.stderr)
        return 2
    try:
        arches = tuple(int(a) for a in args.arch.split(","))
        result = run(arches, args.ops, steps=not args.no_steps)
    except ValueError as e:
        print(f"tinyfuse bench --static: {e}", file=sys.stderr)
        return 2
    print(table(result))
    print(f"\nwrote {write(result, args.out)} in {result['seconds']:.0f} s")
    return 0


def run_in_subprocess(argv):
    """The report in a fresh interpreter-free Python: a process that has Triton's
    interpreter on cannot compile kernels (triton's own library functions are interpreted)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    return subprocess.run([sys.executable, "-m", "tinyfuse.bench.static", *argv], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
