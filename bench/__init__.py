"""Benchmarks of the kernels, the training step and the loader (`tinyfuse bench`).

Without CUDA the kernels run in Triton's interpreter, which must be switched on before
triton is first imported: importing this package does that.
"""
from tinyfuse.engine.runtime import select_backend

select_backend()
