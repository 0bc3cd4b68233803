"""Batches of token windows from a prepared folder.

`TokenLoader` is the engine's loader: C++ threads (tinyfuse._loader) copy windows out of
memory-mapped shards into a ring of buffers ahead of the step. For a GPU the buffers are
page-locked and hold the raw uint16/uint32 tokens, widened to int64 on the device; for the
CPU the threads write the int64 inputs and targets directly.

`ReferenceLoader` is the same sampling in a few lines of numpy, for tests and benchmarks.

Sampling: a split's shards are one token stream cut into W non-overlapping windows of T+1
tokens. Window positions run on forever; position p is in epoch p // W and names window
perm(epoch)[p % W] (p % W without shuffle). Global batch n holds positions
[n*B*world, (n+1)*B*world) and rank r the B consecutive ones at n*B*world + r*B. A batch
depends only on its index: resume is exact and ranks are disjoint within an epoch.
"""
import weakref

import numpy as np
import torch

from .shards import read_manifest, split_shards

_MASK64 = (1 << 64) - 1


def _check_args(batch_size, seq_len, rank, world_size, prefetch):
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size), ("prefetch", prefetch)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank!r}")


class _Sampling:
    """What both loaders share: arguments, the state dict, and the epoch arithmetic."""

    def _setup(self, data_dir, split, batch_size, seq_len, seed, rank, world_size, shuffle, prefetch):
        _check_args(batch_size, seq_len, rank, world_size, prefetch)
        self.manifest = read_manifest(data_dir)
        self.paths, self.counts = split_shards(data_dir, split, self.manifest)
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.tokens = sum(self.counts)
        if self.tokens < seq_len + 1:
            raise ValueError(
                f"the {split} split of {data_dir} holds {self.tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}"
            )
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.windows = self.tokens // (seq_len + 1)
        self.batch = 0  # index of the next global batch

    @property
    def epoch(self):
        """The epoch of the next batch's first window."""
        return (self.batch * self.world_size + self.rank) * self.batch_size // self.windows

    def state_dict(self):
        return {"batch": self.batch, "seed": self.seed, "shuffle": self.shuffle, "split": self.split,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "world_size": self.world_size,
                "windows": self.windows}

    def _check_state(self, state):
        for key in ("seed", "shuffle", "split", "batch_size", "seq_len", "world_size", "windows"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"loader state is for {key}={state.get(key)!r}, this loader has {key}={getattr(self, key)!r}: "
                    "resume with the data and batch settings of the run that saved it"
                )
        return int(state["batch"])

    def __iter__(self):
        return self


class TokenLoader(_Sampling):
    """`x, y = next(loader)`: int64 [B, T] inputs and next-token targets.

    On CUDA (`device="cuda"`) the buffers are page-locked and the batch arrives on the
    GPU; on CPU the tensors are plain CPU tensors. `workers` C++ threads fill `prefetch`
    buffers ahead of the consumer."""

    def __init__(self, data_dir, split="train", batch_size=32, seq_len=256, seed=0, rank=0, world_size=1,
                 shuffle=True, prefetch=4, device=None, workers=2):
        try:
            from tinyfuse import _loader
        except ImportError as e:
            raise ImportError(
                "tinyfuse's C++ loader (tinyfuse._loader) is not built: reinstall the package from its "
                "checkout with `pip install -e .` (it needs a C++17 compiler and pybind11)"
            ) from e
        self._setup(data_dir, split, batch_size, seq_len, seed, rank, world_size, shuffle, prefetch)
        if not isinstance(workers, int) or workers <= 0:
            raise ValueError(f"workers must be a positive integer; got {workers!r}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda":
            # Raw tokens cross to the GPU (a quarter of int64's bytes) and are widened there:
            # int16 holds uint16 bit patterns (masked after widening), int32 uint32 ones
            # (vocabularies stay far below 2^31).
            raw = torch.int16 if self.dtype.itemsize == 2 else torch.int32
            self._slots = [torch.empty(batch_size, seq_len + 1, dtype=raw, pin_memory=True) for _ in range(prefetch)]
        else:
            # On the CPU the threads write the int64 inputs and targets themselves.
            self._slots = [torch.empty(2, batch_size, seq_len, dtype=torch.int64) for _ in range(prefetch)]
        self._impl = _loader.Loader(
            self.paths, self.dtype.itemsize, batch_size, seq_len, seed & _MASK64, rank, world_size, shuffle,
            [s.data_ptr() for s in self._slots], self.device.type != "cuda", workers, 0,
        )
        self._in_flight = []  # (slot, event) of host-to-device copies that may still be running
        # The finalizer holds the buffers too, so they outlive the threads that write them.
        self._finalizer = weakref.finalize(self, _close, self._impl, self._slots)

    def __next__(self):
        slot = self._impl.acquire()
        self.batch += 1
        if self.device.type != "cuda":
            # A copy: handing the filled buffer over and giving the slot a fresh one measured
            # 2-3x slower, the threads then paying the page faults of new memory.
            x, y = self._slots[slot].clone()
            self._impl.release(slot)
            return x, y
        tokens = self._widened(slot)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def read_into(self, x, y):
        """The next batch written into x and y (int64 [B, T] on the loader's device): the
        static input buffers of a captured CUDA graph, with no tensors allocated."""
        if x.shape != (self.batch_size, self.seq_len) or y.shape != x.shape:
            raise ValueError(f"read_into: expected two [{self.batch_size}, {self.seq_len}] buffers; "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        slot = self._impl.acquire()
        self.batch += 1
        if self.device.type != "cuda":
            x.copy_(self._slots[slot][0])
            y.copy_(self._slots[slot][1])
            self._impl.release(slot)
            return
        tokens = self._widened(slot)
        x.copy_(tokens[:, :-1])
        y.copy_(tokens[:, 1:])

    def _widened(self, slot):
        """The slot's raw tokens copied to the GPU (asynchronously) and widened to int64 there."""
        raw = self._slots[slot].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._in_flight.append((slot, event))
        self._release_copied()
        tokens = raw.to(torch.int64)
        if raw.dtype == torch.int16:
            tokens.bitwise_and_(0xFFFF)
        return tokens

    def _release_copied(self):
        """Hand back the slots whose copies are done. The next acquire needs the oldest slot,
        so at most prefetch - 1 may stay held: only then does the host wait on the GPU."""
        while self._in_flight and (len(self._in_flight) >= len(self._slots) or self._in_flight[0][1].query()):
            slot, event = self._in_flight.pop(0)
            event.synchronize()
            self._impl.release(slot)

    def load_state_dict(self, state):
        batch = self._check_state(state)
        for _, event in self._in_flight:
            event.synchronize()
        self._in_flight = []
        self._impl.seek(batch)
        self.batch = batch

    def close(self):
        """Stop the threads and unmap the shards (also done at exit)."""
        for _, event in self._in_flight:
            event.synchronize()
        self._in_flight = []
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _close(impl, slots):
    impl.close()


def window_permutation(windows, seed, epoch):
    """The epoch's window order: Fisher-Yates driven by splitmix64, as the C++ loader draws it."""
    perm = list(range(windows))
    state = (seed ^ (epoch * 0xD1B54A32D192ED03)) & _MASK64
    for i in range(windows, 1, -1):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        j = (z ^ (z >> 31)) % i
        perm[i - 1], perm[j] = perm[j], perm[i - 1]
    return perm


class ReferenceLoader(_Sampling):
    """The loader's sampling in numpy, one window at a time (tests and benchmarks only)."""

    def __init__(self, data_dir, split="train", batch_size=32, seq_len=256, seed=0, rank=0, world_size=1,
                 shuffle=True, prefetch=1):
        self._setup(data_dir, split, batch_size, seq_len, seed, rank, world_size, shuffle, prefetch)
        self._shards = [np.memmap(p, dtype=self.dtype, mode="r") if n else np.zeros(0, self.dtype)
                        for p, n in zip(self.paths, self.counts)]
        self._starts = np.cumsum([0, *self.counts])
        self._perm = (None, None)

    def _window(self, index):
        first, count, parts = index * (self.seq_len + 1), self.seq_len + 1, []
        shard = int(np.searchsorted(self._starts, first, side="right")) - 1
        while count:
            offset = first - self._starts[shard]
            piece = self._shards[shard][offset:offset + count]
            parts.append(piece)
            first, count, shard = first + piece.size, count - piece.size, shard + 1
        return np.concatenate(parts).astype(np.int64)

    def __next__(self):
        rows = []
        for b in range(self.batch_size):
            position = (self.batch * self.world_size + self.rank) * self.batch_size + b
            epoch, index = divmod(position, self.windows)
            if self.shuffle:
                if self._perm[0] != epoch:
                    self._perm = (epoch, window_permutation(self.windows, self.seed & _MASK64, epoch))
                index = self._perm[1][index]
            rows.append(self._window(index))
        self.batch += 1
        tokens = torch.from_numpy(np.stack(rows))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def load_state_dict(self, state):
        self.batch = self._check_state(state)

    def close(self):
        self._shards = []
