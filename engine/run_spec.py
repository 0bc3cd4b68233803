"""One resolution step for a training run: its settings, the data folder's manifest, the
device and the process world become a frozen `RunSpec`, which `tinyfuse train`, the
Trainer and the step benchmark all read. Everything that can refuse a run (a data folder
whose tokenizer or tokens do not fit the model, an --init-from that does not fit the data,
a seq_len beyond the model) refuses here, before a model, a loader or a run folder exists.
"""
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .model import ModelConfig, default_kernels, preset
from .runtime import compute_dtype, default_device, device_peak_tflops, fastest_sdpa_backend, launched_world_size
from .shards import check_token_range, read_manifest, sha256_file, tokenizer_path


@dataclass(frozen=True)
class RunSpec:
    config: object  # the TrainConfig, validated
    manifest: dict  # the data folder's, read once
    model: ModelConfig  # the preset's with the data's vocabulary, or --init-from's
    init_state: dict | None  # --init-from's weights, checked against `model`
    device: torch.device
    rank: int
    world: int
    kernels: str  # "triton" or "torch"
    seq_len: int
    attention: str  # the attention backend the model runs
    peak_flops: float | None  # all ranks' dense bf16 peak, for MFU; None where unknown
    notes: tuple = ()  # lines for the run's log: the attention measured, a peak unknown

    @property
    def ddp(self):
        return self.world > 1

    @property
    def master(self):
        return self.rank == 0

    @property
    def micro_steps(self):
        """Micro-batches each rank runs per optimizer step."""
        return self.config.grad_accum // self.world

    @property
    def tokens_per_step(self):
        return self.config.batch_size * self.seq_len * self.config.grad_accum


def resolve_run(cfg):
    """The RunSpec of a TrainConfig in this process (under torchrun: this rank's, the process
    group started)."""
    cfg.validate()
    rank, world = _world(cfg)
    if cfg.grad_accum % world:
        raise ValueError(f"grad_accum {cfg.grad_accum} must be divisible by the {world} ranks")
    device = default_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    manifest = read_manifest(cfg.data)
    _check_tokenizer(cfg.data, manifest)
    model, init_state = _model(cfg, manifest)
    check_token_range(cfg.data, ("train", "val"), manifest, min(manifest["vocab_size"], model.vocab_size))
    seq_len = cfg.seq_len or model.max_seq_len
    if seq_len > model.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {model.max_seq_len}")
    attention, attention_note = _attention(cfg, model, device, seq_len)
    peak_flops, peak_note = _peak_flops(cfg, device, world)
    return RunSpec(config=cfg, manifest=manifest, model=model, init_state=init_state, device=device, rank=rank,
                   world=world, kernels=cfg.kernels or default_kernels(device), seq_len=seq_len, attention=attention,
                   peak_flops=peak_flops, notes=tuple(note for note in (attention_note, peak_note) if note))


def _world(cfg):
    """(rank, world): one process, or torchrun's, its process group started here."""
    if launched_world_size() == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _check_tokenizer(data, manifest):
    """The data folder's tokenizer is the one its manifest records (sha256) and parses, so
    no run trains for hours and then stores garbage in its checkpoints or dies at the
    end-of-run sample."""
    path = tokenizer_path(data, manifest)
    if path is None or not os.path.isfile(path):
        return
    recorded = manifest["tokenizer"].get("sha256")
    if recorded and sha256_file(path) != recorded:
        raise ValueError(f"{path} is not the tokenizer {data} was prepared with (its sha256 differs from "
                         "the manifest's): re-run tinyfuse prepare, or restore the file")
    from .sample import load_tokenizer_bytes

    with open(path, "rb") as f:
        load_tokenizer_bytes(f.read(), path)  # a DataError, one line, for bytes that are not a tokenizer


def _model(cfg, manifest):
    """(ModelConfig, the weights to start from or None): --init-from's shape and weights, or
    the preset's shape with the data's vocabulary."""
    init_state = None
    if cfg.init_from:
        from .checkpoint import load_checkpoint

        weights = load_checkpoint(cfg.init_from)  # its shape, not the preset's
        model, init_state = weights.config, weights.state
        if manifest["vocab_size"] != model.vocab_size:
            raise ValueError(f"{cfg.data} was tokenized with {manifest['vocab_size']} tokens; "
                             f"{cfg.init_from} has a vocabulary of {model.vocab_size}: prepare the data "
                             "with the model's tokenizer (tinyfuse prepare --tokenizer MODEL)")
        theirs = hashlib.sha256(weights.tokenizer).hexdigest() if weights.tokenizer else None
        if theirs and theirs != manifest["tokenizer"]["sha256"] and not cfg.allow_tokenizer_mismatch:
            raise ValueError(f"{cfg.init_from} carries another tokenizer than {cfg.data} was prepared with "
                             f"(sha256 {theirs[:12]}... vs {manifest['tokenizer']['sha256'][:12]}...): the same "
                             "ids would mean other tokens. Prepare the data with the checkpoint's tokenizer, or "
                             "pass --allow-tokenizer-mismatch")
    else:
        model = preset(cfg.preset, **cfg.model)
        if "vocab_size" not in cfg.model:
            model.vocab_size = manifest["vocab_size"]  # the data sets the vocabulary
    model.validate()
    if manifest["vocab_size"] > model.vocab_size:
        raise ValueError(f"the data's vocabulary ({manifest['vocab_size']} tokens) is larger than the "
                         f"model's vocab_size {model.vocab_size}")
    return model, init_state


def _attention(cfg, model, device, seq_len):
    """(backend, note): --attention auto is, on CUDA, the SDPA backend measured fastest at
    this run's shape (causal forward + backward), the note saying so; elsewhere SDPA's own
    choice."""
    if cfg.attention != "auto":
        return cfg.attention, None
    if device.type != "cuda":
        return "sdpa", None
    best, times, rejected = fastest_sdpa_backend(cfg.batch_size, model.n_heads, model.n_kv_heads, seq_len,
                                                 model.head_dim, device, compute_dtype(device))
    return best, (f"attention: {best} (causal forward + backward, "
                  + ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items())
                  + "".join(f"; {name} not used: {why}" for name, why in rejected.items()) + ")")


def _peak_flops(cfg, device, world):
    """(all ranks' peak FLOP/s or None, note)."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    peak = cfg.peak_tflops or device_peak_tflops(name)
    if peak is None:
        return None, f"note: no bf16 peak known for {name}; MFU is omitted (give --peak-tflops)"
    return peak * 1e12 * world, None
