"""``gptfast tokenize``: shards hold exactly tiktoken's ids with the eot token after each document."""

import hashlib
import json

import numpy as np
import pytest

tiktoken = pytest.importorskip("tiktoken")

from gptfast.cli import main  # noqa: E402
from gptfast.tokenizer import Tokenizer  # noqa: E402


def _docs(tmp_path, shared_data):
    verdict = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
    texts = [verdict, "second  document\n\n\n  with <|endoftext|> inside\n\tand 日本語\n" * 50, "x"]
    paths = []
    for i, t in enumerate(texts):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(t, encoding="utf-8", newline="")
        paths.append(p)
    return texts, paths


@pytest.mark.parametrize("chunk", [4 << 20, 64])
def test_tokenize_shards_match_tiktoken(tmp_path, shared_data, chunk, capsys):
    enc = tiktoken.get_encoding("gpt2")
    texts, paths = _docs(tmp_path, shared_data)
    out = tmp_path / "shards"
    rc = main(["tokenize", *map(str, paths), "--out", str(out), "--shard-tokens", "1000", "--num-threads", "2",
               "--chunk-bytes", str(chunk), "--no-progress"])
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    expected = []
    for t in texts:
        expected += enc.encode_ordinary(t) + [enc.eot_token]
    ids = np.concatenate([np.load(out / name) for name in meta["shards"]])
    assert ids.dtype == np.uint16
    assert ids.tolist() == expected
    assert meta["num_tokens"] == len(expected) == sum(meta["shard_tokens"])
    assert meta["tokenizer"] == "gpt2" and meta["n_vocab"] == 50257 and meta["eot_token"] == 50256
    assert meta["dtype"] == "uint16"
    assert all(n == 1000 for n in meta["shard_tokens"][:-1])
    assert meta["source_sha256"] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", *meta["shards"]]  # no temporary files


def test_tokenize_errors(tmp_path, capsys):
    big = Tokenizer({bytes([b]): b for b in range(256)}, {"<|endoftext|>": 70000})
    big.save(tmp_path / "big.tiktoken")
    doc = tmp_path / "a.txt"
    doc.write_text("hello", encoding="utf-8")
    assert main(["tokenize", str(doc), "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "big.tiktoken")]) == 2
    assert "65,536" in capsys.readouterr().err
    assert main(["tokenize", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_tokenize_with_trained_tokenizer(tmp_path, shared_data):
    texts, paths = _docs(tmp_path, shared_data)
    tok = Tokenizer.train(texts[:1], 256 + 50 + 1, progress=False)
    tok.save(tmp_path / "small.tiktoken")
    out = tmp_path / "s"
    assert main(["tokenize", str(paths[0]), "--out", str(out), "--tokenizer", str(tmp_path / "small.tiktoken"),
                 "--no-progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    ids = np.load(out / meta["shards"][0]).tolist()
    assert ids == tok.encode_ordinary(texts[0]) + [tok.eot_token]
