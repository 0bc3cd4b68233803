"""Benchmarks of the kernels, the training step and the loader (`tinyfuse bench`).

Without CUDA the kernels run in Triton's interpreter, which must be switched on before
triton is first imported: importing this package does that.
"""
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
