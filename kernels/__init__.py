"""Fused Triton kernels for small Llama-style models, each with a plain-PyTorch
twin in tinyfuse.kernels.reference and registered as a torch.library op."""
from . import reference
from .cross_entropy import CrossEntropyLoss, cross_entropy
from .huggingface import patch_transformers
from .linear import linear
from .linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy
from .rms_norm import RMSNorm, add_rms_norm, rms_norm
from .rope import rope, rope_qkv, rope_tables
from .swiglu import SwiGLU, geglu, swiglu

__all__ = ["reference", "rms_norm", "add_rms_norm", "RMSNorm", "rope", "rope_qkv", "rope_tables", "swiglu", "geglu", "SwiGLU",
           "linear", "cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "LinearCrossEntropyLoss",
           "patch_transformers"]
