"""The trainer behind `tinyfuse train`: AdamW, warm-up + cosine, gradient accumulation and
clipping, bf16 autocast on CUDA, checkpoints that resume exactly, DDP through torchrun.

A run folder holds `ckpt_NNNNNN.pt` (the last `keep_checkpoints`), `metrics.jsonl` (one JSON
object per log line) and `loss.png`.
"""
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import NATIVE_KIND, checkpoint_path, load_training_state, run_checkpoints, save_checkpoint
from .files import FolderLock
from .loader import TokenLoader
from .model import ATTENTION, PRESETS, ModelConfig, Transformer
from .progress import Progress
from .run_spec import RunSpec
from .runtime import autocast, compute_dtype, mfu
from .settings import field_choices, setting, settings_from_dict
from .shards import tokenizer_path


@dataclass
class TrainConfig:
    """Every training setting; `tinyfuse train --help` is generated from these fields
    (the help text, default and choices of each flag come from its `setting`)."""
    preset: str = setting("stories260K", "the model's shape", choices=tuple(PRESETS))
    model: dict = field(default_factory=dict)  # overrides of the preset's ModelConfig (flags or a [model] table)
    data: str | None = setting(None, "a prepared folder (tinyfuse prepare); default: the built-in synthetic "
                                     "corpus, prepared once")
    out: str | None = setting(None, "the run folder; default: runs/<preset>-<date>")
    init_from: str | None = setting(None, "start from these weights (any --checkpoint format); the model's shape "
                                          "comes from them")
    allow_tokenizer_mismatch: bool = setting(False, "with --init-from: train even when the checkpoint's tokenizer "
                                                    "differs from the data's")
    batch_size: int = setting(8, "sequences per micro-batch, per rank")
    seq_len: int | None = setting(None, "tokens per sequence; default: the model's max_seq_len")
    grad_accum: int = setting(1, "micro-batches per optimizer step, over all ranks")
    max_steps: int = setting(400, "optimizer steps")
    lr: float = setting(6e-3, "peak learning rate (after warm-up)")
    min_lr: float | None = setting(None, "learning rate at the end of the cosine decay; default: lr / 10")
    warmup_steps: int = setting(20, "steps of linear warm-up")
    weight_decay: float = setting(0.1, "AdamW weight decay (matrices only)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: no clipping)")
    eval_every: int = setting(100, "steps between validation losses")
    eval_batches: int = setting(10, "batches per validation loss")
    log_every: int = setting(10, "steps between log lines (metrics.jsonl)")
    ckpt_every: int = setting(100, "steps between checkpoints")
    keep_checkpoints: int = setting(3, "checkpoints kept in the run folder")
    max_bad_steps: int = setting(5, "stop after this many non-finite steps in a row")
    seed: int = setting(0, "seed of the initialisation, the data order and the sample")
    device: str | None = setting(None, "cpu, cuda or cuda:N; default: cuda when present")
    kernels: str | None = setting(None, "fused Triton kernels or the plain-PyTorch ops; default: triton on CUDA, "
                                        "torch elsewhere", choices=("triton", "torch"))
    attention: str = setting("auto", "attention: the SDPA backend measured fastest for this shape on this GPU "
                                     "(auto; SDPA's own choice elsewhere), SDPA's own choice (sdpa), one SDPA "
                                     "backend, or the flash-attn package", choices=("auto", *ATTENTION))
    compile: bool = setting(False, "torch.compile the model")
    cuda_graph: bool | None = setting(None, "capture the whole optimizer step as one CUDA graph and replay it; "
                                            "default: on where it works (CUDA, one process)")
    threads: int | None = setting(None, "CPU threads for the math on CPU; default: every core")
    peak_tflops: float | None = setting(None, "the device's dense bf16 peak for MFU, when the table lacks it")
    sample_tokens: int = setting(200, "tokens of the story printed when training ends (0: none)")

    @property
    def final_lr(self):
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def validate(self):
        positive = ("batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "eval_batches",
                    "ckpt_every", "keep_checkpoints", "max_bad_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        for name in ("seq_len", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        for name in ("lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "peak_tflops"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number; got {value!r}")
        if not self.lr > 0 or not 0 <= self.final_lr <= self.lr:
            raise ValueError(f"lr must be positive and min_lr in [0, lr]; got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps, weight_decay and grad_clip must not be negative")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1); got {self.beta1}, {self.beta2}")
        settings_from_dict(ModelConfig, self.model, "model")  # names and types; the shape is checked once built
        for name in ("preset", "kernels", "attention"):
            allowed = field_choices(type(self), name)
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.init_from and self.model:
            raise ValueError(f"the model's shape comes from --init-from {self.init_from}; drop the model settings "
                             f"({', '.join(sorted(self.model))})")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be positive; got {self.peak_tflops}")
        return self

    @classmethod
    def from_dict(cls, values):
        return settings_from_dict(cls, values, "training")


GRAPH_WARMUP = 3  # eager steps before the capture: lazy state, autotuning and compilation happen there
# A step's phases, in order (forward and backward once per micro-batch), as train_step(mark) names them.
PHASES = ("data", "forward", "backward", "optimizer")


def _no_mark(phase):
    pass


def lr_at(step, cfg):
    """Linear warm-up to lr, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * progress))


class Interrupted(Exception):
    pass


def _rng_state():
    """Every RNG's state as tensors and numbers (a checkpoint holds nothing else)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def format_rate(tokens_per_s):
    """One format for every tokens/s a log line shows: 867, 2,070, 1.42M."""
    return f"{tokens_per_s / 1e6:.2f}M" if tokens_per_s >= 1e6 else f"{tokens_per_s:,.0f}"


class Trainer:
    def __init__(self, spec: RunSpec, quiet=False):
        """A run of `spec` (resolve_run(TrainConfig)): the model on its device with its
        optimizer and wrappers, the loaders, the step's device tensors, and the run folder
        held (a second run into it is refused)."""
        cfg = self.cfg = spec.config
        self.spec, self.quiet = spec, quiet
        self.device, self.master, self.model_cfg = spec.device, spec.master, spec.model
        for note in spec.notes:
            self._print(note)
        if self.device.type == "cpu" and cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = Transformer(spec.model, kernels=spec.kernels, attention=spec.attention).to(self.device)
        if spec.init_state is not None:  # its shapes were checked against its config by load_checkpoint
            self.model.load_state_dict(spec.init_state)
        # The learning rate lives on the device and is rewritten in place each step (lr_at on
        # the host, one fill): a CUDA graph replays the step with the new value, and the
        # optimizer reads it without a host round trip. capturable keeps its step counts
        # on the device too.
        self.lr = torch.tensor(lr_at(0, cfg), device=self.device)
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in self.model.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
             {"params": [p for p in self.model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
            lr=self.lr, betas=(cfg.beta1, cfg.beta2), fused=True,  # one multi-tensor kernel per step, CUDA and CPU
            capturable=self.device.type == "cuda",
        )
        self.train_model = self._wrapped_model()
        self.autocast = autocast(self.device)
        if compute_dtype(self.device) != torch.float32:
            self.use_compute_dtype(compute_dtype(self.device))
        self.graph, self.use_graph, self._graph_steps = None, self._graph_wanted(), 0
        self.graph_error = None  # why the capture failed, when it did
        self._open_loaders()
        self.step = 0
        # What a step reads and writes lives in these tensors, updated in place, so that one
        # captured CUDA graph can replay the step: the micro-batches (the loader copies
        # into them), the sum of the losses since the last log line, the last gradient
        # norm, and the counters of non-finite steps in a row and in all; the host reads
        # them on logging steps only.
        self.batches = torch.empty(spec.micro_steps, 2, cfg.batch_size, spec.seq_len, dtype=torch.int64,
                                   device=self.device)
        self.loss_sum = torch.zeros((), device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)
        self.bad_run = torch.zeros((), dtype=torch.int64, device=self.device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self.flops_per_token = self.model.flops_per_token(spec.seq_len)
        self.out = cfg.out
        self._stop_signal = None
        try:
            self._lock = FolderLock(self.out) if self.master and self.out else None
        except Exception:
            self.train_loader.close()
            self.val_loader.close()
            raise

    def _wrapped_model(self):
        """What the step calls: the model, under DDP and torch.compile when asked for."""
        model = self.model
        if self.spec.ddp:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(self.model,
                                            device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            # The RoPE tables are built on first use; built inside the first compiled call
            # they would make the second one recompile (a guard on the cached tables).
            self.model.rope_tables(self.device, self.spec.seq_len)
            model = torch.compile(model)
        return model

    def _open_loaders(self):
        spec, cfg = self.spec, self.cfg
        loader_device = self.device if self.device.type == "cuda" else None
        self.train_loader = TokenLoader(cfg.data, "train", cfg.batch_size, spec.seq_len, seed=cfg.seed,
                                        rank=spec.rank, world_size=spec.world, device=loader_device)
        # Every rank reads the same val batches and evaluates its share of them, so the val
        # loss is the same whatever the number of ranks.
        self.val_loader = TokenLoader(cfg.data, "val", cfg.batch_size, spec.seq_len, shuffle=False,
                                      device=loader_device)

    # ------------------------------------------------------------ checkpoints

    def state_dict(self):
        """The native checkpoint: tensors and plain data only (see engine.checkpoint)."""
        return {
            "kind": NATIVE_KIND,
            "model": self.model.state_dict(),
            "model_config": self.model_cfg.to_dict(),
            "train_config": asdict(self.cfg),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.train_loader.state_dict(),
            "rng": _rng_state(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "bad_run": int(self.bad_run),
            "tokenizer": self._tokenizer_bytes(),
        }

    def _tokenizer_bytes(self):
        path = tokenizer_path(self.cfg.data, self.spec.manifest)
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
        return None

    def save(self):
        """Write ckpt_<step>.pt and keep the newest keep_checkpoints (by step number)."""
        if not self.master:
            return None
        path = checkpoint_path(self.out, self.step)
        save_checkpoint(self.state_dict(), path)
        for old in run_checkpoints(self.out)[:-self.cfg.keep_checkpoints]:
            os.remove(old)
        return path

    def resume(self, loaded=None):
        """Continue from the newest intact checkpoint of the run folder; `loaded` is
        load_training_state(out) when the caller has already read it."""
        state, skipped = loaded or load_training_state(self.out)
        for path, why in skipped:
            self._print(f"skipped {path}: {why}")
        saved = ModelConfig.from_dict(state["model_config"])
        if saved != self.model_cfg:
            diff = [f"{k} {getattr(saved, k)} vs {getattr(self.model_cfg, k)}"
                    for k in saved.to_dict() if getattr(saved, k) != getattr(self.model_cfg, k)]
            raise ValueError(f"the checkpoints in {self.out} are for another model shape (checkpoint vs this run: "
                             f"{', '.join(diff)})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the saved groups carry their own lr and flags
            group.update(lr=self.lr, capturable=self.device.type == "cuda", fused=True)
        self.train_loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        self.step = state["step"]
        self.skipped.fill_(state["skipped_steps"])
        self.bad_run.fill_(state.get("bad_run", 0))
        self._trim_metrics()
        self._print(f"resumed from {checkpoint_path(self.out, self.step)} at step {self.step}")

    def _trim_metrics(self):
        """Drop log lines a crashed run wrote after its last checkpoint, a last line torn by
        a crash or a full disk, and any line that is not a well-formed record."""
        path = os.path.join(self.out, "metrics.jsonl")
        if not self.master or not os.path.exists(path):
            return
        kept = [json.dumps(r) + "\n" for r in _metric_records(path) if r["step"] <= self.step]
        with open(path, "w") as f:
            f.writelines(kept)

    # ------------------------------------------------------------ steps

    def _print(self, message):
        if self.master and not self.quiet:
            print(message, flush=True)

    @property
    def skipped_steps(self):
        """Steps skipped for a non-finite loss or gradient norm (reads the device counter)."""
        return int(self.skipped)

    def use_compute_dtype(self, dtype):
        """Autocast to `dtype` and keep `dtype` working copies of the matrices (see
        Transformer.keep_working_copies): what the trainer does on a GPU (bf16); the static
        account runs the CPU this way to count a GPU step's work."""
        self.autocast = torch.autocast(self.device.type, dtype=dtype)
        self.model.keep_working_copies(dtype)

    def _graph_wanted(self):
        """Whether the step is captured as a CUDA graph; a line says why not when it was asked for
        or would be the default."""
        wanted = self.cfg.cuda_graph
        if wanted is False:
            return False
        if self.device.type != "cuda":
            if wanted:
                self._print("note: --cuda-graph needs a CUDA device; the step runs without one")
            return False
        if self.spec.ddp:
            self._print("note: no CUDA graph under DDP (its gradient buckets are reduced from the host); "
                        "the step runs without one")
            return False
        return True

    def _update(self, mark=None):
        """The optimizer step from the micro-batches in self.batches: forward and backward of
        each, the gradient norm, the fused AdamW, the working copies and the counters. Every
        tensor it leaves behind is updated in place, and it reads nothing from the host, so
        it can be captured once and replayed: the loss and the gradient norm stay on the
        device, the clip factor reaches the fused AdamW as its grad_scale, and a step whose
        loss or norm is not finite is skipped by the optimizer itself (found_inf: parameters
        and state untouched). mark(phase), when given, is called as each phase ends."""
        mark = mark or _no_mark
        model = self.train_model
        total = torch.zeros((), device=self.device)
        for micro in range(self.spec.micro_steps):
            x, y = self.batches[micro]
            sync = not self.spec.ddp or micro == self.spec.micro_steps - 1
            context = model.no_sync() if not sync else contextlib.nullcontext()
            with context, self.autocast:
                loss = model(x, y) / self.spec.micro_steps
            mark("forward")
            loss.backward()
            total += loss.detach()
            mark("backward")
        self._finish_update(total)
        mark("optimizer")

    def _finish_update(self, total):
        """The part of the step after the last backward (`total`: the step's loss)."""
        if self.spec.ddp:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True).float()
        bad = ~(torch.isfinite(total) & torch.isfinite(norm))
        self.optimizer.found_inf = bad.float()
        # Dividing the gradients by max(1, norm / clip) is clip_grad_norm_'s scaling, done
        # inside the optimizer's one pass instead of a pass of its own.
        self.optimizer.grad_scale = (norm / self.cfg.grad_clip).clamp(min=1.0) if self.cfg.grad_clip else None
        self.optimizer.step()
        self.model.refresh_working_copies()
        self.bad_run.add_(1).mul_(bad)
        self.skipped += bad
        self.loss_sum += total
        self.grad_norm.copy_(norm)
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, mark=None):
        """One optimizer step over grad_accum micro-batches, with no host synchronisation
        (check_bad_steps() and the log read the device counters on logging steps). With
        CUDA graphs, the first GRAPH_WARMUP steps run as they are on a side stream (lazy
        initialisation, autotuning, compilation), the next one is captured, and every
        later step replays it. mark(phase) (the step benchmark's clock): called as each of
        the phases PHASES ends, the step then run eagerly (the same work a replay does)."""
        self.lr.fill_(lr_at(self.step, self.cfg))
        for micro in range(self.spec.micro_steps):
            self.train_loader.read_into(*self.batches[micro])
        if mark is not None:
            mark("data")
            self._update(mark)
        elif self.graph is not None:
            self.graph.replay()
        elif not self.use_graph:
            self._update()
        elif self._graph_steps < GRAPH_WARMUP:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._update()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._graph_steps += 1
        else:
            self._capture()
        self.step += 1

    def _capture(self):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._update()
        except Exception as e:  # an op that cannot be captured: say so once and go on without
            self.optimizer.zero_grad(set_to_none=True)
            self.use_graph = False
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.graph_error = f"{type(e).__name__}: {first}"
            self._print(f"note: the step could not be captured as a CUDA graph ({self.graph_error}); "
                        "it runs without one (--no-cuda-graph silences this)")
            self._update()
            return
        self.graph = graph
        graph.replay()

    def check_bad_steps(self):
        """Stop the run when max_bad_steps steps in a row were skipped (a host read: logging
        steps only)."""
        run = int(self.bad_run)
        if run >= self.cfg.max_bad_steps:
            raise FloatingPointError(
                f"{run} steps in a row had a non-finite loss or gradient norm (step {self.step}); "
                f"try a lower --lr (now {self.cfg.lr}), a longer --warmup-steps, or --grad-clip 1.0")

    @torch.no_grad()
    def evaluate(self):
        self.model.eval()
        self.val_loader.load_state_dict({**self.val_loader.state_dict(), "batch": 0})
        total = torch.zeros((), device=self.device)
        for k in range(self.cfg.eval_batches):
            x, y = next(self.val_loader)
            if k % self.spec.world == self.spec.rank:
                with self.autocast:
                    total += self.model(x.to(self.device), y.to(self.device))
        if self.spec.ddp:
            dist.all_reduce(total)
        self.model.train()
        return total.item() / self.cfg.eval_batches

    # ------------------------------------------------------------ the loop

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def fit(self):
        cfg = self.cfg
        if self.master:
            os.makedirs(self.out, exist_ok=True)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.progress = Progress(cfg.max_steps, "train", "step", initial=self.step, enabled=self.master and not self.quiet,
                                 stream=sys.stdout)

        def mean_loss():  # of the steps since the last log line (a host read)
            return self.loss_sum.item() / max(1, window_steps)

        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            fit_start, fit_step = time.perf_counter(), self.step
            window_start, window_steps = time.perf_counter(), 0
            while self.step < cfg.max_steps:
                self.train_step()
                window_steps += 1
                last = self.step == cfg.max_steps
                if self.step % cfg.log_every == 0 or last:
                    self.check_bad_steps()
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_steps * self.spec.tokens_per_step / elapsed  # steady state: steps only
                    record = {"step": self.step, "loss": mean_loss(), "lr": lr_at(self.step - 1, cfg),
                              "grad_norm": self.grad_norm.item(), "tokens_per_s": tokens_per_s,
                              # what the user gets: evaluation and checkpoints included
                              "wall_tokens_per_s": (self.step - fit_step) * self.spec.tokens_per_step
                              / (time.perf_counter() - fit_start),
                              "mfu": mfu(tokens_per_s, self.flops_per_token, self.spec.peak_flops),
                              "peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 1e9
                              if self.device.type == "cuda" else None, "skipped_steps": self.skipped_steps}
                    if self.step % cfg.eval_every == 0 or last:
                        record["val_loss"] = self.evaluate()
                    self._log(record, metrics_path)
                    self.loss_sum.zero_()
                # after a log step's line, which stands for its progress line too
                logged = self.step % cfg.log_every == 0 or last
                rate = lambda: window_steps * self.spec.tokens_per_step / (time.perf_counter() - window_start)  # noqa: E731
                self.progress.update(None if logged else lambda: f"loss {mean_loss():.4f}  {format_rate(rate())} tok/s")
                if self.step % cfg.ckpt_every == 0 or last:
                    self.save()
                if self.step % cfg.log_every == 0 or last:  # time the next window from here
                    window_start, window_steps = time.perf_counter(), 0
                if self._stop_signal is not None:
                    raise Interrupted(signal.Signals(self._stop_signal).name)
        except Interrupted as e:
            path = self.save()
            if self.master:
                print(f"{e}: checkpoint at step {self.step} written to {path}; continue with --resume --out {self.out}",
                      file=sys.stderr)
            raise
        finally:
            self.progress.close()
            for s, h in handlers.items():
                signal.signal(s, h)
            self.close()
        if self.master:
            plot_losses(metrics_path, os.path.join(self.out, "loss.png"))

    def close(self):
        """Stop the loaders and release the run folder."""
        self.train_loader.close()
        self.val_loader.close()
        if self._lock is not None:
            self._lock.release()

    def _log(self, record, path):
        if not self.master:
            return
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "n/a"
        line = f"step {record['step']:>6}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  " \
               f"{format_rate(record['tokens_per_s'])} tok/s  MFU {mfu}"
        if "val_loss" in record:
            line += f"  val {record['val_loss']:.4f}"
        self.progress.write(line)


def _metric_records(metrics_path):
    """The well-formed lines of metrics.jsonl (an object with an integer step and a number
    loss); anything else (a torn or foreign line) is passed over."""
    records = []
    with open(metrics_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and \
                    isinstance(record.get("loss"), (int, float)) and not isinstance(record.get("loss"), bool):
                records.append(record)
    return records


def plot_losses(metrics_path, png_path):
    """loss.png from metrics.jsonl; a plot that cannot be made is a note, never a failed run."""
    try:
        _plot(_metric_records(metrics_path), png_path)
    except Exception as e:  # the run's results are in its checkpoints and metrics already
        print(f"note: {png_path} not written ({type(e).__name__}: {e})", file=sys.stderr)


def _plot(records, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
    val = [r for r in records if isinstance(r.get("val_loss"), (int, float))]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
