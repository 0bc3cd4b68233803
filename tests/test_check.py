"""`tinyfuse check` and its table (kernels/check.py): every op variant x dtype x shape of the
table runs here as its own test, and the command is run as a user runs it. Planted wrong
implementations prove each of its checks can fail: an error of 1e-3, an unwritten element,
a run-to-run difference, a host sync under torch.compile, a wrong output dtype."""
import json
import random

import pytest
import torch

from helpers import DEVICE, kernel_check, run_cli
from tinyfuse.kernels import reference

# SMALL runs through the command below; here the rest of SWEEP, one test a case. Each
# test draws fresh inputs (its seed is in the failure message).
CASES = kernel_check.cases(shapes=kernel_check.SWEEP[len(kernel_check.SMALL):])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_matches_float64(case):
    seed = random.randrange(1 << 31)
    (result,) = kernel_check.run([case], DEVICE, seed)
    assert result.ok, f"{result.line()} (seed {seed})"


def test_the_command_passes_here_and_writes_json():
    """The default: on a CPU the SMALL shapes in Triton's interpreter; on CUDA each preset."""
    done = run_cli("check", "--json", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["failed"] == 0 and report["passed"] == len(report["cases"])
    if DEVICE == "cpu":
        assert report["passed"] == len(kernel_check.cases(shapes=kernel_check.SMALL))
    ops = {c["op"] for c in report["cases"]}
    assert ops == set(kernel_check.OP_NAMES)
    compiled = [c for c in report["cases"] if c["compiled_error"] is not None]
    assert len(compiled) == len(kernel_check.OP_NAMES)  # one compiled case per op
    assert all(c["compiled_error"] == 0.0 for c in compiled)  # tinyfuse's ops are opaque to the compiler
    assert f"{report['passed']} of {report['passed']} cases passed" in done.stderr


def _scaled(fn, factor):
    def planted(*args, **options):
        out = fn(*args, **options)
        return tuple(o * factor for o in out) if isinstance(out, tuple) else out * factor
    return planted


@pytest.mark.parametrize("op", kernel_check.OP_NAMES)
def test_a_reference_off_by_1e_3_fails_with_its_line(op):
    """The reference itself, every output 1e-3 too large: each fp32 case fails on it."""
    case = kernel_check.cases([op], [torch.float32])[0]
    planted = _scaled(case.op.reference, 1 + 1e-3)
    (result,) = kernel_check.run([case], DEVICE, 0, impl=planted)
    line = result.line()
    assert not result.ok and line.startswith(f"FAIL {case.op.label} ")
    assert f" fp32 {case.op.describe(case.shape)} " in line
    assert f"{case.op.out_names[0]} error 1.0e-03 > 1e-05" in line


def test_an_unwritten_element_shows_through_the_poison():
    def leaves_one(x, weight, eps=1e-5):
        y = reference.rms_norm(x, weight, eps)
        out = torch.empty_like(y)
        out.view(-1)[1:] = y.view(-1)[1:]
        return out

    (result,) = kernel_check.run(kernel_check.cases(["rms_norm"], [torch.float32])[:1], DEVICE, 0, impl=leaves_one)
    assert "y: NaN or inf (an element left unwritten" in result.line()


def test_a_run_to_run_difference_fails():
    calls = []

    def wobbles(x, weight, eps=1e-5):
        calls.append(1)
        return reference.rms_norm(x, weight, eps) * (1 + 1e-7 * len(calls))

    (result,) = kernel_check.run(kernel_check.cases(["rms_norm"], [torch.float32])[:1], DEVICE, 0, impl=wobbles)
    assert "not deterministic: a second run differs in y, dx, dweight" in result.line()


def test_a_host_sync_fails_under_compile():
    def syncs(x, weight, eps=1e-5):  # a branch on a value on the device: the host waits for it
        return reference.rms_norm(x, weight, eps) if x.sum() > -1e30 else x

    (result,) = kernel_check.run(kernel_check.cases(["rms_norm"], [torch.float32])[:1], DEVICE, 0, impl=syncs)
    assert result.errors and "torch.compile(fullgraph=True) raised" in result.line()


def test_against_a_plain_pytorch_function_passes_and_a_planted_one_fails(tmp_path):
    (tmp_path / "mine.py").write_text(
        "import torch\n"
        "def rms_norm(x, weight, eps=1e-5):\n"
        "    xf = x.float()\n"
        "    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)\n"
        "def off(x, weight, eps=1e-5):\n"
        "    return rms_norm(x, weight, eps) * (1 + 1e-3)\n"
        "def float32_out(x, weight, eps=1e-5):\n"
        "    return rms_norm(x, weight, eps).float()\n")
    device = ["--device", DEVICE, "--shapes", "small"]
    done = run_cli("check", "--ops", "rms_norm", "--against", "mine:rms_norm", *device, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 cases of mine:rms_norm" in done.stdout and "6 of 6 cases passed" in done.stdout
    assert "skip rms_norm[offset=1]: mine:rms_norm takes no offset" in done.stdout  # the plain op only
    done = run_cli("check", "--ops", "rms_norm", "--dtypes", "fp32", "--against", f"{tmp_path}/mine.py:off", *device)
    assert done.returncode == 1
    fails = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2 and all("y error 1.0e-03 > 1e-05" in line for line in fails)
    assert "0 of 2 cases passed" in done.stdout and "--seed" in done.stdout
    done = run_cli("check", "--ops", "rms_norm", "--dtypes", "bf16", "--against", "mine:float32_out", *device,
                   cwd=tmp_path)
    assert done.returncode == 1 and "y: dtype torch.float32, expected torch.bfloat16" in done.stdout


def test_seed_repeats_the_inputs():
    runs = [run_cli("check", "--ops", "swiglu", "--dtypes", "bf16", "--seed", "7", "--json", "--shapes", "small",
                    "--device", DEVICE) for _ in range(2)]
    cases = [[c["errors"] for c in json.loads(r.stdout)["cases"]] for r in runs]
    assert runs[0].returncode == 0 and cases[0] == cases[1]


def test_row_shapes():
    """N,D: N rows of width D for every op; RoPE splits D into heads of 64, or one head."""
    assert kernel_check.Shape.rows("5,256") == kernel_check.Shape("5x256", 1, 5, 256, 256, 4, 2, 64, 256)
    assert kernel_check.Shape.rows("3,130").head_dim == 130
    done = run_cli("check", "--shapes", "5,130", "3,256", "--ops", "rope", "cross_entropy", "--dtypes", "fp32",
                   "--device", DEVICE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1x5x1/1x130" in done.stdout and "1x3x4/2x64" in done.stdout and "3x256" in done.stdout
    assert kernel_check.Op("rope", "", None, None, None, (), ()).skips(kernel_check.Shape.rows("4,7"))


@pytest.mark.parametrize("args,message", [
    (["--ops", "nope"], "--ops: unknown nope; the ops are rms_norm, "),
    (["--dtypes", "fp8"], "--dtypes: unknown 'fp8'"),
    (["--shapes", "3,x"], "--shapes: expected preset, small, sweep or N,D"),
    (["--shapes", "0,8"], "--shapes 0,8: N must be >= 1"),
    (["--against", "m:f"], "--against checks one op: name it with --ops"),
    (["--ops", "rms_norm", "--against", "no_such_module:f"], "--against no_such_module:f: cannot import"),
    (["--ops", "rms_norm", "--against", "json:no_such_function"], "json has no function no_such_function"),
    (["--ops", "rms_norm", "--against", "nocolon"], "--against: expected MODULE:FUNCTION"),
    (["--ops", "rope", "--shapes", "4,7"], "no case to run"),
])
def test_bad_requests_get_one_line_and_exit_2(args, message):
    done = run_cli("check", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_bf16_outputs_round_to_nearest_even_as_on_the_gpu():
    """Triton 3.6's interpreter truncated float32 -> bf16 (kernels/_compat.py rounds instead):
    a bf16 store matches torch's round-to-nearest-even bit for bit, specials included, and
    the error of a bf16 output is a round-to-nearest one."""
    import triton
    import triton.language as tl

    @triton.jit
    def store_bf16(X, Y, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(Y + i, tl.load(X + i).to(tl.bfloat16))

    specials = [float("nan"), float("inf"), -float("inf"), 3.4e38, -3.4e38, 0.0, -0.0, 1e-40, -1e-40]
    x = torch.cat([torch.randn(4096 - len(specials)), torch.tensor(specials)]).to(DEVICE)
    y = torch.empty(4096, dtype=torch.bfloat16, device=DEVICE)
    store_bf16[(1,)](x, y, N=4096)
    expected = x.to(torch.bfloat16)
    assert torch.equal(y.isnan(), expected.isnan())  # NaN's bits differ by device: 0x7FFF, 0xFFFF
    assert torch.equal(y[~y.isnan()].view(torch.int16), expected[~expected.isnan()].view(torch.int16))
    (result,) = kernel_check.run(kernel_check.cases(["swiglu"], [torch.bfloat16])[:1], DEVICE, 0)
    assert result.errors["y"] < 2.0 ** -9  # truncation gave ~3.3e-3 (rounding: ~1.7e-3)


@pytest.mark.parametrize("label,option", [("rms_norm[offset=1]", "offset"),
                                          ("cross_entropy[mean,softcap=5,logit_scale=0.5]", "softcap"),
                                          ("cross_entropy[mean,softcap=5,logit_scale=0.5]", "logit_scale"),
                                          ("linear_cross_entropy[stored,bias,softcap=5,logit_scale=0.5]", "bias")])
def test_an_implementation_that_ignores_an_option_fails(label, option):
    """The variants' options change the result enough to be caught: the reference without one fails."""
    case = next(c for c in kernel_check.cases(dtypes=[torch.float32]) if c.op.label == label)

    def ignores(*args, **options):
        options.pop(option)
        return case.op.reference(*args, **options)

    (result,) = kernel_check.run([case], DEVICE, 0, impl=ignores)
    assert not result.ok and (" error " in result.line() or "no gradient" in result.line()), result.line()
