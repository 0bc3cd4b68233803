"""Benchmark: one training step of each preset — tokens/s, MFU, peak memory and where the
time goes — with kernels="triton" and "torch", eager and under torch.compile, bf16 on CUDA;
beside them Hugging Face models of the same sizes (SDPA attention, tied embeddings), plain,
patched with tinyfuse.kernels.patch_transformers, and patched with Liger-Kernel's
apply_liger_kernel_to_* when liger_kernel imports: LlamaForCausalLM (rows hf*), a
Gemma-style model (Gemma 3 text: (1 + weight) norms with post-norms and q/k norms, GeGLU,
Gemma 2's final logit soft cap of 30; rows hf-gemma3*) and a Phi-3 (fused qkv and gate_up
projections; rows hf-phi3*).

    python -m tinyfuse.bench.step [--smoke] [--presets stories15M ...] [--json FILE]

The tinyfuse rows time the trainer's own step (Trainer.train_step: the C++ TokenLoader
copying into the static batch, forward with the fused loss, backward, clipping inside the
fused AdamW, the bf16 working copies; on CUDA captured as one CUDA graph, and one row
without the graph to show what it buys), with the trainer's attention choice. The Hugging
Face rows run the usual loop on the same loader (random tokens of the preset's
vocabulary, 16,384 tokens a step: stories260K 32 x 512, stories15M 64 x 256, stories42M
and stories110M 16 x 1024): forward with the loader's targets as shift_labels (so both
predict the same tokens), backward, clip_grad_norm_, fused AdamW. Tokens/s comes from the
median of whole steps, each timed end to end (one synchronisation per step); the
breakdown (data, forward, backward, optimizer; medians) from separate eager steps
synchronised between phases (for tinyfuse the trainer's own step, Trainer.train_step(mark),
which runs the graph's work eagerly: every micro-batch, the optimizer as the trainer runs it).
MFU is the engine's: tokens/s x model.flops_per_token(T) (PaLM's 6N + 12 L H Q T, the same
count for the Hugging Face rows) over the device's dense bf16 peak.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from tinyfuse.engine.loader import TokenLoader
from tinyfuse.engine.model import PRESETS, Transformer, preset
from tinyfuse.engine.runtime import autocast, device_peak_tflops, keep_checkout_off_path, mfu
from tinyfuse.engine.run_spec import resolve_run
from tinyfuse.engine.train import PHASES, TrainConfig, Trainer

from .kernels import STEP_TOKENS
from .loader import make_corpus
from .timing import error_text, synchronize


def _now(device):
    synchronize(device)
    return time.perf_counter()


# The Hugging Face models of the step rows, by their rows' `model`: (their rows' name
# prefix, config class, model class, fields beside the preset's sizes, Liger's patch).
HF_MODELS = {
    "transformers": ("hf", "LlamaConfig", "LlamaForCausalLM", lambda cfg: {}, "apply_liger_kernel_to_llama"),
    # Gemma scales its scores by query_pre_attn_scalar**-0.5, the head size in its releases
    "transformers-gemma3": ("hf-gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
                            lambda cfg: {"hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": 30.0,
                                         "query_pre_attn_scalar": cfg.head_dim},
                            "apply_liger_kernel_to_gemma3_text"),
    "transformers-phi3": ("hf-phi3", "Phi3Config", "Phi3ForCausalLM", lambda cfg: {"pad_token_id": None},
                          "apply_liger_kernel_to_phi3"),
}
# The step rows by the names `tinyfuse bench --step-rows` takes: (model, kernels, graph);
# each name with "+compile" is the same row under torch.compile. graph None is the
# trainer's default (a CUDA graph on CUDA); "tinyfuse-nograph" is the eager step beside it.
ROWS = {"tinyfuse": ("tinyfuse", "triton", None), "tinyfuse-nograph": ("tinyfuse", "triton", False),
        "tinyfuse-torch": ("tinyfuse", "torch", None),
        **{spec[0] + suffix: (model, patch, None) for model, spec in HF_MODELS.items()
           for suffix, patch in (("", "plain"), ("-tinyfuse", "tinyfuse"), ("-liger", "liger"))}}
ROW_NAMES = tuple(name + suffix for name in ROWS for suffix in ("", "+compile") if name != "tinyfuse-nograph"
                  or not suffix)


def row_spec(name):
    """(model, kernels, compile, graph) of a row name."""
    base, compiled = name.removesuffix("+compile"), name.endswith("+compile")
    if name not in ROW_NAMES:
        raise ValueError(f"unknown step row {name!r}; rows: {', '.join(ROW_NAMES)}")
    model, kernels, graph = ROWS[base]
    return model, kernels, compiled, graph


def row_name(model, kernels, compile, graph):
    base = next(n for n, spec in ROWS.items() if spec == (model, kernels, graph))
    return base + ("+compile" if compile else "")


def hf_model(cfg, patch, model="transformers"):
    """The Hugging Face model `model` (a key of HF_MODELS) with the preset's sizes; patch:
    "plain", "tinyfuse" or "liger"."""
    import transformers

    from tinyfuse.engine.hf_checkpoint import config as hf_config

    _, config_class, model_class, extra, liger_patch = HF_MODELS[model]
    # the preset's sizes, without the Llama config's own identity and activation
    fields = {key: value for key, value in hf_config(cfg).items()
              if key not in ("architectures", "model_type", "hidden_act")}
    built = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields, **extra(cfg),
                                                                                   attn_implementation="sdpa"))
    if patch == "tinyfuse":
        from tinyfuse.kernels import patch_transformers

        patch_transformers(built)
    elif patch == "liger":
        import liger_kernel.transformers

        getattr(liger_kernel.transformers, liger_patch)(model=built)
    elif patch != "plain":
        raise ValueError(f"patch must be plain, tinyfuse or liger; got {patch!r}")
    return built


class _PhaseClock:
    """mark(phase) as each phase ends: the synchronised time since the previous mark goes to
    that phase, summed within the step (forward and backward once per micro-batch)."""

    def __init__(self, device):
        self.device, self.spent, self.last = device, dict.fromkeys(PHASES, 0.0), _now(device)

    def __call__(self, phase):
        now = _now(self.device)
        self.spent[phase] += now - self.last
        self.last = now

    def record(self, times):
        for phase, seconds in self.spent.items():
            times[phase].append(seconds * 1e3)


def _tinyfuse_step(name, kernels, compile, graph, device, batch, seq_len, corpus_dir, run_dir):
    """(trainer, step(times=None)): the trainer's step; with times, the same step timed phase
    by phase (Trainer.train_step's marks: every micro-batch, the optimizer as the trainer runs it)."""
    trainer = Trainer(resolve_run(TrainConfig(preset=name, data=corpus_dir, out=run_dir, batch_size=batch,
                                              seq_len=seq_len, device=device, kernels=kernels, compile=compile,
                                              cuda_graph=graph, lr=1e-4, warmup_steps=0, max_steps=1 << 30,
                                              sample_tokens=0)), quiet=True)

    def step(times=None):
        if times is None:
            return trainer.train_step()
        clock = _PhaseClock(device)
        trainer.train_step(mark=clock)
        clock.record(times)
    return trainer, step


def _hf_step(cfg, model_kind, patch, compile, device, batch, seq_len, corpus_dir, loss_sum):
    """(loader, step(times=None)): the usual loop around the Hugging Face model; each step's
    loss is added to loss_sum on the device."""
    cuda = torch.device(device).type == "cuda"
    model = hf_model(cfg, patch, model_kind).to(device).train()

    def loss_of(x, y):
        return model(input_ids=x, labels=y, shift_labels=y).loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(loss_of, backend="inductor" if cuda else "aot_eager") if compile else loss_of
    loader = TokenLoader(corpus_dir, "train", batch, seq_len, seed=0, device=device if cuda else None)

    def step(times=None):
        clock = _PhaseClock(device) if times is not None else (lambda phase: None)
        x, y = next(loader)
        x, y = x.to(device), y.to(device)
        clock("data")
        with autocast(device):
            loss = forward(x, y)
        clock("forward")
        loss.backward()
        loss_sum.add_(loss.detach().float())
        clock("backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock("optimizer")
        if times is not None:
            clock.record(times)
    return loader, step


def measure_step(name, model_kind, kernels, compile, device, smoke, corpus_dir, graph=None, repeats=None):
    """One row: graph (tinyfuse only) None is the trainer's default (a CUDA graph on CUDA);
    the row records whether the step really ran as a graph (and why not), the attention
    backend and the mean loss of the steps run (repeats: the timed steps, default 20)."""
    cuda = torch.device(device).type == "cuda"
    cfg = preset(name)
    seq_len = 16 if smoke else cfg.max_seq_len
    batch = 1 if smoke else STEP_TOKENS // seq_len
    torch.manual_seed(0)
    with torch.device("meta"):
        flops_per_token = Transformer(cfg).flops_per_token(seq_len)
    facts = {}
    with tempfile.TemporaryDirectory() as run_dir:
        if model_kind == "tinyfuse":
            owner, step = _tinyfuse_step(name, kernels, compile, graph, device, batch, seq_len, corpus_dir, run_dir)
            loss_sum, facts["attention"] = owner.loss_sum, owner.spec.attention
        else:
            loss_sum = torch.zeros((), device=device)
            owner, step = _hf_step(cfg, model_kind, kernels, compile, device, batch, seq_len, corpus_dir, loss_sum)
            facts["attention"] = "sdpa"
        # a CUDA graph: three warm-up steps, then the capture, in the warm-up
        warmup, timed, instrumented = (2, 1, 1) if smoke else (6, repeats or 20, 10)
        try:
            for _ in range(warmup):
                step()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            step_ms = []
            for _ in range(timed):
                start = _now(device)
                step()
                step_ms.append((_now(device) - start) * 1e3)
            times = {key: [] for key in PHASES}
            for _ in range(instrumented):
                step(times)
            # what happened, not what was asked: the capture can fail (the trainer then runs eagerly)
            graphed = model_kind == "tinyfuse" and owner.graph is not None
            if model_kind == "tinyfuse" and owner.graph_error:
                facts["graph_error"] = owner.graph_error
            facts["loss"] = loss_sum.item() / (warmup + timed + instrumented)
        finally:
            owner.close()
    median = statistics.median(step_ms)
    quartiles = statistics.quantiles(step_ms, n=4) if len(step_ms) > 1 else [median] * 3
    tokens_per_s = batch * seq_len / (median / 1e3)
    peak = device_peak_tflops(torch.cuda.get_device_name(device)) if cuda else None
    return {"preset": name, "row": row_name(model_kind, kernels, compile, graph), "model": model_kind,
            "kernels": kernels, "compile": compile, "cuda_graph": graphed, **facts, "batch_size": batch, "seq_len": seq_len,
            "step_ms": median, "noise": (quartiles[2] - quartiles[0]) / median, "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, flops_per_token, peak * 1e12 if peak else None),
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
            "breakdown": {key: statistics.median(v) for key, v in times.items()}}


def default_rows(cuda=False):
    """Every row name: each model's kernel choices, eager and compiled (tinyfuse with its
    default: a CUDA graph on CUDA), plus on CUDA tinyfuse triton eager without the graph;
    the Liger rows only where liger_kernel imports and runs (CUDA; the suite notes its
    absence)."""
    from .kernels import liger

    names = [n for n in ROW_NAMES if n != "tinyfuse-nograph" or cuda]
    return [n for n in names if row_spec(n)[1] != "liger" or liger()]


def missing_dependency(model_kind, kernels):
    """Why a row cannot run here (an optional package is absent), or None."""
    if model_kind in HF_MODELS:
        try:
            import transformers  # noqa: F401
        except ImportError:
            return "transformers is not installed (pip install -e \".[test]\")"
    if kernels == "liger":
        from .kernels import liger

        if liger() is None:
            return "Liger-Kernel is not installed or has no CUDA device"
    return None


def run(device, smoke=False, presets=None, rows=None, progress=print, repeats=None, log=None):
    """Rows for every preset and step row (names of ROW_NAMES; default: default_rows()).
    log: a report.RowLog that takes each row as it is measured and says when the run's
    time budget is spent (rows not started then are recorded as skipped)."""
    presets = presets or (["stories260K"] if smoke else list(PRESETS))
    cuda = torch.device(device).type == "cuda"
    names = rows or default_rows(cuda)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in presets:
            corpus = None
            for row in names:
                model_kind, kernels, compile, graph = row_spec(row)
                head = {"preset": name, "row": row, "model": model_kind, "kernels": kernels, "compile": compile,
                        "cuda_graph": graph, "tokens_per_s": None}
                why = missing_dependency(model_kind, kernels)
                if why is None and log is not None and log.expired():
                    why = log.SPENT
                if why is not None:
                    result = {**head, "skipped": why}
                else:
                    progress(f"step: {name} {row}")
                    if corpus is None:
                        corpus = make_corpus(os.path.join(tmp, name), tokens=1 << (16 if smoke else 24),
                                             vocab=preset(name).vocab_size, val_tokens=1 << 14)
                    try:
                        result = measure_step(name, model_kind, kernels, compile, device, smoke, corpus, graph,
                                              repeats)
                    except Exception as e:  # out of memory, a compile failure: recorded, the run goes on
                        result = {**head, "error": error_text(e)}
                    torch._dynamo.reset()
                    if cuda:
                        torch.cuda.empty_cache()
                out.append(result)
                if log is not None:
                    log.add("step", result)
    return out


def main(argv=None):
    keep_checkout_off_path()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS))
    parser.add_argument("--rows", nargs="+", choices=ROW_NAMES, help="the step rows (default: all)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run(device, args.smoke, args.presets, args.rows, progress=lambda m: print(m, file=sys.stderr))
    from .report import step_table

    print(step_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
