"""The installed package: public names, the CLI, and the CPU error outside the interpreter."""
import os
import subprocess
import sys

import pytest


def test_public_api_names():
    import tinyfuse.kernels as kernels
    from tinyfuse.kernels import RMSNorm, SwiGLU, add_rms_norm, patch_transformers, reference, rope_qkv  # noqa: F401

    # every op has its plain-PyTorch twin
    for name in ("rms_norm", "add_rms_norm", "rope", "rope_qkv", "swiglu", "cross_entropy", "linear_cross_entropy"):
        assert callable(getattr(kernels, name)) and callable(getattr(reference, name)), name


def test_cpu_tensor_without_interpreter_points_to_reference():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch\n"
        "from tinyfuse.kernels import rms_norm\n"
        "try:\n"
        "    rms_norm(torch.randn(2, 8), torch.ones(8))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "x: tinyfuse's Triton kernels need CUDA tensors" in out
    assert "tinyfuse.kernels.reference" in out and "TRITON_INTERPRET=1" in out


@pytest.mark.parametrize("command", [["tinyfuse"], [sys.executable, "-m", "tinyfuse.engine"]])
def test_cli_entry_points(command):
    out = subprocess.run(command + ["--help"], capture_output=True, text=True, check=True).stdout
    for command_name in ("train", "prepare", "sample", "eval", "export", "bench"):
        assert command_name in out


def test_ci_runs_the_readme_test_command():
    root = os.path.join(os.path.dirname(__file__), "..")
    readme = open(os.path.join(root, "README.md")).read()
    blocks = readme.split("```\n")
    commands = [b.strip() for b in blocks[1::2] if b.strip().startswith("pip install")]
    assert len(commands) == 2, "the README keeps exactly two set-up commands"
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in open(os.path.join(root, ".ci", "run")).read()


def test_train_help_shows_what_a_run_without_flags_uses():
    """The model flags' defaults are the default preset's (stories260K), not ModelConfig's;
    the vocabulary is the data's."""
    from tinyfuse.engine.cli import build_parser
    from tinyfuse.engine.model import preset

    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    helps = {a.option_strings[0]: a.help for a in train._actions if a.option_strings}
    shape = preset("stories260K")
    for flag, value in (("--dim", shape.dim), ("--n-layers", shape.n_layers), ("--max-seq-len", shape.max_seq_len),
                        ("--n-kv-heads", shape.n_kv_heads), ("--hidden-dim", shape.hidden_dim)):
        assert helps[flag].endswith(f"(default: stories260K's: {value})"), (flag, helps[flag])
    assert helps["--vocab-size"] == "vocabulary size; default: the data's"
    assert helps["--batch-size"].endswith("(default: 8)")


ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _modules(folder):
    import ast

    for name in sorted(os.listdir(os.path.join(ROOT, folder))):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, folder, name), encoding="utf-8") as f:
                yield name[:-3], ast.parse(f.read())


def test_no_function_outside_a_triton_kernel_is_longer_than_80_lines():
    """A function the next engineer can read in one screen: the kernels' own bodies aside."""
    import ast

    long = []
    for folder in ("kernels", "engine", "bench"):
        for module, tree in _modules(folder):
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    jit = any("jit" in ast.unparse(d) for d in node.decorator_list)
                    if not jit and node.end_lineno - node.lineno + 1 > 80:
                        long.append(f"{folder}/{module}.py:{node.lineno} {node.name} "
                                    f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


@pytest.mark.parametrize("folder", ["bench", "engine", "kernels"])
def test_no_import_cycle_between_a_packages_modules(folder):
    """Imports inside a package go one way, the ones inside functions counted too."""
    import ast

    graph = {}
    for module, tree in _modules(folder):
        edges = graph.setdefault(module, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                edges.update([node.module] if node.module else [a.name for a in node.names])
    graph = {m: {e.split(".")[0] for e in edges if e.split(".")[0] in graph and e.split(".")[0] != m}
             for m, edges in graph.items()}

    def cycle_from(start, path):
        for nxt in graph[start]:
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            found = cycle_from(nxt, path + [nxt])
            if found:
                return found
        return None
    cycles = [c for m in graph if (c := cycle_from(m, [m]))]
    assert not cycles, cycles[0]
