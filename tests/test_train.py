"""The trainer and the train/sample commands: loss falls, exact resume, signals, non-finite
steps, configuration errors, DDP equivalence, sampling, the main job."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import TINY_MODEL, metrics, rel_err, run_cli, tiny_run, gpu_only
from tinyfuse.engine import data
from tinyfuse.engine.sample import generate, pick
from tinyfuse.engine.runtime import device_peak_tflops
from tinyfuse.engine.run_spec import resolve_run
from tinyfuse.engine.train import PHASES, TrainConfig, Trainer, lr_at



@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synthetic"
    data.prepare("synthetic", str(out), vocab_size=400, stories=3000, quiet=True)
    return str(out)


def test_loss_falls_and_run_folder(prepared, tmp_path):
    Trainer(resolve_run(tiny_run(prepared, tmp_path, max_steps=40, eval_every=20)), quiet=True).fit()
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 41))
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s", "mfu"} <= set(r) and r["mfu"] is None and r["tokens_per_s"] > 0
    assert [r["step"] for r in records if "val_loss" in r] == [20, 40]
    assert records[0]["loss"] > 5.5  # about log(400) at the start
    assert records[-1]["loss"] < records[0]["loss"] - 1.0 and records[-1]["val_loss"] < records[19]["val_loss"]
    assert os.path.getsize(tmp_path / "loss.png") > 1000
    kept = sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt_"))
    assert kept == ["ckpt_000018.pt", "ckpt_000024.pt", "ckpt_000030.pt", "ckpt_000036.pt", "ckpt_000040.pt"]
    state = torch.load(tmp_path / kept[-1], weights_only=False)
    assert {"model", "optimizer", "loader", "rng", "model_config", "train_config", "step"} <= set(state)
    assert state["step"] == 40 and state["tokenizer"][:2]


def test_resume_is_bit_exact_on_cpu(prepared, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    Trainer(resolve_run(tiny_run(prepared, whole)), quiet=True).fit()
    resumed.mkdir()
    shutil.copy(whole / "ckpt_000006.pt", resumed)
    with open(whole / "metrics.jsonl") as f, open(resumed / "metrics.jsonl", "w") as g:
        g.writelines(f.readlines())  # lines past the checkpoint, as a crashed run leaves them
    trainer = Trainer(resolve_run(tiny_run(prepared, resumed)), quiet=True)
    trainer.resume()
    assert trainer.step == 6
    trainer.fit()
    a, b = metrics(whole), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 13)), "lines after the checkpoint are replaced, not repeated"
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]


def test_sigterm_writes_a_checkpoint_and_resume_finishes(prepared, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", prepared, "--out", str(out), "--max-steps", "100000", "--batch-size", "2",
            "--seq-len", "16", "--dim", "16", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "2",
            "--log-every", "1", "--ckpt-every", "100000", "--eval-every", "100000", "--device", "cpu",
            "--sample-tokens", "0"]
    process = subprocess.Popen(["tinyfuse", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(metrics(out)) < 3:
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    kept = sorted(f for f in os.listdir(out) if f.startswith("ckpt_"))
    assert len(kept) == 1 and "--resume" in err
    step = torch.load(out / kept[0], weights_only=False)["step"]
    assert step >= 3
    result = run_cli(*args[:-10], "--max-steps", str(step + 2), "--log-every", "1", "--device", "cpu",
                     "--sample-tokens", "0", "--resume")
    assert result.returncode == 0, result.stderr
    assert metrics(out)[-1]["step"] == step + 2
    result = run_cli(*args[:-10], "--max-steps", str(step + 4), "--device", "cpu")
    assert result.returncode == 2 and "pass --resume" in result.stderr
    finished = run_cli("train", "--out", str(out), "--resume", "--device", "cpu")  # its own settings: done
    assert finished.returncode == 0 and f"nothing to do: {out} is at step {step + 2} of --max-steps {step + 2}" \
        in finished.stdout, finished.stdout + finished.stderr
    corpus = tmp_path / "stories.txt"
    corpus.write_text("Once upon a time.")
    result = run_cli("train", "--data", str(corpus), "--device", "cpu")
    assert result.returncode == 2 and f"tinyfuse prepare --source {corpus} --out data/stories`" in result.stderr


def test_non_finite_steps_are_skipped_then_abort(prepared, tmp_path):
    trainer = Trainer(resolve_run(tiny_run(prepared, tmp_path, max_bad_steps=3, max_steps=50)), quiet=True)
    with torch.no_grad():
        trainer.model.layers[0].attention_norm.fill_(float("nan"))
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(FloatingPointError, match="3 steps in a row.*--lr"):
        trainer.fit()
    assert trainer.skipped_steps == 3
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]) or torch.isnan(before[n]).all(), f"{n} changed in a skipped step"


@pytest.mark.parametrize("flags, message", [
    (["--dim", "30"], "not divisible by n_heads"),
    (["--n-kv-heads", "3"], "not divisible by n_kv_heads"),
    (["--dim", "36", "--n-heads", "12", "--n-kv-heads", "12"], "is odd"),
    (["--lr", "0"], "lr must be positive"),
    (["--batch-size", "0"], "batch_size must be a positive"),
    (["--vocab-size", "100"], "larger than the model's vocab_size 100"),
    (["--seq-len", "100"], "exceeds the model's max_seq_len 64"),
    (["--preset", "stories1B"], "preset must be one of stories260K"),
    (["--init-from", "model.bin"], "the model's shape comes from --init-from model.bin; drop the model settings"),
])
def test_configuration_errors_stop_before_work(prepared, tmp_path, flags, message):
    base = ["train", "--data", prepared, "--out", str(tmp_path / "o"), "--dim", "32", "--n-heads", "4",
            "--n-kv-heads", "2", "--max-seq-len", "64", "--device", "cpu"]
    result = run_cli(*base, *flags)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not os.path.exists(tmp_path / "o")


def test_missing_data_and_other_shape_checkpoint(prepared, tmp_path):
    result = run_cli("train", "--data", str(tmp_path / "none"), "--device", "cpu")
    assert result.returncode == 2 and "tinyfuse prepare" in result.stderr
    Trainer(resolve_run(tiny_run(prepared, tmp_path / "a", max_steps=1)), quiet=True).fit()
    with pytest.raises(ValueError, match="another model shape.*dim 32 vs 48"):
        Trainer(resolve_run(tiny_run(prepared, tmp_path / "a", model={**TINY_MODEL, "dim": 48})), quiet=True).resume()


def test_toml_config_and_flags(prepared, tmp_path):
    from tinyfuse.engine.cli import build_parser, train_config

    toml = tmp_path / "run.toml"
    toml.write_text('preset = "stories15M"\nlr = 1e-3\nbatch_size = 7\n[model]\ndim = 96\nn_heads = 4\n')
    args = build_parser().parse_args(["train", "--config", str(toml), "--lr", "2e-3", "--n-heads", "8"])
    cfg = train_config(args)
    assert cfg.preset == "stories15M" and cfg.batch_size == 7 and cfg.lr == 2e-3
    assert cfg.model == {"dim": 96, "n_heads": 8}
    toml.write_text("learning_rate = 1\n")
    with pytest.raises(ValueError, match="unknown training settings: learning_rate"):
        train_config(build_parser().parse_args(["train", "--config", str(toml)]))


def test_schedule_and_peak_table():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert device_peak_tflops("NVIDIA H200") == 989
    assert device_peak_tflops("Some Future GPU") is None


def test_ddp_two_processes_equal_one(prepared, tmp_path):
    common = ["--data", prepared, "--batch-size", "2", "--seq-len", "16", "--grad-accum", "2", "--max-steps", "4",
              "--dim", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--max-seq-len", "64",
              "--log-every", "1", "--eval-every", "2", "--eval-batches", "3", "--device", "cpu", "--sample-tokens", "0"]
    single = run_cli("train", "--out", str(tmp_path / "single"), *common)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "tinyfuse.engine", "train", "--out", str(tmp_path / "ddp"), *common],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = metrics(tmp_path / "single"), metrics(tmp_path / "ddp")
    assert len(a) == len(b) == 4
    assert [r["step"] for r in a if "val_loss" in r] == [r["step"] for r in b if "val_loss" in r] == [2, 4]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        if "val_loss" in ra:
            assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)


def test_sampling(prepared, tmp_path):
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 5.0, 1.0, 4.9])
    assert pick(logits, 0, 0.9, g) == 1
    assert {pick(logits, 1.0, 0.5, g) for _ in range(50)} == {1}, "top_p 0.5 keeps only the top token here"
    assert {pick(logits, 1.0, 1.0, g) for _ in range(200)} >= {1, 3}

    trainer = Trainer(resolve_run(tiny_run(prepared, tmp_path, max_steps=30)), quiet=True)
    trainer.fit()
    model = trainer.model
    a = generate(model, [1], 30, temperature=1.0, seed=3)
    assert a == generate(model, [1], 30, temperature=1.0, seed=3)
    assert a != generate(model, [1], 30, temperature=1.0, seed=4)
    greedy = generate(model, [1], 20, temperature=0)
    assert greedy == generate(model, [1], 20, temperature=0.5, seed=9, top_p=1e-9)
    k = next((i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i]), 0)
    assert generate(model, [1], 20, temperature=0, stop=(greedy[k],)) == greedy[:k]
    assert len(generate(model, [1] * 60, 100, temperature=0)) == 4, "stops at the model's context"

    ckpt = str(next(p for p in sorted(tmp_path.iterdir()) if p.name.startswith("ckpt_")))
    one = run_cli("sample", "--checkpoint", ckpt, "--seed", "5", "--max-new-tokens", "20", "--prompt", "Once upon")
    two = run_cli("sample", "--checkpoint", ckpt, "--seed", "5", "--max-new-tokens", "20", "--prompt", "Once upon")
    assert one.returncode == 0 and one.stdout == two.stdout and one.stdout.startswith("Once upon")
    bad = run_cli("sample", "--checkpoint", str(tmp_path / "metrics.jsonl"))
    assert bad.returncode == 2 and "not a checkpoint we know" in bad.stderr


def test_clipping_through_the_optimizer_equals_clip_grad_norm(prepared, tmp_path):
    """grad_scale = max(1, norm / clip) inside the fused AdamW is clip_grad_norm_'s scaling."""
    a = Trainer(resolve_run(tiny_run(prepared, tmp_path / "a", grad_clip=0.05, lr=1e-2)), quiet=True)
    b = Trainer(resolve_run(tiny_run(prepared, tmp_path / "b", grad_clip=0.05, lr=1e-2)), quiet=True)
    a.train_step()
    x, y = next(b.train_loader)
    b.model(x, y).backward()
    torch.nn.utils.clip_grad_norm_(b.model.parameters(), 0.05)
    b.optimizer.step()
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name
    a.close()
    b.close()



def test_bf16_step_with_working_copies(prepared, tmp_path):
    """The GPU's step run on the CPU: bf16 autocast and working copies. The copies equal the
    masters after every update (a skipped one too), and the losses follow those of autocast's
    own casts (the same bf16 forward; float32 weight gradients instead of bf16-rounded ones)."""
    a = Trainer(resolve_run(tiny_run(prepared, tmp_path / "a", kernels="torch")), quiet=True)
    b = Trainer(resolve_run(tiny_run(prepared, tmp_path / "b", kernels="torch")), quiet=True)
    a.use_compute_dtype(torch.bfloat16)
    b.autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    copies, masters = a.model._working
    start = [p.detach().clone() for p in b.model.parameters()]
    for step in range(4):
        a.loss_sum.zero_()
        b.loss_sum.zero_()
        a.train_step()
        b.train_step()
        assert all(torch.equal(c, m.detach().to(torch.bfloat16)) for c, m in zip(copies, masters)), step
        assert a.loss_sum.item() == pytest.approx(b.loss_sum.item(), rel=2e-2)
    for (name, p), q, p0 in zip(a.model.named_parameters(), b.model.parameters(), start):
        assert rel_err(p - p0, q - p0) < 2e-2, f"{name}: the updates differ (bf16 rounding of the gradient: ~4e-3)"
    a.close()
    b.close()


def test_attention_backends(prepared, tmp_path):
    """--attention names one SDPA backend (the model runs under it) or leaves the choice to
    SDPA; auto measures the backends that run this shape (on a GPU; here the timing itself)."""
    from tinyfuse.engine.runtime import SDPA_BACKENDS, fastest_sdpa_backend

    losses = {}
    for attention in ("sdpa", "math", "flash", "auto"):
        trainer = Trainer(resolve_run(tiny_run(prepared, tmp_path / attention, attention=attention, max_steps=2)), quiet=True)
        assert trainer.spec.attention == ("sdpa" if attention == "auto" else attention), "auto: SDPA's choice on CPU"
        trainer.fit()
        losses[attention] = [r["loss"] for r in metrics(tmp_path / attention)]
    for attention in ("math", "flash", "auto"):
        assert losses[attention] == pytest.approx(losses["sdpa"], rel=1e-4), attention
    best, times, rejected = fastest_sdpa_backend(2, 4, 2, 32, 8, "cpu", torch.float32, repeats=2)
    assert best == next(iter(times)) and set(times) <= set(SDPA_BACKENDS) and "math" in times and not rejected
    assert list(times.values()) == sorted(times.values()) and min(times.values()) > 0
    result = run_cli("train", "--attention", "fastest", "--device", "cpu")
    assert result.returncode == 2 and "attention must be one of auto, sdpa, cudnn" in result.stderr


def test_auto_attention_rejects_a_backend_that_disagrees_with_math(monkeypatch):
    """The backends are compared with the math backend on the model's own layouts (strided
    v, transposed views) and on one-token decoding against KV-cache slices: a backend wrong
    only when decoding is not chosen, however fast."""
    from tinyfuse.engine import runtime

    attend = runtime._attend

    def wrong_when_decoding(name, q, k, v, causal):
        out = attend(name, q, k, v, causal)
        return out * 1.1 if name == "flash" and q.shape[1] == 1 else out

    monkeypatch.setattr(runtime, "_attend", wrong_when_decoding)
    best, times, rejected = runtime.fastest_sdpa_backend(2, 4, 2, 32, 8, "cpu", torch.float32, repeats=1)
    assert "flash" not in times and best in times
    assert rejected["flash"].startswith("decode differs from the math backend's by 1.0e-01")


def test_compiled_step_compiles_once(prepared, tmp_path):
    """--compile: the RoPE tables are built before the model is compiled, so the first
    compiled call does not build them and the second does not recompile (a guard on the
    cached tables did: every compiled bench row compiled twice)."""
    import torch._dynamo

    torch._dynamo.reset()
    trainer = Trainer(resolve_run(tiny_run(prepared, tmp_path, compile=True, max_steps=3)), quiet=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            trainer.train_step()
    trainer.close()
    torch._dynamo.reset()


def test_cuda_graph_flag_on_cpu_says_it_is_off(prepared, tmp_path, capsys):
    trainer = Trainer(resolve_run(tiny_run(prepared, tmp_path, cuda_graph=True, max_steps=2)))
    assert not trainer.use_graph
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().out
    trainer.close()


@gpu_only("CUDA graphs need a CUDA device")
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_cuda_graph_step_equals_the_eager_step(prepared, tmp_path, compile):
    """Replaying the captured step gives the losses, norms and parameters of running it
    eagerly: the warm-up steps, the capture and the replays (with the learning rate
    rewritten in place and the loader copying into the static batch) change nothing."""
    runs = {}
    for graph in (False, True):
        out = tmp_path / f"graph{graph}"
        trainer = Trainer(resolve_run(tiny_run(prepared, out, device="cuda", kernels="triton", cuda_graph=graph, compile=compile,
                                   attention="sdpa",  # the same backend in both runs (auto measures)
                                   max_steps=10, grad_accum=2, eval_every=5)), quiet=True)
        trainer.fit()
        assert (trainer.graph is not None) == graph
        runs[graph] = metrics(out), {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    (a, pa), (b, pb) = runs[False], runs[True]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-4)
    for name in pa:
        assert torch.allclose(pa[name], pb[name], rtol=1e-4, atol=1e-6), name


def test_loader_reads_into_static_buffers(prepared):
    from tinyfuse.engine.loader import TokenLoader

    with TokenLoader(prepared, "train", 3, 16, seed=4) as a, TokenLoader(prepared, "train", 3, 16, seed=4) as b:
        x, y = torch.empty(3, 16, dtype=torch.int64), torch.empty(3, 16, dtype=torch.int64)
        for _ in range(3):
            a.read_into(x, y)
            ex, ey = next(b)
            assert torch.equal(x, ex) and torch.equal(y, ey)
        assert a.state_dict() == b.state_dict()
        with pytest.raises(ValueError, match=r"read_into: expected two \[3, 16\] buffers"):
            a.read_into(x[:2], y[:2])


def test_progress_lines_come_on_time(monkeypatch):
    """Off a terminal, a line is printed before `every` seconds pass, not once they have:
    with 3-second steps and every=10, lines 9 s apart (never 12); one line a log step."""
    import io

    from tinyfuse.engine import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = progress.Progress(40, "tokenize", "story", stream=out)
    printed = []
    for _ in range(40):
        clock[0] += 3.0
        before = out.getvalue().count("\n")
        bar.update(lambda: "status")
        if out.getvalue().count("\n") > before:
            printed.append(clock[0])
    gaps = [b - a for a, b in zip([0.0] + printed, printed)]
    assert gaps and max(gaps) <= 10.0 and min(gaps) >= 9.0, gaps
    assert out.getvalue().splitlines()[0] == "tokenize      3/40 stories  status"
    assert progress.Progress(1, "eval", "batch", enabled=False).units == "batches"


def test_two_first_runs_at_once_share_the_corpus_cache(tmp_path):
    """Two `tinyfuse train` started together on a machine without the built-in corpus: one
    prepares it while the other waits for it; both train, and the cache is intact."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    small = ["--max-steps", "2", "--batch-size", "2", "--seq-len", "16", "--dim", "16", "--n-layers", "1",
             "--n-heads", "2", "--n-kv-heads", "2", "--eval-batches", "1", "--sample-tokens", "0", "--device", "cpu"]
    runs = [subprocess.Popen(["tinyfuse", "train", *small, "--out", str(tmp_path / f"run{i}")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err
    assert sum("preparing the built-in synthetic corpus" in out for out, _ in outputs) == 1
    assert run_cli("prepare", "--verify", str(tmp_path / "cache" / "tinyfuse" / "synthetic-512")).returncode == 0


def test_the_step_timed_phase_by_phase_is_the_trainers_step(prepared, tmp_path):
    """train_step(mark), the step benchmark's breakdown, runs the trainer's own step: every
    phase of every micro-batch in order, and parameters bit-equal to unmarked steps'. So the
    benchmark's phases add up to the step its rows time (the graph replays this work)."""
    plain, timed = (Trainer(resolve_run(tiny_run(prepared, tmp_path / name, grad_accum=2)), quiet=True)
                    for name in ("plain", "timed"))
    marks = []
    try:
        for _ in range(2):
            plain.train_step()
            timed.train_step(mark=marks.append)
        assert marks == ["data", "forward", "backward", "forward", "backward", "optimizer"] * 2
        assert set(marks) == set(PHASES)
        for (name, p), q in zip(plain.model.named_parameters(), timed.model.parameters()):
            assert torch.equal(p, q), name
        assert torch.equal(plain.loss_sum, timed.loss_sum)
    finally:
        plain.close()
        timed.close()
