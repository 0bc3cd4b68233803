"""`tinyfuse eval`: mean next-token loss, perplexity and bits per byte over held-out stories.

Each story is scored on its own, starting with BOS and cut to the model's context, so the
figure does not depend on batch size or on how stories happen to pack into windows. Bits
per byte divide the summed loss (in bits) by the UTF-8 bytes of the scored tokens' text,
which makes models with different tokenizers comparable.
"""
import math

import numpy as np
import torch

from .data import read_stories
from .progress import Progress
from .runtime import autocast
from .shards import read_manifest, split_shards


def text_stories(sp, path, max_stories=None):
    """Token lists (BOS first) of the stories of a text or JSON file or folder."""
    stories = read_stories(path)[:max_stories]
    return [[sp.bos_id()] + ids for ids in sp.encode(stories)]


def prepared_stories(data_dir, max_stories=None):
    """Token lists of a prepared folder's val split: its shards cut at each BOS."""
    manifest = read_manifest(data_dir)
    bos = manifest["bos_id"]
    out = []
    for path, _ in zip(*split_shards(data_dir, "val", manifest)):
        tokens = np.fromfile(path, dtype=manifest["dtype"])
        starts = np.flatnonzero(tokens == bos).tolist() + [len(tokens)]
        out += [tokens[a:b].tolist() for a, b in zip(starts[:-1], starts[1:]) if b - a > 1]
        if max_stories is not None and len(out) >= max_stories:
            break
    return out[:max_stories]


@torch.no_grad()
def evaluate(model, sp, stories, batch_tokens=16384, progress=False):
    """{"loss", "ppl", "bpb", "tokens", "bytes", "stories"} of the model over token lists
    that start with BOS."""
    if not stories:
        raise ValueError("no stories to evaluate")
    context = model.config.max_seq_len
    stories = [s[:context + 1] for s in stories if len(s) > 1]  # inputs fill the context at most
    n_bytes = sum(len(sp.decode(s[1:]).encode("utf-8")) for s in stories)
    device = model.tok_embeddings.weight.device
    order = sorted(range(len(stories)), key=lambda i: -len(stories[i]))  # similar lengths share a batch
    batches, at = [], 0
    while at < len(order):
        width = len(stories[order[at]]) - 1
        size = max(1, batch_tokens // width)
        batches.append(order[at:at + size])
        at += size
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    bar = Progress(len(batches), "eval", "batch", enabled=progress)
    for batch in batches:
        width = len(stories[batch[0]]) - 1
        x = torch.zeros((len(batch), width), dtype=torch.long)
        y = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, i in enumerate(batch):
            s = torch.tensor(stories[i])
            x[row, :len(s) - 1], y[row, :len(s) - 1] = s[:-1], s[1:]
        with autocast(device):
            total += model.token_losses(x.to(device), y.to(device)).double().sum()
        bar.update()
    bar.close()
    model.train(was_training)
    n_tokens = sum(len(s) - 1 for s in stories)
    loss = total.item() / n_tokens
    ppl = math.inf if loss > 700 else math.exp(loss)  # exp raises OverflowError past ~709
    return {"loss": loss, "ppl": ppl, "bpb": total.item() / math.log(2) / n_bytes,
            "tokens": n_tokens, "bytes": n_bytes, "stories": len(stories)}
