"""Sampling with a KV cache: temperature, nucleus (top-p), seeded, stopping at BOS or EOS."""
import math

import torch

from .progress import Progress
from .runtime import autocast, compute_dtype


def pick(logits, temperature, top_p, generator):
    """The next token from float logits [V]: argmax at temperature 0, else a draw from the
    smallest set of tokens whose probability reaches top_p."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        sorted_probs = torch.where(keep, sorted_probs, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model, prompt, max_new_tokens=256, temperature=0.8, top_p=0.9, seed=0, stop=(), progress=False):
    """Token ids continuing `prompt` (a list starting with BOS) until a stop id, the token
    budget, or the model's context runs out."""
    if not 0 <= temperature < math.inf or not 0 < top_p <= 1:  # NaN fails both
        raise ValueError(f"temperature must be a finite number >= 0 and top_p in (0, 1]; got {temperature}, {top_p}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
    if not prompt:
        raise ValueError("the prompt needs at least one token (BOS)")
    device = model.tok_embeddings.weight.device
    limit = model.config.max_seq_len
    if len(prompt) >= limit:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {limit}")
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = compute_dtype(device)
    was_training = model.training
    model.eval()
    caches = model.new_cache(1, device, dtype, len(prompt) + max_new_tokens)
    bar = Progress(max_new_tokens, "sample", "token", enabled=progress)
    with autocast(device):
        logits = model.forward_cached(torch.tensor([prompt], device=device), caches, 0)
        out, position = [], len(prompt)  # position: where the next token goes
        while len(out) < max_new_tokens and position < limit:
            if not torch.isfinite(logits[0]).all():  # one more host read a token; pick() makes one already
                raise ValueError(f"the model's logits at position {position} are not finite (NaN or inf in its "
                                 "weights?): nothing to sample from")
            token = pick(logits[0], temperature, top_p, generator)
            if token in stop:
                break
            out.append(token)
            bar.update()
            if len(out) < max_new_tokens and position + 1 < limit:
                logits = model.forward_cached(torch.tensor([[token]], device=device), caches, position)
            position += 1
    bar.close()
    model.train(was_training)
    return out


def load_tokenizer_bytes(blob, source="the checkpoint's tokenizer"):
    """A SentencePiece processor from a .model's bytes (as a checkpoint carries them); bytes
    that are not one are a DataError naming `source`."""
    import sentencepiece as spm

    from .shards import DataError

    try:
        return spm.SentencePieceProcessor(model_proto=blob)
    except (RuntimeError, TypeError, UnicodeDecodeError) as e:  # the last: found by tests/test_fuzz.py
        raise DataError(f"{source}: not a SentencePiece model ({str(e).splitlines()[0][:100]})") from None


def story(model, sp, prompt="", **kwargs):
    """Decoded text: the prompt and its continuation."""
    ids = [sp.bos_id()] + (sp.encode(prompt) if prompt else [])
    new = generate(model, ids, stop=(sp.bos_id(), sp.eos_id()), **kwargs)
    return sp.decode(ids[1:] + new)


def printable(text):
    """Text safe to print to a terminal: control characters other than newline and tab (an
    undertrained model emits raw bytes such as ESC) shown escaped, as \\x1b."""
    return "".join(c if c in "\n\t" or (c.isprintable() and c != "\x7f") else repr(c)[1:-1] for c in text)
