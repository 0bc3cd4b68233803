"""Reading model weights for sample, eval and `train --init-from`."""
import os

import torch

from .model import ModelConfig


def load_checkpoint(path):
    """(ModelConfig, state dict, tokenizer .model bytes or None) from a tinyfuse checkpoint."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"checkpoint {path!r}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("kind") != "tinyfuse-checkpoint":
        raise ValueError(f"checkpoint {path!r}: not a tinyfuse checkpoint (no 'kind': 'tinyfuse-checkpoint')")
    return ModelConfig.from_dict(state["model_config"]).validate(), state["model"], state.get("tokenizer")
