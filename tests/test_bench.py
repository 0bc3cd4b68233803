"""The benchmark suite end to end at smoke sizes, its byte models, and `bench compare`."""
import copy
import json
import subprocess

import pytest
import torch
from tinyfuse.bench import kernels, report, suite

OPS = ["rms_norm", "add_rms_norm", "rope", "swiglu", "cross_entropy", "linear_cross_entropy"]


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
        assert groups == {"stories260K", "sweep"}
    # cross_entropy's backward has nothing to time alone: its gradient is formed in the forward
    untimed = [r for r in rows if r.get("note")]
    assert {(r["op"], r["pass"]) for r in untimed} == {("cross_entropy", "bwd")}
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
    assert [(s["model"], s["kernels"], s["compile"]) for s in steps] == [
        (m, k, c) for m, impls in (("tinyfuse", ("triton", "torch")), ("transformers", ("plain", "tinyfuse") + liger))
        for k in impls for c in (False, True)]
    for s in steps:
        assert s["preset"] == "stories260K" and s["tokens_per_s"] > 0 and "error" not in s
        assert set(s["breakdown"]) == {"data", "forward", "backward", "optimizer"}
        assert sum(s["breakdown"].values()) > 0 and {"mfu", "peak_mem_gb"} <= set(s)
    assert {r["impl"] for r in results["loader"]} == {"tinyfuse (C++)", "reference (numpy)"}
    assert all(r["tokens_per_s"] > 0 for r in results["loader"])
    md = (out / "results.md").read_text()
    for heading in ("## Kernels", "## Training step", "## Loader", "| linear_cross_entropy |", "smoke"):
        assert heading in md
    assert "## Kernels" in stdout
    for name in [f"kernels_{op}.png" for op in OPS] + ["step.png"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


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
    module = next(m for m in suite.op_modules() if op in m.OPS)
    for case in module.cases(op, smoke=True):
        args = case.make("cpu", torch.float32)
        read = sum(a.numel() for a in args if isinstance(a, torch.Tensor) and a.requires_grad and a.dim() > 1)
        out = module.impls(op, "eager")["torch"](*args)
        written = sum(o.numel() for o in (out if isinstance(out, tuple) else (out,)) if o.dim() > 0)
        gradient = read if op == "cross_entropy" else 0
        assert case.bytes["fwd"] == read + written + gradient, (op, case.shape)
