"""Hostile and unlucky input: checkpoints that would run code, data that must never be lost,
paths that leave their folder, headers that ask for too much, damaged runs, two runs in one
folder, a loader closed under a reader, and inputs that used to end in a raw traceback."""
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, metrics, run_cli, tiny_run
from tinyfuse.engine import data
from tinyfuse.engine.checkpoint import (NATIVE_KIND, CheckpointError, load_checkpoint, load_training_state,
                                        run_checkpoints)
from tinyfuse.engine.files import FileError, FolderLock
from tinyfuse.engine.loader import TokenLoader
from tinyfuse.engine.shards import DataError, read_manifest, split_shards
from tinyfuse.engine.run_spec import resolve_run
from tinyfuse.engine.train import Trainer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "data"
    data.prepare("synthetic", str(out), vocab_size=400, stories=1500, quiet=True)
    return str(out)


def config(prepared, out, **changes):
    return tiny_run(prepared, out, **{**dict(batch_size=2, seq_len=16, max_steps=4, eval_every=4, eval_batches=1,
                                             ckpt_every=2, keep_checkpoints=3), **changes})


@pytest.fixture(scope="module")
def run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    Trainer(resolve_run(config(prepared, out)), quiet=True).fit()
    return str(out)


class RunsCode:
    """An object whose unpickling runs a shell command (it touches a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------- 1. loading never runs code

@pytest.mark.parametrize("kind", ["tinyfuse", "llama2c-pt", "legacy-pickle", "zip-named-bin"])
def test_a_checkpoint_with_code_is_refused_and_runs_nothing(run, tmp_path, kind):
    marker = tmp_path / "ran"
    state = torch.load(run_checkpoints(run)[-1], weights_only=True)
    if kind == "llama2c-pt":
        state = {"model_args": {"dim": 32}, "model": {}, "extra": RunsCode(marker)}
    else:
        state["extra"] = RunsCode(marker)
    path = tmp_path / ("model.bin" if kind == "zip-named-bin" else "model.pt")
    torch.save(state, path, _use_new_zipfile_serialization=kind != "legacy-pickle")
    with pytest.raises(CheckpointError, match="refused.*could run code.*posix.system|refused.*could run code"):
        load_checkpoint(str(path))
    assert not marker.exists(), "loading ran the file's code"
    for command in (["sample", "--checkpoint", str(path)], ["export", "--checkpoint", str(path), "--format", "hf",
                                                             "--out", str(tmp_path / "hf")]):
        result = run_cli(*command)
        assert result.returncode == 2 and "refused" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not marker.exists()


def test_resume_refuses_code_too(run, prepared, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(run, out)
    newest = run_checkpoints(str(out))[-1]
    state = torch.load(newest, weights_only=True)
    state["extra"] = RunsCode(tmp_path / "ran")
    torch.save(state, newest)
    trainer = Trainer(resolve_run(config(prepared, out)), quiet=True)
    trainer.resume()  # falls back to the intact checkpoint before it
    trainer.close()
    assert trainer.step == 2 and not (tmp_path / "ran").exists()


def test_checkpoints_hold_only_tensors_and_plain_data(run):
    state = torch.load(run_checkpoints(run)[-1], weights_only=True)  # would raise on anything else
    assert state["kind"] == NATIVE_KIND and isinstance(state["tokenizer"], bytes)
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


# ---------------------------------------------------------------- 2. prepare never deletes what it did not write

def test_prepare_refuses_a_folder_with_other_files_and_keeps_them(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "stories260K.bin").write_bytes(b"precious")
    result = run_cli("prepare", "--out", str(out), "--stories", "300")
    assert result.returncode == 2 and "not a tinyfuse dataset" in result.stderr and "--force" in result.stderr
    assert (out / "stories260K.bin").read_bytes() == b"precious"
    assert run_cli("prepare", "--out", str(out), "--stories", "300", "--force").returncode == 0
    assert (out / "stories260K.bin").read_bytes() == b"precious" and (out / "manifest.json").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == [], "no temporary folder left behind"


@pytest.mark.parametrize("bad", [["--tokenizer", "missing.model"], ["--vocab-size", "100000000"],
                                 ["--source", "no-such-file.txt"]])
def test_a_failed_rerun_leaves_the_dataset_intact(tmp_path, bad):
    out = tmp_path / "d"
    data.prepare("synthetic", str(out), vocab_size=400, stories=300, quiet=True)
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    result = run_cli("prepare", "--out", str(out), "--stories", "300", *bad)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_rerun_replaces_only_the_old_datasets_files(tmp_path):
    out = tmp_path / "d"
    data.prepare("synthetic", str(out), vocab_size=400, stories=600, quiet=True, shard_tokens=20000)
    assert len([p for p in os.listdir(out) if p.startswith("train_")]) > 1
    data.prepare("synthetic", str(out), vocab_size=400, stories=300, quiet=True)
    assert sorted(os.listdir(out)) == ["manifest.json", "tokenizer.model", "train_000.bin", "val_000.bin"]


# ---------------------------------------------------------------- 3. manifest paths stay inside

@pytest.mark.parametrize("entry", ["shard", "tokenizer"])
@pytest.mark.parametrize("target", ["../../secret/creds.txt", "ABSOLUTE", "link"])
def test_manifest_paths_cannot_leave_the_folder(prepared, tmp_path, entry, target):
    secret = tmp_path / "secret" / "creds.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"password")
    folder = tmp_path / "a" / "b"
    shutil.copytree(prepared, folder)
    if target == "ABSOLUTE":
        target = str(secret)
    elif target == "link":
        os.symlink(secret, folder / "link")
    manifest = json.loads((folder / "manifest.json").read_text())
    if entry == "shard":
        manifest["shards"][0]["file"] = target
        where = "shards[0].file"
    else:
        manifest["tokenizer"]["path"] = target
        where = "tokenizer.path"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"{where.replace('[', '.').replace(']', '.')}.*(outside|relative path)"):
        read_manifest(str(folder))


# ---------------------------------------------------------------- 4. headers cannot ask for too much

@pytest.mark.parametrize("n_layers", [10 ** 7, 2 ** 31 - 1, 1000])
def test_a_tiny_v0_file_with_a_huge_header_fails_fast(tmp_path, n_layers):
    path = tmp_path / "evil.bin"
    path.write_bytes(struct.pack("<7i", 64, 172, n_layers, 8, 4, 512, 512))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="limit|truncated"):
        load_checkpoint(str(path))
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("change", [{"num_hidden_layers": 10 ** 7}, {"num_hidden_layers": 2 ** 31 - 1},
                                    {"max_position_embeddings": 10 ** 9}, {"num_hidden_layers": 3},
                                    {"num_attention_heads": 0}, {"num_attention_heads": None}])
def test_a_hf_config_that_does_not_match_its_weights_fails_fast(run, tmp_path, change):
    folder = tmp_path / "hf"
    assert run_cli("export", "--checkpoint", run_checkpoints(run)[-1], "--format", "hf", "--out",
                   str(folder)).returncode == 0
    config = json.loads((folder / "config.json").read_text())
    for key, value in change.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(CheckpointError):
        load_checkpoint(str(folder))
    assert time.perf_counter() - start < 5
    result = run_cli("sample", "--checkpoint", str(folder))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


def test_the_kv_cache_is_sized_by_the_tokens_asked_for(run):
    weights = load_checkpoint(run_checkpoints(run)[-1])
    from tinyfuse.engine.model import Transformer

    model = Transformer(weights.config)
    caches = model.new_cache(1, "cpu", torch.float32, 10)
    assert caches[0][0].shape[1] == 10
    model.config.max_seq_len = 1 << 20  # a long context costs nothing until it is used
    model.forward_cached(torch.tensor([[1, 2, 3]]), caches, 0)
    assert model._rope[0].shape[0] == 256


# ---------------------------------------------------------------- 5. rotation by step number

def test_rotation_orders_checkpoints_by_step(prepared, tmp_path):
    trainer = Trainer(resolve_run(config(prepared, tmp_path, keep_checkpoints=2)), quiet=True)
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        trainer.step = step
        trainer.save()
    trainer.close()
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt_1000000.pt", "ckpt_1000001.pt"]
    assert [os.path.basename(p) for p in run_checkpoints(str(tmp_path))] == ["ckpt_1000000.pt", "ckpt_1000001.pt"]


# ---------------------------------------------------------------- 6. resume survives damage

def test_resume_skips_a_damaged_newest_checkpoint(run, prepared, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(run, out)
    newest = run_checkpoints(str(out))[-1]
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    state, skipped = load_training_state(str(out))
    assert state["step"] == 2 and skipped and skipped[0][0] == newest and "damaged" in skipped[0][1]
    result = run_cli("train", "--data", prepared, "--out", str(out), "--resume", "--device", "cpu",
                     *flags(max_steps=6))
    assert result.returncode == 0, result.stderr
    assert f"skipped {newest}" in result.stdout and metrics(out)[-1]["step"] == 6


def test_sample_eval_and_export_take_a_run_folder_by_resume_s_rule(run, prepared, tmp_path):
    """--checkpoint RUN_FOLDER: the newest intact checkpoint, as --resume finds it (one rule
    for both), with a line for the damaged one skipped."""
    out = tmp_path / "r"
    shutil.copytree(run, out)
    newest = run_checkpoints(str(out))[-1]
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    result = run_cli("sample", "--checkpoint", str(out), "--max-new-tokens", "4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"skipped {newest}" in result.stderr
    result = run_cli("export", "--checkpoint", str(out), "--format", "llama2c-v0", "--out", str(tmp_path / "m.bin"))
    assert result.returncode == 0 and (tmp_path / "m.bin").stat().st_size > 0, result.stderr


def flags(**values):
    base = dict(batch_size=2, seq_len=16, max_steps=4, log_every=1, eval_every=4, eval_batches=1, ckpt_every=2,
                sample_tokens=0, **{k: v for k, v in TINY_MODEL.items()})
    base.update(values)
    return [x for k, v in base.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def test_resume_drops_a_torn_metrics_line(run, prepared, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(run, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # the disk filled mid-line
    trainer = Trainer(resolve_run(config(prepared, out, max_steps=6)), quiet=True)
    trainer.resume()
    trainer.fit()
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(run, prepared, tmp_path, monkeypatch):
    out = tmp_path / "r"
    shutil.copytree(run, out)
    trainer = Trainer(resolve_run(config(prepared, out, max_steps=6)), quiet=True)
    trainer.resume()
    before = run_checkpoints(str(out))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous"):
        trainer.fit()
    assert run_checkpoints(str(out)) == before and not [p for p in os.listdir(out) if p.endswith(".tmp")]


# ---------------------------------------------------------------- 7. one run per folder

def test_a_second_run_into_the_same_folder_is_refused(prepared, tmp_path):
    lock = FolderLock(str(tmp_path))
    with pytest.raises(FileError, match=f"PID {os.getpid()}"):
        FolderLock(str(tmp_path))
    code = f"from tinyfuse.engine.files import FolderLock; FolderLock({str(tmp_path)!r})"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert other.returncode != 0 and f"PID {os.getpid()}" in other.stderr
    result = run_cli("train", "--data", prepared, "--out", str(tmp_path), "--device", "cpu", *flags())
    assert result.returncode == 2 and f"another process (PID {os.getpid()})" in result.stderr
    lock.release()
    assert run_cli("train", "--data", prepared, "--out", str(tmp_path), "--device", "cpu", *flags()).returncode == 0


def test_a_folder_holding_a_run_is_refused_before_anything_is_built(prepared, tmp_path):
    """Without --resume, an --out holding checkpoints is refused first: the data folder
    (here one that does not exist) is never read, no model is built, nothing is written."""
    (tmp_path / "ckpt_000010.pt").write_bytes(b"a run's checkpoint")
    before = sorted(os.listdir(tmp_path))
    result = run_cli("train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path), "--device", "cpu", *flags())
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"tinyfuse train: {tmp_path} already holds checkpoints: pass --resume to continue it, or another --out"]
    assert sorted(os.listdir(tmp_path)) == before


# ---------------------------------------------------------------- 8. the loader closed under a reader

def test_close_while_another_thread_waits_in_next(prepared):
    for _ in range(20):
        loader = TokenLoader(prepared, batch_size=2, seq_len=16, prefetch=2, workers=1)
        loader._impl.release(loader._impl.acquire())  # keep the ring busy
        errors = []

        def read():
            try:
                while True:
                    next(loader)
            except RuntimeError as e:
                errors.append(str(e))

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.01)
        loader.close()
        reader.join(timeout=10)
        assert not reader.is_alive(), "next() stayed blocked after close()"
        assert errors and "closed" in errors[0]
        with pytest.raises(RuntimeError, match="closed"):
            next(loader)


# ---------------------------------------------------------------- 9. one line instead of a traceback

@pytest.mark.parametrize("toml, message", [
    ("[model]\nwidth = 3\n", "unknown model settings: width"),
    ("model = 5\n", "model settings must be a table"),
    ("batch_size = true\n", "training setting batch_size must be a int"),
    ("lr = 'fast'\n", "training setting lr must be a float"),
    ("lr = nan\n", "lr must be a finite number"),
])
def test_bad_toml_values(prepared, tmp_path, toml, message):
    (tmp_path / "run.toml").write_text(toml)
    result = run_cli("train", "--config", str(tmp_path / "run.toml"), "--data", prepared, "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--lr", "inf"], "lr must be a finite number"),
    (["--norm-eps", "nan"], "norm_eps must be a positive finite number"),
    (["--device", "cuda"], "no CUDA device"),
])
def test_bad_flags(prepared, tmp_path, args, message):
    if args[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here, so there is no error to check")
    result = run_cli("train", "--data", prepared, "--out", str(tmp_path / "o"), *args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda m: [1, 2], "expected a JSON object"),
    (lambda m: {**m, "shards": [{"split": "train", "tokens": 3}]}, "shards[0] must be an object with a 'file'"),
    (lambda m: {**m, "vocab_size": 100}, "not below the vocabulary size 100"),
])
def test_bad_manifests(prepared, tmp_path, edit, message):
    folder = tmp_path / "d"
    shutil.copytree(prepared, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(edit(manifest)))
    result = run_cli("train", "--data", str(folder), "--out", str(tmp_path / "o"), "--device", "cpu", *flags())
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_non_utf8_source_names_the_byte(tmp_path):
    source = tmp_path / "stories.txt"
    source.write_bytes("Once upon a time.\n\nA cat sat.".encode() + b"\xff\xfe rest")
    result = run_cli("prepare", "--source", str(source), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "not UTF-8" in result.stderr and "offset 29" in result.stderr, result.stderr


def test_cross_entropy_with_no_classes():
    from tinyfuse.kernels import cross_entropy

    with pytest.raises(ValueError, match="at least one class"):
        cross_entropy(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- 10. fine-tuning with another tokenizer

def test_init_from_with_another_tokenizer_is_refused(run, tmp_path):
    other = tmp_path / "other"
    data.prepare("synthetic", str(other), vocab_size=400, stories=1500, seed=5, quiet=True)
    ckpt = run_checkpoints(run)[-1]
    base = ["train", "--init-from", ckpt, "--data", str(other), "--device", "cpu"]
    small = ["--batch-size", "2", "--seq-len", "16", "--max-steps", "2", "--sample-tokens", "0"]
    result = run_cli(*base, "--out", str(tmp_path / "a"), *small)
    assert result.returncode == 2 and "another tokenizer" in result.stderr and "--allow-tokenizer-mismatch" in result.stderr
    result = run_cli(*base, "--out", str(tmp_path / "b"), *small, "--allow-tokenizer-mismatch")
    assert result.returncode == 0, result.stderr


def test_split_shards_checks_every_entry(prepared):
    paths, counts = split_shards(prepared, "train")
    assert all(os.path.dirname(p) == os.path.realpath(prepared) for p in paths) and sum(counts) > 0
    assert np.fromfile(paths[0], dtype="<u2").size == counts[0]


# ---------------------------------------------------------------- damaged weights, bad sampling flags

def _with_weights(run, tmp_path, change):
    """A copy of the run's newest checkpoint with change(state) applied to its model."""
    state = torch.load(run_checkpoints(run)[-1], weights_only=True)
    change(state["model"])
    path = tmp_path / "changed.pt"
    torch.save(state, path)
    return str(path)


def test_damaged_weights_and_bad_flags_get_one_line(run, prepared, tmp_path):
    nan = _with_weights(run, tmp_path, lambda m: m["norm"].__setitem__(0, float("nan")))
    result = run_cli("sample", "--checkpoint", nan, "--max-new-tokens", "4", "--device", "cpu")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "logits at position 1 are not finite" in result.stderr
    result = run_cli("eval", "--checkpoint", nan, "--data", prepared, "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)  # strict JSON: NaN would not parse here
    assert figures["loss"] is None and figures["ppl"] is None and figures["stories"] > 0
    huge = _with_weights(run, tmp_path, lambda m: m["tok_embeddings.weight"].mul_(1e4))
    result = run_cli("eval", "--checkpoint", huge, "--data", prepared, "--device", "cpu")
    assert result.returncode == 0 and "ppl inf" in result.stdout, result.stderr
    for flags, message in ((["--temperature", "nan"], "temperature must be a finite number >= 0"),
                           (["--max-new-tokens", "-5"], "max_new_tokens must be an integer >= 0; got -5")):
        result = run_cli("sample", "--checkpoint", run, *flags, "--device", "cpu")
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_a_garbage_metrics_file_and_an_out_that_is_a_file(run, prepared, tmp_path):
    """A resumed run whose metrics.jsonl holds garbage finishes (exit 0) with its plot from the
    good lines; --out onto a file, or under one, is one line and nothing is written."""
    out = tmp_path / "r"
    shutil.copytree(run, out)
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b"\x00\xff binary\n[1, 2]\n{\"step\": 1}\n{\"step\": 2, \"loss\": \"abc\"}\n")
    result = run_cli("train", "--data", prepared, "--out", str(out), "--resume", "--device", "cpu",
                     *flags(max_steps=6))
    assert result.returncode == 0, result.stderr
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and metrics(out)[-1]["step"] == 6
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for target in (afile, afile / "sub"):
        result = run_cli("train", "--data", prepared, "--out", str(target), "--device", "cpu", *flags(max_steps=1))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"{afile} is a file, not a folder" in result.stderr
    assert afile.read_text() == "mine"


def test_a_changed_tokenizer_is_refused_before_the_first_step(prepared, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(prepared, data)
    (data / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    result = run_cli("train", "--data", str(data), "--out", str(tmp_path / "r"), "--device", "cpu",
                     *flags(max_steps=2))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "is not the tokenizer" in result.stderr and "sha256 differs" in result.stderr
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("ckpt_*")), "no step was taken"


def test_export_refuses_what_exists_unless_forced(run, tmp_path):
    """An --out that exists (a user's file, another model's Hugging Face folder) is kept, with
    one line; --force replaces it."""
    ckpt = run_checkpoints(run)[-1]
    mine = tmp_path / "notes.bin"
    mine.write_bytes(b"precious")
    result = run_cli("export", "--checkpoint", ckpt, "--format", "llama2c-v0", "--out", str(mine))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--force" in result.stderr, result.stderr
    assert mine.read_bytes() == b"precious"
    other = tmp_path / "other-hf"
    assert run_cli("export", "--checkpoint", ckpt, "--format", "hf", "--out", str(other)).returncode == 0
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    result = run_cli("export", "--checkpoint", ckpt, "--format", "hf", "--out", str(other))
    assert result.returncode == 2 and "a folder that holds files" in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    result = run_cli("export", "--checkpoint", ckpt, "--format", "llama2c-v0", "--out", str(mine), "--force")
    assert result.returncode == 0 and mine.read_bytes() != b"precious", result.stderr


def test_prepare_removes_the_build_a_killed_run_left_and_nothing_else(tmp_path):
    """A prepare killed by SIGKILL leaves its `.NAME.building-XXXX` beside --out; the next one
    removes it (named as its own, its mark inside, its builder gone), and keeps a folder that
    only looks like one."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / ".d.building-abc123"
    left.mkdir()
    (left / ".tinyfuse-build").write_text(f"{dead.pid}\n")
    (left / "train_000.bin").write_bytes(b"\x00" * 8)
    lookalike = tmp_path / ".d.building-mine"
    lookalike.mkdir()
    (lookalike / "notes.txt").write_text("mine")
    result = run_cli("prepare", "--out", str(tmp_path / "d"), "--stories", "300")
    assert result.returncode == 0, result.stderr
    assert not left.exists() and (lookalike / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "d" / ".tinyfuse-build").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.building-mine", "d"]


def test_prepare_never_replaces_a_user_file_its_manifest_names(tmp_path):
    """A manifest is input, not proof of ownership: a user's notes.txt listed in it as a
    shard is not the tool's to replace, with or without --force."""
    out = tmp_path / "d"
    assert run_cli("prepare", "--out", str(out), "--stories", "300").returncode == 0
    (out / "notes.txt").write_text("mine")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"].append({"file": "notes.txt", "split": "train", "tokens": 0, "stories": 0})
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("prepare", "--out", str(out), "--stories", "300")
    assert result.returncode == 2 and "notes.txt" in result.stderr and "--force" in result.stderr, result.stderr
    assert run_cli("prepare", "--out", str(out), "--stories", "300", "--force").returncode == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert "notes.txt" not in (out / "manifest.json").read_text()


def test_verify_train_and_eval_agree_on_damaged_shards(run, prepared, tmp_path):
    """A split whose shards are all empty is refused by --verify and by training alike (an
    empty shard among others is fine for both: the loaders skip it); a val token above the
    vocabulary is one line from eval, as from train and --verify."""
    data = tmp_path / "d"
    shutil.copytree(prepared, data)
    manifest = json.loads((data / "manifest.json").read_text())
    val = next(s for s in manifest["shards"] if s["split"] == "val")
    tokens = np.fromfile(data / val["file"], dtype="<u2")
    original = tokens.copy()
    tokens[3] = manifest["vocab_size"]
    tokens.tofile(data / val["file"])
    result = run_cli("eval", "--checkpoint", run, "--data", str(data), "--device", "cpu")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"holds token {manifest['vocab_size']}, not below the vocabulary size" in result.stderr
    original.tofile(data / val["file"])
    for shard in manifest["shards"]:
        if shard["split"] == "train":
            (data / shard["file"]).write_bytes(b"")
            shard["tokens"] = shard["stories"] = 0
    (data / "manifest.json").write_text(json.dumps(manifest))
    verify = run_cli("prepare", "--verify", str(data))
    assert verify.returncode == 1 and "the train shards hold no tokens" in verify.stderr, verify.stderr
    result = run_cli("train", "--data", str(data), "--out", str(tmp_path / "r"), "--device", "cpu", *flags(max_steps=1))
    assert result.returncode == 2 and "the train split of" in result.stderr and "holds 0 tokens" in result.stderr, \
        result.stderr


@pytest.mark.parametrize("damage", ["truncated", "header length", "no tensor", "int32", "index {}", "index list",
                                    "index null", "deep config", "deep manifest"])
def test_a_damaged_hugging_face_folder_is_one_line(run, prepared, tmp_path, damage):
    """The likely corruption of a Hugging Face folder (a partial download) and hostile
    variants: one line naming the file, never a traceback."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "hf"
    assert run_cli("export", "--checkpoint", run_checkpoints(run)[-1], "--format", "hf", "--out",
                   str(folder)).returncode == 0
    weights = folder / "model.safetensors"
    command = ["sample", "--checkpoint", str(folder), "--max-new-tokens", "2", "--device", "cpu"]
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "header length":
        weights.write_bytes(struct.pack("<Q", 1 << 40) + weights.read_bytes()[8:])
    elif damage in ("no tensor", "int32"):
        tensors = load_file(weights)
        name = sorted(tensors)[0]
        if damage == "no tensor":
            del tensors[name]
        else:
            tensors[name] = tensors[name].to(torch.int32)
        save_file(tensors, weights)
    elif damage.startswith("index"):
        (folder / "model.safetensors.index.json").write_text({"index {}": "{}", "index list": '{"weight_map": []}',
                                                              "index null": "null"}[damage])
    elif damage == "deep config":
        (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        data = tmp_path / "d"
        shutil.copytree(prepared, data)
        (data / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
        command = ["eval", "--checkpoint", run, "--data", str(data), "--device", "cpu"]
    result = run_cli(*command)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_errors_are_one_line_and_bugs_say_so(monkeypatch, capsys):
    """The command line's one place for errors: a project error raised anywhere is one line
    and exit 2; an unexpected exception keeps its traceback and is called a bug (exit 1)."""
    from tinyfuse.engine import cli
    from tinyfuse.engine.shards import DataError

    def raises(error):
        def command(args):
            raise error
        return command

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    sample = next(a for a in parser._actions if a.dest == "command").choices["sample"]
    sample.set_defaults(func=raises(DataError("x.bin: damaged header")))
    assert cli.main(["sample", "--checkpoint", "x"]) == 2
    assert capsys.readouterr().err == "tinyfuse sample: x.bin: damaged header\n"
    sample.set_defaults(func=raises(KeyError("oops")))
    assert cli.main(["sample", "--checkpoint", "x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'oops'" in err and "is a bug in tinyfuse" in err


def test_a_checkpoint_with_a_garbage_tokenizer_is_one_line(run, prepared, tmp_path):
    state = torch.load(run_checkpoints(run)[-1], weights_only=True)
    state["tokenizer"] = b"\x0a\x05garbage bytes, not a sentencepiece model"
    path = tmp_path / "bad-tokenizer.pt"
    torch.save(state, path)
    for command in (["sample", "--max-new-tokens", "2"], ["eval", "--data", prepared]):
        result = run_cli(*command, "--checkpoint", str(path), "--device", "cpu")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"the tokenizer carried by {path}: not a SentencePiece model" in result.stderr
