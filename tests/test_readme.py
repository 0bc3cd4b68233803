"""Every command the README shows is run here, in order, as written, in one folder, so none
can drift. Flags appended to a command only make it small (argparse keeps the last value
of a flag): tiny model shapes, a few steps, a few stories. The two set-up commands are
checked against .ci/run by test_package.py."""
import json
import os
import re
import shlex
import subprocess

import pytest
from helpers import local_hub

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ["--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "2", "--batch-size", "2", "--seq-len",
        "16", "--max-steps", "2", "--eval-batches", "1", "--sample-tokens", "0", "--device", "cpu"]

# README command -> (flags appended, {text: replacement}); in the README's order.
COMMANDS = {
    "tinyfuse prepare --out data/synthetic": (["--stories", "300"], {}),
    "tinyfuse prepare --source stories.txt --tokenizer tok512.model --out data/mine": (["--stories", "300"], {}),
    "tinyfuse prepare --source tinystories --tinystories-format v2 --vocab-size 4096 --out data/ts":
        (["--vocab-size", "512", "--stories", "400"], {}),
    "tinyfuse prepare --verify data/ts": ([], {}),
    "tinyfuse train": (["--max-steps", "2", "--sample-tokens", "20", "--out", "runs/main"], {}),
    "tinyfuse train --preset stories15M --data data/ts --batch-size 64 --max-steps 20000 --out runs/15m": (TINY, {}),
    "tinyfuse train --config run.toml --lr 1e-3": (["--device", "cpu"], {}),
    "tinyfuse train --out runs/15m --resume": (["--max-steps", "4"], {}),
    'tinyfuse sample --checkpoint runs/15m --prompt "Once upon a time" --temperature 0.8':
        (["--max-new-tokens", "8"], {}),
    "tinyfuse train --preset stories110M --data data/ts --batch-size 16 --compile --out runs/110m": (TINY, {}),
    "torchrun --standalone --nproc-per-node 8 -m tinyfuse.engine train --data data/ts --grad-accum 8 --out runs/ddp":
        (TINY, {"--nproc-per-node 8": "--nproc-per-node 2", "--grad-accum 8": "--grad-accum 2"}),
    "tinyfuse sample --checkpoint stories260K.bin --tokenizer tok512.model --temperature 0":
        (["--max-new-tokens", "16"], {}),
    "tinyfuse eval --checkpoint stories260K.bin --tokenizer tok512.model --data tinystories_val_1k.txt --json":
        (["--max-stories", "20"], {}),
    "tinyfuse train --init-from stories260K.bin --data data/mine --lr 5e-4 --out runs/ft":
        (["--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--sample-tokens", "0"],
         {}),
    "tinyfuse export --checkpoint runs/ft --format llama2c-v0 --out ft.bin": ([], {}),
    "tinyfuse export --checkpoint runs/ft --format hf --out ft-hf": ([], {}),
    "tinyfuse check": (["--dtypes", "fp32", "--device", "cpu"], {}),
    "tinyfuse check --ops rms_norm --dtypes bf16 --shapes 16384,4096 --seed 1": (["--device", "cpu"],
                                                                                 {"16384,4096": "64,4096"}),
    "tinyfuse check --ops rms_norm --against mykernels:rms_norm": (["--device", "cpu"], {}),
    "tinyfuse bench --out bench/results/h100": (["--smoke", "--only", "loader"], {}),
    "tinyfuse bench --presets stories15M --no-sweep --step-rows tinyfuse hf --repeats 20 --budget 300":
        (["--smoke", "--only", "loader"], {}),
    "tinyfuse bench --only kernels --ops rope swiglu": (["--smoke"], {}),
    "tinyfuse bench --smoke": (["--only", "loader"], {}),
    "tinyfuse bench compare bench/results/h100/results.json bench-results/results.json": ([], {}),
    "python -m tinyfuse.bench.rms_norm": (["--smoke"], {}),
    "tinyfuse bench --static --arch 90,80": (["--ops", "swiglu"], {}),
}

RUN_TOML = """preset = "stories15M"
data = "data/ts"
out = "runs/toml"
batch_size = 2
seq_len = 16
max_steps = 2
eval_batches = 1
sample_tokens = 0

[model]
dim = 32
n_layers = 1
n_heads = 2
n_kv_heads = 2
"""

MYKERNELS = """import torch


def rms_norm(x, weight, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
"""


def readme_commands():
    """The command lines of the README's plain code blocks, comments and continuations
    resolved, the two set-up commands left out."""
    blocks, fence = [], None  # fence: the language of the open block ("" for a plain one)
    for line in open(os.path.join(ROOT, "README.md")):
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            if fence == "":
                blocks.append("")
        elif fence == "":
            blocks[-1] += line
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith(("pip install", "#")):
                commands.append(" ".join(line.split()))
    return commands


def test_every_readme_command_has_its_run_here():
    assert readme_commands() == list(COMMANDS), "README commands and this table differ: add the new command here"


def test_readme_commands_run(tmp_path, shared_data):
    for name in ("stories260K.bin", "tok512.model", "tinystories_val_1k.txt"):
        os.symlink(os.path.join(shared_data, name), tmp_path / name)
    os.symlink(os.path.join(shared_data, "tinystories_val_1k.txt"), tmp_path / "stories.txt")
    (tmp_path / "run.toml").write_text(RUN_TOML)
    (tmp_path / "mykernels.py").write_text(MYKERNELS)
    stories = open(os.path.join(shared_data, "tinystories_val_1k.txt"), encoding="utf-8").read()
    with local_hub() as (server, url):
        server.files["TinyStoriesV2-GPT4-train.txt"] = stories.encode()
        server.files["TinyStoriesV2-GPT4-valid.txt"] = "\n<|endoftext|>\n".join(stories.split("\n\n")[:50]).encode()
        env = {**os.environ, "TINYFUSE_HUB_URL": url, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
        outputs = {}
        for command, (extra, replace) in COMMANDS.items():
            for old, new in replace.items():
                command = command.replace(old, new)
            result = subprocess.run(shlex.split(command) + extra, cwd=tmp_path, env=env, capture_output=True, text=True,
                                    timeout=600)
            assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
            outputs[command] = result.stdout
    assert "a story from the trained model" in outputs["tinyfuse train"]
    assert (tmp_path / "cache" / "tinyfuse" / "synthetic-512" / "manifest.json").is_file()
    assert [json.loads(line)["step"] for line in open(tmp_path / "runs/15m/metrics.jsonl")] == [2, 4]
    assert outputs['tinyfuse sample --checkpoint runs/15m --prompt "Once upon a time" --temperature 0.8'].startswith(
        "Once upon a time")
    result = json.loads(outputs["tinyfuse eval --checkpoint stories260K.bin --tokenizer tok512.model --data "
                                "tinystories_val_1k.txt --json"])
    assert result["stories"] == 20 and 0.5 < result["loss"] < 3
    assert "2 of 2 cases passed" in outputs["tinyfuse check --ops rms_norm --dtypes bf16 --shapes 64,4096 --seed 1"]
    assert "6 cases of mykernels:rms_norm" in outputs["tinyfuse check --ops rms_norm --against mykernels:rms_norm"]
    assert (tmp_path / "ft.bin").stat().st_size > 0 and (tmp_path / "ft-hf" / "config.json").is_file()
    assert oct((tmp_path / "ft-hf" / "model.safetensors").stat().st_mode & 0o777) == \
        oct((tmp_path / "ft-hf" / "config.json").stat().st_mode & 0o777)
    assert (tmp_path / "runs/ddp/metrics.jsonl").is_file() and (tmp_path / "runs/toml/ckpt_000002.pt").is_file()
    static = json.loads((tmp_path / "bench-results" / "static.json").read_text())
    assert static["arch"] == [90, 80] and {r["arch"] for r in static["kernels"]} == {90, 80}


@pytest.mark.parametrize("command", ["train", "sample", "eval", "export", "prepare", "bench", "check"])
def test_every_flag_has_help(command):
    from tinyfuse.engine.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    missing = [a.option_strings[0] for a in sub._actions if a.option_strings and not a.help]
    assert not missing, f"tinyfuse {command}: flags without help: {missing}"
