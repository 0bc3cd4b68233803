"""The benchmark suite end to end at smoke sizes, its byte models, and `bench compare`."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from tinyfuse.bench import kernels, ops, report

OPS = ["rms_norm", "add_rms_norm", "gemma_rms_norm", "rope", "swiglu", "geglu", "cross_entropy",
       "softcap_cross_entropy", "linear_cross_entropy"]
UNSWEPT = ("gemma_rms_norm", "geglu", "softcap_cross_entropy")  # variants of another op: at the presets' shapes only


def bench(*args, timeout=600):
    return subprocess.run(["tinyfuse", "bench", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = bench("--smoke", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "results.json") as f:
        return out, json.load(f), result.stdout


def test_smoke_suite_writes_every_output(smoke):
    out, results, stdout = smoke
    env = results["env"]
    assert {"device", "device_count", "torch", "triton", "cuda", "commit", "date", "copy_gbps"} <= set(env)
    assert env["torch"] == torch.__version__ and env["copy_gbps"] > 0
    rows = results["kernels"]
    assert not [r for r in rows if r.get("error")], [r["error"] for r in rows if r.get("error")]
    impls = {"tinyfuse", "torch", "torch.compile"} | ({"liger"} if kernels.liger() else set())
    for op in OPS:
        for p in kernels.PASSES:
            found = {r["impl"] for r in rows if r["op"] == op and r["pass"] == p}
            assert found == impls, (op, p, found)
        groups = {r["group"] for r in rows if r["op"] == op}
        assert groups == ({"stories260K"} if op in UNSWEPT else {"stories260K", "sweep"})
    # cross_entropy's backward has nothing to time alone: its gradient is formed in the forward
    untimed = [r for r in rows if r.get("note")]
    assert {(r["op"], r["pass"]) for r in untimed} == {("cross_entropy", "bwd"), ("softcap_cross_entropy", "bwd")}
    assert all("ms" not in r for r in untimed)
    rows = [r for r in rows if not r.get("note")]
    for r in rows:
        assert r["ms"] > 0 and r["dtype"] == "bfloat16" and {"shape", "pct_bw", "peak_mem_mb"} <= set(r)
        if r["op"] == "linear_cross_entropy":
            assert r["gbps"] is None and r["tflops"] > 0
        else:
            assert r["gbps"] > 0 and r["pct_bw"] == pytest.approx(100 * r["gbps"] / env["copy_gbps"])
        if r["impl"] == "tinyfuse":
            same = [o for o in rows if o["impl"] == "torch" and (o["op"], o["pass"], o["shape"]) ==
                    (r["op"], r["pass"], r["shape"])]
            assert r["speedup"]["torch"] == pytest.approx(same[0]["ms"] / r["ms"])
    steps = results["step"]
    liger = ("liger",) if kernels.liger() else ()  # Liger runs on CUDA only; its absence is noted
    hf = ("plain", "tinyfuse") + liger
    assert [(s["model"], s["kernels"], s["compile"]) for s in steps] == [
        (m, k, c) for m, impls in (("tinyfuse", ("triton", "torch")), ("transformers", hf),
                                   ("transformers-gemma3", hf), ("transformers-phi3", hf))
        for k in impls for c in (False, True)]
    for family in ("transformers", "transformers-gemma3", "transformers-phi3"):  # patched or not: one model, one loss
        plain, patched = (next(s["loss"] for s in steps if (s["model"], s["kernels"], s["compile"]) == (family, k, False))
                          for k in ("plain", "tinyfuse"))
        assert patched == pytest.approx(plain, rel=1e-4), family
    for s in steps:
        assert s["preset"] == "stories260K" and s["tokens_per_s"] > 0 and "error" not in s
        assert set(s["breakdown"]) == {"data", "forward", "backward", "optimizer"}
        assert sum(s["breakdown"].values()) > 0 and {"mfu", "peak_mem_gb"} <= set(s)
    logged = report.read_rows(out / "rows.jsonl")  # every row, as measured
    assert logged["env"] == [env] and logged["kernels"] == results["kernels"]
    assert logged["step"] == steps and len(logged["loader"]) == len(results["loader"])
    assert {r["impl"] for r in results["loader"]} == {"tinyfuse (C++)", "reference (numpy)"}
    assert all(r["tokens_per_s"] > 0 for r in results["loader"])
    md = (out / "results.md").read_text()
    for heading in ("## Kernels", "## Training step", "## Loader", "| linear_cross_entropy |", "smoke"):
        assert heading in md
    assert "## Kernels" in stdout
    for name in [f"kernels_{op}.png" for op in OPS if op not in UNSWEPT] + ["step.png"]:  # plots of the sweep
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not any((out / f"kernels_{op}.png").exists() for op in UNSWEPT)


def test_compare_names_changes_beyond_noise(smoke, tmp_path):
    _, results, _ = smoke
    old = copy.deepcopy(results)
    for r in old["kernels"]:
        r["noise"] = 0.01
    new = copy.deepcopy(old)
    torch_rows = [r for r in new["kernels"] if r["impl"] == "torch"]
    torch_rows[0]["ms"] /= 2  # twice as fast
    torch_rows[1]["ms"] *= 3  # three times slower
    torch_rows[2]["ms"] *= 1.001  # within the noise
    lines, counts = report.compare(old, new)
    assert counts == {"faster": 1, "slower": 1, "same": counts["same"], "unmatched": 0} and counts["same"] > 100
    text = "\n".join(lines)
    assert "2.00x" in text and "0.33x" in text
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    result = bench("compare", str(tmp_path / "old.json"), str(tmp_path / "new.json"))
    assert result.returncode == 0 and "faster:" in result.stdout and "slower:" in result.stdout
    same = bench("compare", str(tmp_path / "old.json"), str(tmp_path / "old.json"))
    assert "faster: none" in same.stdout and "slower: none" in same.stdout
    assert bench("compare", str(tmp_path / "old.json")).returncode == 2


def test_only_and_ops_narrow_a_run(tmp_path):
    result = bench("--smoke", "--only", "kernels", "--ops", "swiglu", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["op"] for r in results["kernels"]} == {"swiglu"} and results["step"] == [] and results["loader"] == []
    bad = bench("--smoke", "--ops", "layer_norm", "--out", str(tmp_path))
    assert bad.returncode == 2 and "unknown ops ['layer_norm']" in bad.stderr


@pytest.mark.parametrize("op", OPS[:-1])
def test_forward_byte_model_counts_inputs_and_outputs(op):
    """Forward bytes = the activations read plus the outputs written (weights, tables and
    targets are left out, as each op's docstring says), plus, for cross_entropy, the
    gradient its forward writes (one per activation read)."""
    module = next(m for m in ops.op_modules() if op in m.OPS)
    for case in module.cases(op, smoke=True):
        args = case.make("cpu", torch.float32)
        read = sum(a.numel() for a in args if isinstance(a, torch.Tensor) and a.requires_grad and a.dim() > 1)
        out = module.impls(op, "eager")["torch"](*args)
        written = sum(o.numel() for o in (out if isinstance(out, tuple) else (out,)) if o.dim() > 0)
        gradient = read if op in ("cross_entropy", "softcap_cross_entropy") else 0
        assert case.bytes["fwd"] == read + written + gradient, (op, case.shape)


def test_selectors_and_the_budget_narrow_a_run(tmp_path):
    """--presets picks the kernels' preset shapes and the step's presets, --no-sweep drops
    the sweep, --step-rows names the step rows (a missing optional package is a skipped
    row, not a failure), and a spent --budget records what did not start as skipped."""
    result = bench("--smoke", "--only", "kernels", "step", "--ops", "rope", "--presets", "stories260K", "--no-sweep",
                   "--step-rows", "tinyfuse-torch", "hf-liger", "--repeats", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {(r["op"], r["group"]) for r in results["kernels"]} == {("rope", "stories260K")}
    assert [(s["preset"], s["row"]) for s in results["step"]] == [("stories260K", "tinyfuse-torch"),
                                                                ("stories260K", "hf-liger")]
    assert results["step"][0]["tokens_per_s"] > 0 and results["step"][0]["cuda_graph"] is False
    assert "Liger-Kernel is not installed" in results["step"][1]["skipped"]
    spent = bench("--smoke", "--only", "kernels", "step", "--ops", "swiglu", "--step-rows", "tinyfuse",
                  "--budget", "0", "--out", str(tmp_path / "spent"))
    assert spent.returncode == 0, spent.stderr[-2000:]
    results = json.loads((tmp_path / "spent" / "results.json").read_text())
    assert results["kernels"] and all(r["skipped"] == "the run's time budget was spent" for r in results["kernels"])
    assert [r.get("skipped") for r in results["step"]] == ["the run's time budget was spent"]
    bad = bench("--smoke", "--step-rows", "tinyfuse-fast", "--out", str(tmp_path))
    assert bad.returncode == 2 and "invalid choice: 'tinyfuse-fast'" in bad.stderr


def test_a_failed_capture_is_reported_as_such(monkeypatch, tmp_path):
    """The row says whether the step really ran as a CUDA graph: a trainer that wanted one
    and fell back (capture failed) is a row without a graph, with the reason."""
    from tinyfuse.bench import step

    real = step._tinyfuse_step

    def capture_failed(*args):
        trainer, run = real(*args)
        trainer.use_graph, trainer.graph_error = False, "RuntimeError: operation not permitted when stream is capturing"
        return trainer, run

    monkeypatch.setattr(step, "_tinyfuse_step", capture_failed)
    corpus = step.make_corpus(str(tmp_path / "c"), tokens=1 << 14, vocab=512, val_tokens=1 << 12)
    row = step.measure_step("stories260K", "tinyfuse", "torch", False, "cpu", True, corpus)
    assert row["cuda_graph"] is False and row["graph_error"].startswith("RuntimeError: operation not permitted")
    assert row["row"] == "tinyfuse-torch" and row["attention"] == "sdpa" and row["loss"] > 0
    assert "no (RuntimeError: operation not permitted" in report.step_table([row])


def test_gpu_run_dry_run_returns_what_a_lease_brings_back(tmp_path):
    """bench/gpu_run.sh --dry-run: every stage at smoke size on this CPU; what lands in $OUT
    is at most 8 files, at most two folders down, named as the device tool returns them,
    and the tarball holds each stage's folder."""
    import re
    import tarfile

    root = os.path.join(os.path.dirname(__file__), "..")
    out = tmp_path / "out"
    result = subprocess.run(["bash", os.path.join(root, "bench", "gpu_run.sh"), "--dry-run"], capture_output=True,
                            text=True, timeout=900, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for p in files for part in p.relative_to(out).parts)
    assert {p.name for p in files} == {"results.tar.gz", "rows.jsonl", "summary.md", "gpu_run.log"}
    summary = (out / "summary.md").read_text()
    for stage in ("| 0 | versions | ok |", "| 1 | check | ok |", "| 2 | main | ok |", "| 3 | step | ok |",
                  "| 4 | kernels | ok |", "| 5 | gpu-tests | ok |", "| 6 | compiled-step | ok |"):
        assert stage in summary, summary
    rows = report.read_rows(out / "rows.jsonl")
    assert rows["step"] and rows["kernels"] and all(r.get("error") is None for r in rows["kernels"])
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    for folder in ("1-check", "2-main", "3-step", "4-kernels", "6-compiled-step"):
        assert any(n.startswith(f"./{folder}/") for n in names), names
    assert "./2-main/metrics.jsonl" in names and "./3-step/rows.jsonl" in names
    with tarfile.open(out / "results.tar.gz") as tar:
        checked = json.load(tar.extractfile("./1-check/check.json"))
    assert checked["failed"] == 0 and checked["passed"] == len(checked["cases"]) > 0
    bad = subprocess.run(["bash", os.path.join(root, "bench", "gpu_run.sh"), "9"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage: bench/gpu_run.sh" in bad.stderr


def test_smoke_without_transformers_skips_its_rows(tmp_path):
    """After the main job's install (no transformers), the Hugging Face step rows are
    skipped with a note and the run exits 0."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from tinyfuse.engine.cli import main\n"
            f"sys.exit(main(['bench', '--smoke', '--only', 'step', '--step-rows', 'tinyfuse-torch', 'hf', "
            f"'--out', {str(tmp_path)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r.get("skipped") for r in results["step"]] == [None, "transformers is not installed (pip install -e \".[test]\")"]
    assert any("step rows skipped: transformers is not installed" in n for n in results["notes"])
    assert "skipped: transformers is not installed" in result.stdout


def test_gpu_sizes_on_a_cpu_say_so_and_run_the_smoke_sizes(tmp_path):
    """`python -m tinyfuse.bench.swiglu` and `tinyfuse bench` on a machine without CUDA do not
    start the GPU-size suite in the interpreter (hours): they say so, run the smoke sizes and
    show their progress."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU sizes are what it should run")
    op = subprocess.run([sys.executable, "-m", "tinyfuse.bench.swiglu"], capture_output=True, text=True, timeout=600)
    assert op.returncode == 0 and "no CUDA device here" in op.stderr and "kernels: swiglu" in op.stderr, op.stderr
    suite_run = bench("--only", "kernels", "--ops", "swiglu", "--out", str(tmp_path))
    assert suite_run.returncode == 0 and "no CUDA device here" in suite_run.stderr, suite_run.stderr[-2000:]
    assert json.loads((tmp_path / "results.json").read_text())["smoke"] is True
