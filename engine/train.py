"""The trainer behind `tinyfuse train`: AdamW, warm-up + cosine, gradient accumulation and
clipping, bf16 autocast on CUDA, checkpoints that resume exactly, DDP through torchrun.

A run folder holds `ckpt_NNNNNN.pt` (the last `keep_checkpoints`), `metrics.jsonl` (one JSON
object per log line) and `loss.png`.
"""
import contextlib
import glob
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from .data import read_manifest
from .loader import TokenLoader
from .model import ModelConfig, Transformer, default_kernels, preset, settings_from_dict

# Dense bf16 tensor-core peaks, TFLOP/s, by a fragment of torch.cuda.get_device_name().
# The first fragment found wins, so the more specific names come first.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
    ("GH200", 989.0), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0),
]


def device_peak_tflops(device_name):
    for fragment, peak in PEAK_TFLOPS:
        if fragment in device_name:
            return peak
    return None


@dataclass
class TrainConfig:
    preset: str = "stories260K"
    model: dict = field(default_factory=dict)  # overrides of the preset's ModelConfig
    data: str | None = None  # a prepared folder; None: the built-in synthetic corpus (prepared once)
    out: str | None = None  # the run folder; None: runs/<preset>-<date>
    init_from: str | None = None  # weights to start from (a checkpoint in any supported format)
    batch_size: int = 8  # sequences per micro-batch, per rank
    seq_len: int | None = None  # None: the model's max_seq_len
    grad_accum: int = 1  # micro-batches per optimizer step, over all ranks
    max_steps: int = 300
    lr: float = 6e-3
    min_lr: float = 6e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 10
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    max_bad_steps: int = 5
    seed: int = 0
    device: str | None = None  # None: cuda when present
    kernels: str | None = None  # None: triton on CUDA, torch elsewhere
    attention: str = "sdpa"
    compile: bool = False
    peak_tflops: float | None = None  # for devices the table does not know
    sample_tokens: int = 200  # the story printed when training ends; 0: none

    def validate(self):
        positive = ("batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "eval_batches",
                    "ckpt_every", "keep_checkpoints", "max_bad_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len <= 0):
            raise ValueError(f"seq_len must be a positive integer; got {self.seq_len!r}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"lr must be positive and min_lr in [0, lr]; got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps, weight_decay and grad_clip must not be negative")
        if self.kernels not in (None, "triton", "torch"):
            raise ValueError(f"kernels must be 'triton' or 'torch'; got {self.kernels!r}")
        if self.init_from and self.model:
            raise ValueError(f"the model's shape comes from --init-from {self.init_from}; drop the model settings "
                             f"({', '.join(sorted(self.model))})")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be positive; got {self.peak_tflops}")
        return self

    @classmethod
    def from_dict(cls, values):
        return settings_from_dict(cls, values, "training")


def lr_at(step, cfg):
    """Linear warm-up to lr, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


class Interrupted(Exception):
    pass


def _rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path):
    """Temporary file, fsync, rename, fsync of the folder: a crash leaves the old file or the new."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(out):
    return sorted(glob.glob(os.path.join(out, "ckpt_*.pt")))


def check_shapes(model, state_dict, source):
    """A clear error naming what differs when a checkpoint is for another model shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shapes differ: " + "; ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else ""))
        if missing:
            parts.append("missing: " + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:4]) + (" ..." if len(unexpected) > 4 else ""))
        raise ValueError(f"{source} is for another model shape ({'; '.join(parts)})")


class Trainer:
    def __init__(self, cfg: TrainConfig, quiet=False):
        self.cfg = cfg.validate()
        self.quiet = quiet
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.ddp:
            backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
        self.master = self.rank == 0
        if cfg.grad_accum % self.world:
            raise ValueError(f"grad_accum {cfg.grad_accum} must be divisible by the {self.world} ranks")
        self.micro_steps = cfg.grad_accum // self.world

        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and self.ddp:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        self.device = torch.device(device)
        self.kernels = cfg.kernels or default_kernels(self.device)
        self.data = cfg.data
        self.manifest = read_manifest(self.data)

        init_state = None
        if cfg.init_from:
            from .checkpoint import load_checkpoint

            weights = load_checkpoint(cfg.init_from)  # its shape, not the preset's
            self.model_cfg, init_state = weights.config, weights.state
            if self.manifest["vocab_size"] != self.model_cfg.vocab_size:
                raise ValueError(f"{self.data} was tokenized with {self.manifest['vocab_size']} tokens; "
                                 f"{cfg.init_from} has a vocabulary of {self.model_cfg.vocab_size}: prepare the data "
                                 "with the model's tokenizer (tinyfuse prepare --tokenizer MODEL)")
        else:
            self.model_cfg = preset(cfg.preset, **cfg.model)
            if "vocab_size" not in cfg.model:
                self.model_cfg.vocab_size = self.manifest["vocab_size"]  # the data sets the vocabulary
        self.model_cfg.validate()
        if self.manifest["vocab_size"] > self.model_cfg.vocab_size:
            raise ValueError(f"the data's vocabulary ({self.manifest['vocab_size']} tokens) is larger than the "
                             f"model's vocab_size {self.model_cfg.vocab_size}")
        self.seq_len = cfg.seq_len or self.model_cfg.max_seq_len
        if self.seq_len > self.model_cfg.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's max_seq_len {self.model_cfg.max_seq_len}")

        torch.manual_seed(cfg.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = Transformer(self.model_cfg, kernels=self.kernels, attention=cfg.attention).to(self.device)
        if init_state is not None:
            check_shapes(self.model, init_state, cfg.init_from)
            self.model.load_state_dict(init_state)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=self.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_at(step, cfg) / cfg.lr)
        self.train_model = self.model
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" \
            else torch.autocast("cpu", enabled=False)

        loader_device = self.device if self.device.type == "cuda" else None
        self.train_loader = TokenLoader(self.data, "train", cfg.batch_size, self.seq_len, seed=cfg.seed,
                                        rank=self.rank, world_size=self.world, device=loader_device)
        # Every rank reads the same val batches and evaluates its share of them, so the val
        # loss is the same whatever the number of ranks.
        self.val_loader = TokenLoader(self.data, "val", cfg.batch_size, self.seq_len, shuffle=False,
                                      device=loader_device)
        self.step = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self.tokens_per_step = cfg.batch_size * self.seq_len * cfg.grad_accum
        self.flops_per_token = self.model.flops_per_token(self.seq_len)
        self.peak_flops = None
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            peak = cfg.peak_tflops or device_peak_tflops(name)
            if peak is None:
                self._print(f"note: no bf16 peak known for {name}; MFU is omitted (give --peak-tflops)")
            else:
                self.peak_flops = peak * 1e12 * self.world
        self.out = cfg.out
        self._stop_signal = None

    # ------------------------------------------------------------ checkpoints

    def state_dict(self):
        return {
            "kind": "tinyfuse-checkpoint",
            "model": self.model.state_dict(),
            "model_config": self.model_cfg.to_dict(),
            "train_config": asdict(self.cfg),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.train_loader.state_dict(),
            "rng": _rng_state(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "tokenizer": self._tokenizer_bytes(),
        }

    def _tokenizer_bytes(self):
        path = os.path.join(self.data, self.manifest["tokenizer"]["path"])
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
        return None

    def save(self):
        if not self.master:
            return None
        path = os.path.join(self.out, f"ckpt_{self.step:06d}.pt")
        save_atomic(self.state_dict(), path)
        for old in checkpoints(self.out)[:-self.cfg.keep_checkpoints]:
            os.remove(old)
        return path

    def resume(self):
        found = checkpoints(self.out)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint (ckpt_*.pt) in {self.out}")
        state = torch.load(found[-1], map_location="cpu", weights_only=False)
        saved = ModelConfig.from_dict(state["model_config"])
        if saved != self.model_cfg:
            diff = [f"{k} {getattr(saved, k)} vs {getattr(self.model_cfg, k)}"
                    for k in saved.to_dict() if getattr(saved, k) != getattr(self.model_cfg, k)]
            raise ValueError(f"{found[-1]} is for another model shape (checkpoint vs this run: {', '.join(diff)})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self._trim_metrics()
        self._print(f"resumed from {found[-1]} at step {self.step}")

    def _trim_metrics(self):
        """Drop log lines a crashed run wrote after its last checkpoint."""
        path = os.path.join(self.out, "metrics.jsonl")
        if not self.master or not os.path.exists(path):
            return
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] <= self.step]
        with open(path, "w") as f:
            f.writelines(lines)

    # ------------------------------------------------------------ steps

    def _print(self, message):
        if self.master and not self.quiet:
            from tqdm.auto import tqdm

            tqdm.write(message)

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; returns (loss, grad_norm) as floats."""
        model = self.train_model
        total = torch.zeros((), device=self.device)
        for micro in range(self.micro_steps):
            x, y = next(self.train_loader)
            if self.device.type != "cuda":
                x, y = x.to(self.device), y.to(self.device)
            sync = not self.ddp or micro == self.micro_steps - 1
            context = model.no_sync() if not sync else contextlib.nullcontext()
            with context, self.autocast:
                loss = model(x, y) / self.micro_steps
            loss.backward()
            total += loss.detach()
        if self.ddp:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or float("inf"))
        loss_value, norm_value = torch.stack([total, norm.float()]).tolist()  # one sync per step
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
            if self.bad_steps >= self.cfg.max_bad_steps:
                raise FloatingPointError(
                    f"{self.bad_steps} steps in a row had a non-finite loss or gradient norm (step {self.step}); "
                    f"try a lower --lr (now {self.cfg.lr}), a longer --warmup-steps, or --grad-clip 1.0"
                )
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the order
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        self.step += 1
        return loss_value, norm_value

    @torch.no_grad()
    def evaluate(self):
        self.model.eval()
        self.val_loader.load_state_dict({**self.val_loader.state_dict(), "batch": 0})
        total = torch.zeros((), device=self.device)
        for k in range(self.cfg.eval_batches):
            x, y = next(self.val_loader)
            if k % self.world == self.rank:
                with self.autocast:
                    total += self.model(x.to(self.device), y.to(self.device))
        if self.ddp:
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
        from tqdm.auto import tqdm

        metrics_path = os.path.join(self.out, "metrics.jsonl")
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not self.master or self.quiet or None)
        losses = []
        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            window_start, window_steps = time.perf_counter(), 0
            while self.step < cfg.max_steps:
                loss, norm = self.train_step()
                losses.append(loss)
                window_steps += 1
                bar.update(1)
                last = self.step == cfg.max_steps
                if self.step % cfg.log_every == 0 or last:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_steps * self.tokens_per_step / elapsed
                    mfu = tokens_per_s * self.flops_per_token / self.peak_flops if self.peak_flops else None
                    record = {"step": self.step, "loss": sum(losses) / len(losses), "lr": self.scheduler.get_last_lr()[0],
                              "grad_norm": norm, "tokens_per_s": tokens_per_s, "mfu": mfu,
                              "peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 1e9
                              if self.device.type == "cuda" else None, "skipped_steps": self.skipped_steps}
                    if self.step % cfg.eval_every == 0 or last:
                        record["val_loss"] = self.evaluate()
                    self._log(record, metrics_path, bar)
                    losses = []
                if self.step % cfg.ckpt_every == 0 or last:
                    self.save()
                if not losses:  # a log line was just written: time the next window from here
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
            bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)
            self.train_loader.close()
            self.val_loader.close()
        if self.master:
            plot_losses(metrics_path, os.path.join(self.out, "loss.png"))

    def _log(self, record, path, bar):
        if not self.master:
            return
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "n/a"
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.3g}", mfu=mfu)
        line = f"step {record['step']:>6}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  " \
               f"{record['tokens_per_s']:.3g} tok/s  MFU {mfu}"
        if "val_loss" in record:
            line += f"  val {record['val_loss']:.4f}"
        self._print(line)


def plot_losses(metrics_path, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
    val = [r for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
