"""tinyfuse eval: loss, perplexity and bits per byte against a direct float64 computation;
batching, cutting to the context, text files and prepared folders."""
import json
import math
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F
from tinyfuse.engine import data
from tinyfuse.engine.evaluate import evaluate, prepared_stories, text_stories
from tinyfuse.engine.model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    prepared = str(root / "prepared")
    data.prepare("synthetic", prepared, vocab_size=400, stories=600, val_fraction=0.05, quiet=True)
    return root, prepared


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, multiple_of=8,
                                max_seq_len=48))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def direct(model, sp, stories):
    """Summed loss in float64, token count and text bytes, one story at a time."""
    total, count, n_bytes = 0.0, 0, 0
    for s in stories:
        s = s[:model.config.max_seq_len + 1]
        with torch.no_grad():
            logits = model(torch.tensor([s[:-1]]))[0].double()
        total += F.cross_entropy(logits, torch.tensor(s[1:]), reduction="sum").item()
        count += len(s) - 1
        n_bytes += len(sp.decode(s[1:]).encode("utf-8"))
    return total, count, n_bytes


def test_matches_direct_computation_and_batching(corpus, model):
    _, prepared = corpus
    sp = data.load_tokenizer(os.path.join(prepared, "tokenizer.model"))
    stories = prepared_stories(prepared)
    assert len(stories) == 30 and all(s[0] == sp.bos_id() and sp.bos_id() not in s[1:] for s in stories)
    assert any(len(s) > 49 for s in stories), "some stories must be cut to the context"
    total, count, n_bytes = direct(model, sp, stories)
    for batch_tokens in (1, 100, 100_000):
        got = evaluate(model, sp, stories, batch_tokens=batch_tokens)
        assert got["tokens"] == count and got["bytes"] == n_bytes and got["stories"] == 30
        assert got["loss"] == pytest.approx(total / count, rel=1e-6)
        assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)
        assert got["bpb"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-6)
    with pytest.raises(ValueError, match="no stories"):
        evaluate(model, sp, [])


def test_text_file_and_prepared_folder(corpus, model, tmp_path):
    _, prepared = corpus
    sp = data.load_tokenizer(os.path.join(prepared, "tokenizer.model"))
    text = tmp_path / "stories.txt"
    text.write_text("Tom had a red ball.\n<|endoftext|>\nSue saw a big dog. It ran!\n<|endoftext|>\n")
    stories = text_stories(sp, str(text))
    assert stories == [[sp.bos_id()] + sp.encode("Tom had a red ball."), [sp.bos_id()] + sp.encode("Sue saw a big dog. It ran!")]
    assert len(text_stories(sp, str(text), max_stories=1)) == 1
    assert evaluate(model, sp, stories)["bytes"] == len("Tom had a red ball.") + len("Sue saw a big dog. It ran!")
    assert prepared_stories(prepared, max_stories=7) == prepared_stories(prepared)[:7]


def test_cli_json_and_errors(corpus, model, tmp_path):
    _, prepared = corpus
    ckpt = tmp_path / "model.pt"
    torch.save({"kind": "tinyfuse-checkpoint", "model": model.state_dict(), "model_config": model.config.to_dict()}, ckpt)
    result = subprocess.run(["tinyfuse", "eval", "--checkpoint", str(ckpt), "--data", prepared, "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    sp = data.load_tokenizer(os.path.join(prepared, "tokenizer.model"))
    total, count, _ = direct(model, sp, prepared_stories(prepared))
    assert {"loss", "ppl", "bpb", "tokens"} <= set(got) and got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    text = subprocess.run(["tinyfuse", "eval", "--checkpoint", str(ckpt), "--data", prepared, "--max-stories", "3"],
                          capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and "loss" in text.stdout and "3 stories" in text.stdout
    for flags, message in ((["--data", str(tmp_path / "absent.txt")], "no such file or folder"),
                           (["--data", prepared, "--max-stories", "0"], "--max-stories must be positive")):
        bad = subprocess.run(["tinyfuse", "eval", "--checkpoint", str(ckpt), *flags], capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
