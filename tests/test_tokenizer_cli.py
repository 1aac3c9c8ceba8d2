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


def _ids(out):
    meta = json.loads((out / "meta.json").read_text())
    return meta, np.concatenate([np.load(out / name) for name in meta["shards"]]).tolist()


def test_tokenize_a_folder_a_quoted_glob_and_jsonl(tmp_path, capsys):
    enc = tiktoken.get_encoding("gpt2")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "b.txt").write_text("the second file\n", encoding="utf-8")
    (corpus / "a.txt").write_text("the first file\n", encoding="utf-8")
    (corpus / "c.jsonl").write_text('{"text": "line one"}\n\n{"text": "line two", "id": 2}\n', encoding="utf-8")
    (corpus / "README.md").write_text("not a document", encoding="utf-8")
    assert main(["tokenize", str(corpus), "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    assert "from 3 file(s) (4 documents)" in capsys.readouterr().out
    meta, ids = _ids(tmp_path / "f")
    eot = [enc.eot_token]
    texts = enc.encode_ordinary("the first file\n") + eot + enc.encode_ordinary("the second file\n") + eot
    expected = texts + enc.encode_ordinary("line one") + eot + enc.encode_ordinary("line two") + eot
    assert ids == expected and meta["documents"] == 4
    assert [p.rsplit("/", 1)[1] for p in meta["sources"]] == ["a.txt", "b.txt", "c.jsonl"]
    assert len(meta["source_sha256"]) == 3
    assert main(["tokenize", str(corpus / "*.txt"), "--out", str(tmp_path / "g"), "--no-progress"]) == 0
    assert _ids(tmp_path / "g")[1] == texts


def test_tokenize_input_errors_name_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n["not", "an object"]\n', encoding="utf-8")
    assert main(["tokenize", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (f"gptfast tokenize: error: {bad}, line 2: is a JSON list, not an "
                                               'object; each line must be one object such as {"text": "..."}')
    assert not (tmp_path / "o").exists()
    assert main(["tokenize", str(tmp_path / "none-*.txt"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "none-*.txt matches no file" in capsys.readouterr().err
    good = tmp_path / "good.txt"
    good.write_text("some text\n", encoding="utf-8")
    assert main(["tokenize", str(good), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert main(["tokenize", str(tmp_path / "s"), "--out", str(tmp_path / "t"), "--no-progress"]) == 2
    assert "is already tokenized (it holds meta.json)" in capsys.readouterr().err
