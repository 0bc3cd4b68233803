"""Checkpoint formats: llama2.c v0/v1/.pt and Hugging Face in and out, told apart by content;
fidelity on the real stories260K against a numpy llama2.c held here; bad files; fine-tuning
from a llama2.c checkpoint."""
import dataclasses
import json
import os
import struct

import numpy as np
import pytest
import torch
from helpers import rel_err, run_cli
from tinyfuse.engine import data
from tinyfuse.engine.checkpoint import CheckpointError, Weights, export, load_checkpoint
from tinyfuse.engine.model import ModelConfig, Transformer
from tinyfuse.engine.run_spec import resolve_run
from tinyfuse.engine.train import TrainConfig, Trainer


class NumpyLlama2c:
    """llama2.c's run.c in numpy float32: reads a v0 .bin and runs one token at a time."""
    def __init__(self, path):
        raw = open(path, "rb").read()
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", raw[:28])
        self.dim, self.n_layers, self.n_heads, self.n_kv, self.seq = dim, n_layers, n_heads, n_kv, seq
        self.vocab, self.hs = abs(vocab), dim // n_heads
        w = np.frombuffer(raw, dtype="<f4", offset=28)
        at = 0
        def take(*shape):
            nonlocal at
            n = int(np.prod(shape)); out = w[at:at + n].reshape(shape); at += n; return out
        kv = n_kv * self.hs
        self.emb = take(self.vocab, dim); self.rms_att = take(n_layers, dim)
        self.wq = take(n_layers, dim, dim); self.wk = take(n_layers, kv, dim); self.wv = take(n_layers, kv, dim)
        self.wo = take(n_layers, dim, dim); self.rms_ffn = take(n_layers, dim)
        self.w1 = take(n_layers, hidden, dim); self.w2 = take(n_layers, dim, hidden); self.w3 = take(n_layers, hidden, dim)
        self.rms_final = take(dim); take(seq, self.hs // 2); take(seq, self.hs // 2)
        self.wcls = self.emb if vocab > 0 else take(self.vocab, dim)
        self.reset()

    def reset(self):
        kv = self.n_kv * self.hs
        self.kc = np.zeros((self.n_layers, self.seq, kv), np.float32); self.vc = np.zeros_like(self.kc)

    @staticmethod
    def rmsnorm(x, w):
        return w * (x / np.sqrt(np.mean(x * x) + np.float32(1e-5))).astype(np.float32)

    def rope(self, v, pos):
        i = np.arange(0, v.shape[0], 2)
        freq = (1.0 / np.power(np.float32(10000.0), (i % self.hs).astype(np.float32) / np.float32(self.hs))).astype(np.float32)
        ang = np.float32(pos) * freq
        c, s = np.cos(ang), np.sin(ang)
        v0, v1 = v[0::2].copy(), v[1::2].copy()
        out = np.empty_like(v); out[0::2] = v0 * c - v1 * s; out[1::2] = v0 * s + v1 * c
        return out

    def forward(self, token, pos):
        x = self.emb[token].copy()
        rep = self.n_heads // self.n_kv
        for l in range(self.n_layers):
            xb = self.rmsnorm(x, self.rms_att[l])
            q = self.rope(self.wq[l] @ xb, pos); k = self.rope(self.wk[l] @ xb, pos)
            self.kc[l, pos] = k; self.vc[l, pos] = self.wv[l] @ xb
            out = np.empty(self.dim, np.float32)
            for h in range(self.n_heads):
                g = h // rep
                qh = q[h * self.hs:(h + 1) * self.hs]
                keys = self.kc[l, :pos + 1, g * self.hs:(g + 1) * self.hs]
                att = keys @ qh / np.sqrt(np.float32(self.hs))
                att = np.exp(att - att.max()); att /= att.sum()
                out[h * self.hs:(h + 1) * self.hs] = att @ self.vc[l, :pos + 1, g * self.hs:(g + 1) * self.hs]
            x = x + self.wo[l] @ out
            xb = self.rmsnorm(x, self.rms_ffn[l])
            a = self.w1[l] @ xb
            x = x + self.w2[l] @ (a / (1 + np.exp(-a)) * (self.w3[l] @ xb))
        return self.wcls @ self.rmsnorm(x, self.rms_final)

    def greedy(self, steps, bos=1):
        self.reset(); token, out = bos, []
        for pos in range(steps):
            nxt = int(np.argmax(self.forward(token, pos)))
            if nxt == bos:
                break
            out.append(nxt); token = nxt
        return out


@pytest.fixture
def stories260k(shared_data):
    return os.path.join(shared_data, "stories260K.bin")


@pytest.fixture
def tok512(shared_data):
    return os.path.join(shared_data, "tok512.model")


def model_of(weights):
    model = Transformer(weights.config)
    model.load_state_dict(weights.state)
    return model.eval()


def random_weights(tie):
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=40, max_seq_len=48,
                      tie_embeddings=tie)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return Weights(cfg, model.state_dict(), None, "tinyfuse")


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- fidelity on stories260K

def test_stories260k_greedy_matches_numpy_llama2c(stories260k, tok512):
    expected = NumpyLlama2c(stories260k).greedy(256)
    assert len(expected) > 100
    from tinyfuse.engine.sample import generate

    ours = generate(model_of(load_checkpoint(stories260k)), [1], 256, temperature=0, stop=(1, 2))
    assert ours == expected
    result = run_cli("sample", "--checkpoint", stories260k, "--tokenizer", tok512, "--temperature", "0",
                     "--max-new-tokens", "256")
    assert result.returncode == 0, result.stderr
    import sentencepiece as spm

    assert result.stdout.rstrip("\n") == spm.SentencePieceProcessor(model_file=tok512).decode(expected)


def test_stories260k_eval_matches_numpy(stories260k, tok512, shared_data):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tok512)
    stories = data.read_stories(os.path.join(shared_data, "tinystories_val_1k.txt"))[:6]
    ref = NumpyLlama2c(stories260k)
    total, count, n_bytes = 0.0, 0, 0
    for story in stories:
        ids = ([1] + sp.encode(story))[:ref.seq + 1]  # cut to the context
        n_bytes += len(sp.decode(ids[1:]).encode("utf-8"))
        ref.reset()
        for pos in range(len(ids) - 1):
            logits = ref.forward(ids[pos], pos).astype(np.float64)
            total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[ids[pos + 1]]
            count += 1
    result = run_cli("eval", "--checkpoint", stories260k, "--tokenizer", tok512, "--data",
                     os.path.join(shared_data, "tinystories_val_1k.txt"), "--max-stories", "6", "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["tokens"] == count and got["stories"] == 6
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(np.exp(total / count), rel=1e-5)
    assert got["bytes"] == n_bytes and got["bpb"] == pytest.approx(total / np.log(2) / n_bytes, rel=1e-5)


# ---------------------------------------------------------------- round trips

def test_v0_import_export_is_byte_identical(stories260k, tmp_path):
    weights = load_checkpoint(stories260k)
    assert weights.format == "llama2c-v0" and weights.config.tie_embeddings
    c = weights.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len) == \
        (64, 172, 5, 8, 4, 512, 512)
    result = run_cli("export", "--checkpoint", stories260k, "--format", "llama2c-v0", "--out", str(tmp_path / "a.bin"))
    assert result.returncode == 0, result.stderr
    with open(stories260k, "rb") as f, open(tmp_path / "a.bin", "rb") as g:
        assert f.read() == g.read()
    export(weights, str(tmp_path / "v1.bin"), "llama2c-v1")
    v1 = load_checkpoint(str(tmp_path / "v1.bin"))
    assert v1.format == "llama2c-v1" and v1.config == weights.config and same_state(v1.state, weights.state)
    export(v1, str(tmp_path / "b.bin"), "llama2c-v0")
    with open(stories260k, "rb") as f, open(tmp_path / "b.bin", "rb") as g:
        assert f.read() == g.read()


@pytest.mark.parametrize("tie", [True, False])
def test_formats_round_trip(tie, tmp_path):
    weights = random_weights(tie)
    x = torch.randint(0, weights.config.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model_of(weights)(x)
    for fmt, path in (("llama2c-v0", "m0.bin"), ("llama2c-v1", "m1.bin"), ("hf", "hf")):
        export(weights, str(tmp_path / path), fmt)
        back = load_checkpoint(str(tmp_path / path))
        assert back.format == fmt and back.config == weights.config and same_state(back.state, weights.state)
        with torch.no_grad():
            assert torch.equal(model_of(back)(x), ref)
    with open(tmp_path / "m0.bin", "rb") as f:
        vocab = struct.unpack("<7i", f.read(28))[5]
    assert vocab == (97 if tie else -97), "an unshared classifier is a negative vocab_size in v0"
    with open(tmp_path / "m1.bin", "rb") as f:
        head = f.read(256)
    assert struct.unpack("<Ii", head[:8]) == (0x616B3432, 1) and head[36] == int(tie)


@pytest.mark.parametrize("tie", [True, False])
def test_each_formats_name_map_covers_the_model_once(tie):
    """llama2.c's and Hugging Face's name maps: every model tensor, no other, each foreign
    name once, and the parts' rows adding up to the model tensor's shape."""
    from tinyfuse.engine import hf_checkpoint, llama2c
    from tinyfuse.engine.weights import model_shapes, name_map

    cfg = random_weights(tie).config
    shapes = model_shapes(cfg)
    for names in (llama2c.NAMES, hf_checkpoint.NAMES):
        mapping = name_map(cfg, names)
        assert mapping.keys() == shapes.keys()
        for model_name, parts in mapping.items():
            assert (sum(shape[0] for _, shape in parts), *parts[0][1][1:]) == shapes[model_name], model_name
        foreign = [name for parts in mapping.values() for name, _ in parts]
        assert len(set(foreign)) == len(foreign)


def test_v0_header_that_looks_like_a_pickle_byte(tmp_path):
    """dim 384 is 0x180: the file starts with byte 0x80, as a pickle does."""
    cfg = ModelConfig(dim=384, n_layers=1, n_heads=6, vocab_size=32, hidden_dim=64, max_seq_len=8)
    weights = Weights(cfg, Transformer(cfg).state_dict(), None, "tinyfuse")
    export(weights, str(tmp_path / "m.bin"), "llama2c-v0")
    assert (tmp_path / "m.bin").read_bytes()[:1] == b"\x80"
    back = load_checkpoint(str(tmp_path / "m.bin"))
    assert back.format == "llama2c-v0" and same_state(back.state, weights.state)
    torch.save({"kind": "x"}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="a PyTorch file holding"):
        load_checkpoint(str(tmp_path / "legacy.pt"))


def llama2c_pt(ref, tied=True):
    """A checkpoint as llama2.c's train.py saves it, built from the numpy model's arrays."""
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    state = {"tok_embeddings.weight": t(ref.emb), "norm.weight": t(ref.rms_final)}
    for i in range(ref.n_layers):
        p = f"layers.{i}."
        state.update({p + "attention.wq.weight": t(ref.wq[i]), p + "attention.wk.weight": t(ref.wk[i]),
                      p + "attention.wv.weight": t(ref.wv[i]), p + "attention.wo.weight": t(ref.wo[i]),
                      p + "feed_forward.w1.weight": t(ref.w1[i]), p + "feed_forward.w2.weight": t(ref.w2[i]),
                      p + "feed_forward.w3.weight": t(ref.w3[i]), p + "attention_norm.weight": t(ref.rms_att[i]),
                      p + "ffn_norm.weight": t(ref.rms_ffn[i])})
    state["output.weight"] = state["tok_embeddings.weight"] if tied else t(ref.wcls) + 1
    args = dict(dim=ref.dim, n_layers=ref.n_layers, n_heads=ref.n_heads, n_kv_heads=ref.n_kv, vocab_size=ref.vocab,
                multiple_of=4, max_seq_len=ref.seq, dropout=0.0)
    return {"model": state, "model_args": args, "iter_num": 100, "best_val_loss": 1.3, "config": {}}


def test_llama2c_pt(stories260k, tmp_path):
    ref = NumpyLlama2c(stories260k)
    v0 = load_checkpoint(stories260k)
    obj = llama2c_pt(ref)
    torch.save(obj, tmp_path / "ckpt.pt")
    pt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert pt.format == "llama2c-pt" and same_state(pt.state, v0.state)
    assert pt.config == dataclasses.replace(v0.config, multiple_of=4), "hidden_dim is explicit; multiple_of is kept"
    compiled = {**obj, "model": {"_orig_mod." + k: v for k, v in obj["model"].items()}}
    torch.save(compiled, tmp_path / "compiled.pt")
    assert same_state(load_checkpoint(str(tmp_path / "compiled.pt")).state, v0.state)
    untied = llama2c_pt(ref, tied=False)
    torch.save(untied, tmp_path / "untied.pt")
    loaded = load_checkpoint(str(tmp_path / "untied.pt"))
    assert not loaded.config.tie_embeddings and torch.equal(loaded.state["output.weight"], untied["model"]["output.weight"])

    missing = {**obj, "model": {k: v for k, v in obj["model"].items() if k != "layers.3.attention.wk.weight"}}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing: layers\.3\.attention\.wk\.weight"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    extra = {**obj, "model": {**obj["model"], "layers.0.attention.bias": torch.zeros(3)}}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected: layers\.0\.attention\.bias"):
        load_checkpoint(str(tmp_path / "extra.pt"))
    wrong = {**obj, "model": {**obj["model"], "norm.weight": torch.ones(65)}}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"wrong shape: norm\.weight \(65,\) \(expected \(64,\)\)"):
        load_checkpoint(str(tmp_path / "wrong.pt"))
    odd_args = {**obj, "model_args": {**obj["model_args"], "n_expert": 8}}
    torch.save(odd_args, tmp_path / "args.pt")
    with pytest.raises(CheckpointError, match="unexpected model_args.*n_expert"):
        load_checkpoint(str(tmp_path / "args.pt"))


def transformers_or_skip():
    if os.environ.get("CI") == "true":
        pass  # CI installs the test extra, which has it
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("tie", [True, False])
def test_hf_export_loads_in_transformers(tie, tmp_path):
    transformers = transformers_or_skip()
    weights = random_weights(tie)
    export(weights, str(tmp_path / "hf"), "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    x = torch.randint(0, weights.config.vocab_size, (3, 40))
    with torch.no_grad():
        assert rel_err(hf(x).logits, model_of(weights)(x)) <= 1e-5


def test_hf_export_of_stories260k(stories260k, tok512, tmp_path):
    transformers = transformers_or_skip()
    result = run_cli("export", "--checkpoint", stories260k, "--format", "hf", "--tokenizer", tok512,
                     "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    weights = load_checkpoint(stories260k)
    x = torch.randint(0, 512, (2, 300))
    with torch.no_grad():
        assert rel_err(hf(x).logits, model_of(weights)(x)) <= 1e-5
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tok512)
    text = 'Once upon a time, Lily said: "Hi!"\n\nThe end, 123.'
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(text).input_ids == [1] + sp.encode(text)
    back = load_checkpoint(str(tmp_path / "hf"))
    assert back.format == "hf" and back.tokenizer is not None and same_state(back.state, weights.state)


# ---------------------------------------------------------------- bad input

def test_bad_files_give_one_clear_error(stories260k, tmp_path):
    with open(stories260k, "rb") as f:
        good = f.read()

    def write(name, blob):
        path = tmp_path / name
        path.write_bytes(blob)
        return str(path)

    cases = [
        (write("truncated.bin", good[:-1000]), r"truncated — a llama2\.c v0 file .* expects 1056540 bytes; the file has 1055540"),
        (write("long.bin", good + b"\0" * 8), r"longer than its header says .* expects 1056540 bytes; the file has 1056548"),
        (write("header.bin", struct.pack("<7i", 64, 172, 6, 8, 4, 512, 512) + good[28:]),
         r"6 layers.* expects 1238300 bytes; the file has 1056540"),
        (write("short.bin", good[:20]), r"truncated — 20 bytes, shorter than llama2\.c's 28-byte v0 header"),
        (write("magic.bin", b"GGUF" + b"\x03" * 400), r"first 4 bytes 0x46554747 are not llama2\.c's v1 magic 0x616b3432"),
        (write("v3.bin", struct.pack("<Ii", 0x616B3432, 3) + bytes(248)), r"version 3; expected version 1"),
        (write("v2.bin", struct.pack("<Ii", 0x616B3432, 2) + bytes(248)), r"version 2 \(int8-quantised\) is not supported"),
        (write("v1short.bin", struct.pack("<Ii", 0x616B3432, 1) + bytes(40)), r"shorter than llama2\.c's 256-byte v1 header"),
        (write("heads.bin", struct.pack("<7i", 64, 172, 5, 7, 4, 512, 512) + good[28:]), r"not a valid model .*divisible"),
        (write("damaged.pt", b"PK\x03\x04" + bytes(100)), r"a PyTorch file that cannot be read, truncated or damaged"),
    ]
    torch.save({"weights": 1}, tmp_path / "other.pt")
    cases.append((str(tmp_path / "other.pt"), r"a PyTorch file holding \['weights'\]; expected a tinyfuse checkpoint"))
    (tmp_path / "folder").mkdir()
    cases.append((str(tmp_path / "folder"), r"a folder without config\.json"))
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(str(tmp_path / "absent.bin"))
    result = run_cli("sample", "--checkpoint", cases[0][0], "--tokenizer", "unused.model")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "truncated" in result.stderr


def test_tokenizer_of_another_vocabulary_is_refused(stories260k, shared_data, tmp_path):
    other = os.path.join(shared_data, "tok4096.model")
    for command in (["sample"], ["eval", "--data", os.path.join(shared_data, "tinystories_val_1k.txt")],
                    ["export", "--format", "hf", "--out", str(tmp_path / "hf")]):
        result = run_cli(*command, "--checkpoint", stories260k, "--tokenizer", other)
        assert result.returncode == 2, command
        assert "has 4096 tokens; the model's vocabulary has 512" in result.stderr, result.stderr
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------- fine-tuning

def test_finetune_from_llama2c_and_export_back(stories260k, tok512, shared_data, tmp_path):
    prepared = str(tmp_path / "data")
    data.prepare(os.path.join(shared_data, "tinystories_val_1k.txt"), prepared, tokenizer=tok512,
                 val_fraction=0.05, quiet=True)
    out = str(tmp_path / "run")
    settings = dict(init_from=stories260k, data=prepared, out=out, device="cpu", batch_size=8, seq_len=256,
                    max_steps=40, lr=5e-4, min_lr=5e-5, warmup_steps=5, log_every=1, eval_every=10, eval_batches=4,
                    ckpt_every=40, sample_tokens=0)
    trainer = Trainer(resolve_run(TrainConfig(**settings)), quiet=True)
    start_val = trainer.evaluate()
    trainer.close()  # a live trainer holds the run folder
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    result = run_cli("train", *flags)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert records[0]["loss"] < 2.2, "a fine-tune starts at the checkpoint's loss (~1.5), not a random model's (~6.2)"
    val = [start_val] + [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 5 and all(b < a for a, b in zip(val, val[1:])) and val[-1] < val[0] - 0.02, val
    ckpt = os.path.join(out, "ckpt_000040.pt")
    result = run_cli("export", "--checkpoint", ckpt, "--format", "llama2c-v0", "--out", str(tmp_path / "ft.bin"))
    assert result.returncode == 0, result.stderr
    tuned, again = load_checkpoint(ckpt), load_checkpoint(str(tmp_path / "ft.bin"))
    assert again.format == "llama2c-v0" and again.config == tuned.config and same_state(again.state, tuned.state)
    assert not same_state(tuned.state, load_checkpoint(stories260k).state)
    ref = NumpyLlama2c(str(tmp_path / "ft.bin"))
    with torch.no_grad():
        ours = model_of(again)(torch.tensor([[1, 403, 407, 261]]))[0, -1].numpy()
    for pos, token in enumerate([1, 403, 407, 261]):
        theirs = ref.forward(token, pos)
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-5
