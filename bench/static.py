"""`tinyfuse bench --static`: what every kernel costs on a GPU, read without one. This
module drives the report; `recording` records an op's launches and aten ops, `cubin`
compiles and reads each launch, `report.static_table` prints the result.

Each op runs its real launch path (the same planners, so the same block sizes, warps, rows
per program and grid as a training step would pick) on CPU tensors and on the
architecture's Target, with every Triton launch recorded instead of executed and every
aten op around it recorded instead of computed (outputs are empty
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
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch.overrides import TorchFunctionMode

from tinyfuse.kernels._launch import ARCHITECTURES

from .cubin import launch_row
from .ops import op_modules
from .recording import Account, distinct_bytes, host_syncs
from .report import static_table, write_static


# ---------------------------------------------------------------- the kernels

class _EmptyInputs(TorchFunctionMode):
    """A case's random inputs made as empty tensors while the mode is on (values never
    matter when nothing runs, and a sweep's large inputs are never touched); every other
    call as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.randn:
            return torch.empty(*args, **{k: v for k, v in kwargs.items() if k != "generator"})
        if func is torch.randint:  # randint(high, size) or randint(low, high, size)
            size = kwargs.get("size", args[-1] if len(args) > 1 else None)
            return torch.zeros(size, dtype=torch.long, device=kwargs.get("device"))
        return func(*args, **kwargs)


def measure_pass(fn, inputs, arch):
    """{pass: launches, aten ops and bytes} of fn's forward, then its backward, with launch
    sizes chosen for sm_<arch>."""
    out = {}
    with Account(arch) as account:
        result = fn(*inputs)
    out["fwd"] = (account.launches, account.ops)
    outs = result if isinstance(result, tuple) else (result,)
    leaves = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = [torch.empty_like(o) for o in outs]
    with Account(arch) as account:
        torch.autograd.grad(outs, leaves, grads, allow_unused=True)
    out["bwd"] = (account.launches, account.ops)
    rows = {}
    for p, (launched, ops) in out.items():
        moved = sum(distinct_bytes(list(a) + list(kw.values())) for f, _, a, kw in launched
                    if not getattr(f, "moves_nothing_at_unit_scale", False))
        moved += sum(o["bytes"] for o in ops)
        rows[p] = {"bytes": moved, "launches": [launch_row(f, g, a, kw, arch) for f, g, a, kw in launched],
                   "aten": [{"op": o["op"], "bytes": o["bytes"], "line": o["line"]} for o in ops]}
    return rows


def kernel_rows(arches, ops=None, progress=print):
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
                    with _EmptyInputs():
                        inputs = case.make("cpu", dtype)
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
            with Account(zero=True):  # CUDA-only ops are faked here too
                trainer.train_step()
            account = Account(zero=True)
            with host_syncs(account), account:
                trainer.train_step()
        finally:
            trainer.close()
    launches, aten = account.launches, account.ops
    casts = [{"op": o["op"], "from": o["cast"][0], "to": o["cast"][1], "bytes": o["bytes"], "line": o["line"]}
             for o in aten if o["cast"]]
    concats = [{"bytes": o["bytes"], "line": o["line"]} for o in aten if o["op"].startswith("aten.cat")]
    return {"preset": name, "tokens": seq, "launches": len(launches) + len(aten), "triton_launches": len(launches),
            "aten_launches": len(aten), "syncs": account.syncs, "casts": casts, "concats": concats,
            "allocated_bytes": account.allocated}


# ---------------------------------------------------------------- driving

def run(arches=(90,), ops=None, steps=True, progress=None):
    progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    unknown = [a for a in arches if a not in ARCHITECTURES]
    if unknown:
        raise ValueError(f"--arch {unknown}: known architectures are {', '.join(map(str, ARCHITECTURES))}")
    start = time.perf_counter()
    result = {"arch": list(arches), "kernels": kernel_rows(arches, ops, progress), "steps": []}
    if steps:
        from tinyfuse.engine.model import PRESETS

        for name in PRESETS:
            progress(f"static: training step of {name}")
            result["steps"].append(step_account(name))
    result["seconds"] = time.perf_counter() - start
    return result


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
    print(static_table(result))
    print(f"\nwrote {write_static(result, args.out)} in {result['seconds']:.0f} s")
    return 0


def run_in_subprocess(argv):
    """The report in a fresh interpreter-free Python: a process that has Triton's
    interpreter on cannot compile kernels (triton's own library functions are interpreted)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    return subprocess.run([sys.executable, "-m", "tinyfuse.bench.static", *argv], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
