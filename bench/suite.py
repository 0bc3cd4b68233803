"""`tinyfuse bench`: kernels, training step and loader measured in one run, written as
results.json, results.md and plots; `tinyfuse bench compare OLD.json NEW.json`."""
import json
import os
import sys
import time

import torch

from . import kernels, loader, report, step
from .ops import all_ops, op_modules
from .timing import copy_gbps, environment, smoke_here

SECTIONS = ("kernels", "step", "loader")


def run(smoke=False, only=None, ops=None, out_dir="bench-results", progress=None, presets=None, sweep=True,
        step_rows=None, repeats=None, budget=None):
    """Measure the sections asked for (only: a list of SECTIONS; default all) and write the
    results into out_dir: rows.jsonl as each row is measured, then results.json,
    results.md and the plots. presets: the presets whose shapes the kernels and the step
    run (default all; smoke: stories260K); sweep: the kernels' bandwidth sweep too;
    step_rows: step.ROW_NAMES to run (default: all that run here); repeats: timed
    repetitions a kernel pass and a step row; budget: seconds after which no further case
    or row starts (each is recorded as skipped)."""
    progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    if ops:
        unknown = set(ops) - set(all_ops())
        if unknown:
            raise ValueError(f"unknown ops {sorted(unknown)}; ops: {', '.join(all_ops())}")
    for name in step_rows or ():
        step.row_spec(name)  # a ValueError naming the rows
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    log = report.RowLog(os.path.join(out_dir, "rows.jsonl"), budget)
    bandwidth = copy_gbps(device, smoke)
    results = {"env": environment(device, bandwidth), "smoke": smoke, "notes": [], "kernels": [], "step": [],
               "loader": []}
    log.add("env", results["env"])
    progress(f"{results['env']['device']}: copy bandwidth {bandwidth:.0f} GB/s; rows go to {log.path} as measured")
    if device == "cpu":
        results["notes"].append("no CUDA: kernels ran in Triton's interpreter and torch.compile used the aot_eager "
                                "backend; these times check the code path, not the speed")
    if kernels.liger() is None:
        results["notes"].append("Liger-Kernel not measured: " + (
            "not installed (pip install liger-kernel)" if torch.cuda.is_available() else "it needs CUDA"))
    sections = only or SECTIONS
    if "kernels" in sections:
        groups = None
        if presets or not sweep:
            groups = set(presets or [name for name, *_ in kernels.preset_shapes(smoke)]) | ({"sweep"} if sweep else set())
        results["kernels"] = kernels.run(device, op_modules(), smoke, ops, bandwidth, progress, groups, repeats, log)
    if "step" in sections:
        results["step"] = step.run(device, smoke, presets, step_rows, progress, repeats, log)
        results["notes"] += sorted({f"step rows skipped: {r['skipped']}" for r in results["step"] if r.get("skipped")})
    if "loader" in sections:
        progress("loader")
        results["loader"] = loader.suite_rows(smoke)
        log.add("loader", *results["loader"])
    full = only is None and not ops and not presets and sweep and not step_rows and budget is None
    if not smoke and full:  # the full suite carries the static report too
        from .static import run_in_subprocess

        progress("static report")
        if run_in_subprocess(["--arch", "90,80", "--out", out_dir]) == 0:
            with open(os.path.join(out_dir, "static.json")) as f:
                results["static"] = json.load(f)
        else:
            results["notes"].append("the static report failed; see its error above")
    results["seconds"] = time.perf_counter() - start
    files = report.write(results, out_dir)
    return results, files


def main(args):
    """The `tinyfuse bench` command (its arguments parsed by the engine's CLI)."""
    if args.action == "compare":
        if len(args.files) != 2:
            print("tinyfuse bench compare: give OLD.json NEW.json", file=sys.stderr)
            return 2
        try:
            old, new = (json.load(open(path)) for path in args.files)
        except (OSError, json.JSONDecodeError) as e:
            print(f"tinyfuse bench compare: {e}", file=sys.stderr)
            return 2
        lines, _ = report.compare(old, new)
        print("\n".join(lines))
        return 0
    if args.action is not None:
        print(f"tinyfuse bench: unknown action {args.action!r} (the one action is compare)", file=sys.stderr)
        return 2
    if args.static:
        from .static import run_in_subprocess

        return run_in_subprocess(["--arch", args.arch, "--out", args.out] + (["--ops", *args.ops] if args.ops else []))
    args.smoke = smoke_here(args.smoke, "tinyfuse bench")
    try:
        results, files = run(args.smoke, args.only, args.ops, args.out, presets=args.presets, sweep=args.sweep,
                             step_rows=args.step_rows, repeats=args.repeats, budget=args.budget)
    except ValueError as e:
        print(f"tinyfuse bench: {e}", file=sys.stderr)
        return 2
    errors = sum(1 for section in SECTIONS for r in results[section] if r.get("error"))
    print(report.markdown(results))
    print(f"\nwrote {', '.join(files)} in {results['seconds']:.0f} s")
    if errors:
        print(f"tinyfuse bench: {errors} measurements failed (see their error field in results.json)", file=sys.stderr)
        return 1
    return 0
