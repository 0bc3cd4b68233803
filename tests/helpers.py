"""What the tests share: the device, tolerances and error measure of the kernel tests, fresh
random inputs, the tiny model shapes, and running the `tinyfuse` command.

Importing this module switches Triton's interpreter on when there is no CUDA (before
triton is imported), exactly as conftest.py does first.
"""
import contextlib
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading

import torch

from tinyfuse.engine.runtime import select_backend

CUDA = torch.cuda.is_available()
if not CUDA:
    assert "triton" not in sys.modules, "triton was imported before the tests could enable its interpreter"
    select_backend()

DEVICE = "cuda" if CUDA else "cpu"

from tinyfuse.kernels import check as kernel_check  # noqa: E402  (after the interpreter is chosen)


def gpu_only(reason):
    """Skipped without CUDA, and marked `gpu` so that a GPU session runs just these
    (`pytest -m gpu`, stage 5 of bench/gpu_run.sh)."""
    import pytest

    def mark(test):
        return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason=reason)(test))
    return mark

# inductor on CUDA, aot_eager on a CPU (why: kernel_check.compile_backend); test_compile.py
# runs full inductor once on CPU too.
COMPILE_BACKEND = kernel_check.compile_backend(DEVICE)

# The relative-norm error bounds and the dtypes of `tinyfuse check` (kernels/check.py): one
# table for both.
TOLERANCE = kernel_check.TOLERANCE
DTYPES = list(kernel_check.DTYPES.values())

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))

# A model small enough for the interpreter and a CPU step in milliseconds; GQA (4 heads, 2 kv).
TINY_MODEL = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 8, "max_seq_len": 64}


def tiny_run(data, out, **changes):
    """The TrainConfig of a tiny CPU run on a prepared folder (TINY_MODEL, a few steps, every
    step logged); `changes` override any setting."""
    from tinyfuse.engine.train import TrainConfig

    values = dict(preset="stories260K", model=dict(TINY_MODEL), data=data, out=str(out), batch_size=4, seq_len=32,
                  max_steps=12, lr=3e-3, warmup_steps=2, log_every=1, eval_every=6, eval_batches=2, ckpt_every=6,
                  keep_checkpoints=5, device="cpu", sample_tokens=0)
    values.update(changes)
    return TrainConfig(**values)


def rel_err(out, ref):
    """kernel_check.relative_error, asserting that out is finite."""
    assert torch.isfinite(out).all(), "output has NaN or inf: an element was left unwritten or overflowed"
    return kernel_check.relative_error(out, ref)


def leaf(shape, dtype, scale=1.0):
    """Fresh random input that requires grad (a new draw every test run)."""
    return (torch.randn(shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype).requires_grad_()


def as_float64_leaf(t):
    return t.detach().double().requires_grad_()


def run_cli(*args, env=None, timeout=600, **kwargs):
    """`tinyfuse ARGS...` as a user runs it: a new process, its output captured."""
    return subprocess.run(["tinyfuse", *args], capture_output=True, text=True, env=env, timeout=timeout, **kwargs)


def metrics(out):
    """The records of a run folder's metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files from `self.server.files` with Range support and a sha256 ETag."""

    def log_message(self, *args):
        pass

    def _file(self):
        name = self.path.rsplit("/", 1)[-1]
        return self.server.files.get(name)

    def _headers(self, body, status, start=0):
        self.send_response(status)
        self.send_header("ETag", f'"{self.server.etags.get(self.path.rsplit("/", 1)[-1], hashlib.sha256(body).hexdigest())}"')
        self.send_header("Content-Length", str(len(body) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()

    def do_HEAD(self):
        body = self._file()
        if body is None:
            self.send_error(404)
            return
        self._headers(body, 200)

    def do_GET(self):
        body = self._file()
        if body is None:
            self.send_error(404)
            return
        match = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(match.group(1)) if match else 0
        self.server.ranges.append(start)
        self._headers(body, 206 if match else 200, start)
        self.wfile.write(body[start:])


@contextlib.contextmanager
def local_hub():
    """A Hugging Face-like file server on loopback: (server, base URL of TinyStories' files);
    put bytes in server.files[name]."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    server.files, server.etags, server.ranges = {}, {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/datasets/roneneldan/TinyStories/resolve/main"
    finally:
        server.shutdown()
