"""`tinyfuse prepare`: sources, tokenizer, shards, manifest, --verify, and the download path."""
import hashlib
import io
import json
import os
import re
import tarfile

import numpy as np
import pytest

from helpers import local_hub, run_cli
from tinyfuse.engine import data, shards, synthetic


def test_synthetic_stories_are_deterministic_simple_stories():
    a, b = synthetic.stories(7, 300), synthetic.stories(7, 300)
    assert a == b
    assert a != synthetic.stories(8, 300)
    assert synthetic.story(7, 123) == a[123], "a story depends only on the seed and its index"
    assert len(set(a)) > 290, "stories should vary"
    words = {w for s in a for w in re.findall(r"[a-z]+", s.lower())}
    assert 150 < len(words) < 700, f"a small everyday vocabulary, got {len(words)} words"
    for s in a:
        assert s[0].isupper() and s.rstrip()[-1] in '.!"', s
        assert 150 < len(s) < 2000
    assert sum('"' in s for s in a) > 250, "most stories have dialogue"
    openings = {s.split(",")[0] for s in a}
    assert len(openings) >= 5


def test_prepare_with_tokenizer_matches_sentencepiece(tmp_path, shared_data):
    import sentencepiece as spm

    text = os.path.join(shared_data, "tinystories_val_1k.txt")
    tok = os.path.join(shared_data, "tok512.model")
    out = tmp_path / "prepared"
    result = run_cli("prepare", "--source", text, "--tokenizer", tok, "--out", str(out),
                     "--val-fraction", "0.05", "--shard-tokens", "100000", "--workers", "2")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab_size"] == 512 and manifest["bos_id"] == 1 and manifest["eos_id"] == 2
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(open(tok, "rb").read()).hexdigest()
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    val = [s for s in manifest["shards"] if s["split"] == "val"]
    assert len(train) > 1 and len(val) == 1
    assert sum(s["stories"] for s in manifest["shards"]) == 1000

    # The shards are exactly BOS + SentencePiece's own encoding of each story, in corpus order.
    stories = [s.strip() for s in open(text, encoding="utf-8").read().split("<|endoftext|>") if s.strip()]
    train_stories, val_stories = data.split_stories(stories, 0.05, 0)
    assert len(val_stories) == 50
    sp = spm.SentencePieceProcessor(model_file=tok)
    for split, chosen in (("train", train_stories), ("val", val_stories)):
        expected = np.concatenate([np.array([1] + sp.encode(s), dtype=np.uint16) for s in chosen])
        shards = [s for s in manifest["shards"] if s["split"] == split]
        got = np.concatenate([np.fromfile(out / s["file"], dtype="<u2") for s in shards])
        assert np.array_equal(got, expected)
        for s in shards:
            assert os.path.getsize(out / s["file"]) == 2 * s["tokens"]
    assert run_cli("prepare", "--verify", str(out)).returncode == 0


def test_synthetic_prepare_is_byte_identical_and_verifies(tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = run_cli("prepare", "--out", str(out), "--stories", "2000", "--vocab-size", "400", "--seed", "3")
        assert result.returncode == 0, result.stderr
        outs.append(out)
    files = sorted(os.listdir(outs[0]))
    assert files == ["manifest.json", "tokenizer.model", "train_000.bin", "val_000.bin"]
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f"{f} differs between two runs"
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    assert manifest["vocab_size"] == 400 and manifest["tokenizer"]["source"] == "trained"
    tokens = np.fromfile(outs[0] / "train_000.bin", dtype="<u2")
    assert tokens[0] == manifest["bos_id"] and tokens.max() < 400
    assert (tokens == manifest["bos_id"]).sum() == [s for s in manifest["shards"] if s["split"] == "train"][0]["stories"]
    assert run_cli("prepare", "--verify", str(outs[0])).returncode == 0


def test_verify_catches_corruption(tmp_path):
    out = tmp_path / "p"
    data.prepare("synthetic", str(out), vocab_size=400, stories=300, quiet=True)
    assert shards.verify(str(out)) == []
    shard = out / "train_000.bin"
    tokens = np.fromfile(shard, dtype="<u2")
    tokens[5] = 400  # one token beyond the vocabulary
    tokens.tofile(shard)
    result = run_cli("prepare", "--verify", str(out))
    assert result.returncode == 1 and "token 400 is not below the vocabulary size 400" in result.stderr
    tokens[:-1].tofile(shard)  # truncated
    assert any("bytes, expected" in p for p in shards.verify(str(out)))
    (out / "tokenizer.model").write_bytes(b"junk")
    assert any("sha256" in p for p in shards.verify(str(out)))
    os.remove(out / "manifest.json")
    assert "tinyfuse prepare" in shards.verify(str(out))[0]


def test_path_sources_json_folder_and_blank_lines(tmp_path):
    folder = tmp_path / "json"
    folder.mkdir()
    stories = synthetic.stories(1, 40)
    for i in range(2):
        (folder / f"data{i:02d}.json").write_text(json.dumps([{"story": s} for s in stories[i * 20:(i + 1) * 20]]))
    assert data.read_stories(str(folder)) == stories
    text = tmp_path / "plain.txt"
    text.write_text("One story.\nStill the first.\n\nThe second story.\n\n\n  The third.  \n")
    assert data.read_stories(str(text)) == ["One story.\nStill the first.", "The second story.", "The third."]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"text": "no story field"}]))
    with pytest.raises(data.DataError, match='"story"'):
        data.read_stories(str(bad))


def test_prepare_bad_input(tmp_path):
    result = run_cli("prepare", "--source", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "no such file or folder" in result.stderr
    result = run_cli("prepare", "--tokenizer", "x.model", "--vocab-size", "400", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "not allowed with" in result.stderr
    with pytest.raises(data.DataError, match="at least 260"):
        data.prepare("synthetic", str(tmp_path / "o"), vocab_size=100, stories=10)
    with pytest.raises(data.DataError, match="not a SentencePiece model"):
        junk = tmp_path / "junk.model"
        junk.write_bytes(b"not a model")
        data.prepare("synthetic", str(tmp_path / "o"), tokenizer=str(junk), stories=10)


@pytest.fixture
def hub():
    with local_hub() as served:
        yield served


def test_download_resumes_and_checks_sha256(tmp_path, hub):
    server, url = hub
    body = os.urandom(300_000)
    server.files["blob.bin"] = body
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(body[:120_000])  # an interrupted earlier download
    data.download(f"{url}/blob.bin", str(dest), quiet=True)
    assert dest.read_bytes() == body
    assert server.ranges == [120_000], "the partial file should be resumed, not downloaded again"
    assert not (tmp_path / "blob.bin.part").exists()

    server.etags["bad.bin"] = "0" * 64
    server.files["bad.bin"] = body
    with pytest.raises(data.DataError, match="sha256"):
        data.download(f"{url}/bad.bin", str(tmp_path / "bad.bin"), quiet=True)
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.bin.part").exists()
    with pytest.raises(data.DataError, match="404"):
        data.download(f"{url}/missing.bin", str(tmp_path / "missing.bin"), quiet=True)


def test_tinystories_source_from_a_local_hub(tmp_path, hub):
    server, url = hub
    stories = synthetic.stories(5, 60)
    server.files["TinyStoriesV2-GPT4-train.txt"] = "\n<|endoftext|>\n".join(stories[:50]).encode()
    server.files["TinyStoriesV2-GPT4-valid.txt"] = "\n<|endoftext|>\n".join(stories[50:]).encode()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for i in range(2):
            payload = json.dumps([{"story": s} for s in stories[i * 30:(i + 1) * 30]]).encode()
            info = tarfile.TarInfo(f"data{i:02d}.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    server.files["TinyStories_all_data.tar.gz"] = archive.getvalue()

    v2 = data.tinystories("v2", cache_dir=str(tmp_path / "cache"), hub_url=url, quiet=True)
    assert v2["train"] == stories[:50] and v2["val"] == stories[50:]
    original = data.tinystories("json", cache_dir=str(tmp_path / "cache"), hub_url=url, quiet=True)
    assert original["train"] == stories and original["val"] is None

    out = tmp_path / "out"
    result = run_cli("prepare", "--source", "tinystories", "--tinystories-format", "v2", "--hub-url", url,
                     "--cache-dir", str(tmp_path / "cache2"), "--vocab-size", "400", "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["stories"] for s in manifest["shards"] if s["split"] == "val") == 10
