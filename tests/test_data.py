"""Data: the book's chapter-2 loader (published first batch), and token shards (format, splits, windows, errors)."""

import json

import numpy as np
import pytest
import tiktoken
import torch

from gptfast.data import (MAX_VOCAB, DataError, GPTDatasetV1, TokenShards, create_dataloader_v1, open_token_data,
                          split_tokens, tokenize_text_files, write_shards)


@pytest.fixture(scope="module")
def tok():
    return tiktoken.get_encoding("gpt2")


def test_book_dataloader_first_batch(shared_data, tok):
    text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
    loader = create_dataloader_v1(text, batch_size=1, max_length=4, stride=1, shuffle=False, tokenizer=tok)
    inputs, targets = next(iter(loader))
    assert inputs.tolist() == [[40, 367, 2885, 1464]]  # the book's chapter-2 output
    assert targets.tolist() == [[367, 2885, 1464, 1807]]
    # the default tokenizer is GPT-2's too
    assert next(iter(create_dataloader_v1(text, batch_size=1, max_length=4, stride=1, shuffle=False)))[0].tolist() \
        == [[40, 367, 2885, 1464]]


def test_dataset_windows_match_a_plain_recomputation(tok):
    text = "In the beginning there was a sliding window, and it moved by its stride. <|endoftext|> The end."
    ids = tok.encode(text, allowed_special={"<|endoftext|>"})
    ds = GPTDatasetV1(text, tok, max_length=5, stride=3)
    starts = list(range(0, len(ids) - 5, 3))
    assert len(ds) == len(starts)
    for i, s in enumerate(starts):
        x, y = ds[i]
        assert x.tolist() == ids[s:s + 5] and y.tolist() == ids[s + 1:s + 6]


def _corpus(tmp_path, lengths=(300, 200, 150), shard_tokens=250, n_vocab=256):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, n_vocab - 1, size=n) for n in lengths]
    folder = tmp_path / "shards"
    write_shards(docs, str(folder), "gpt2", n_vocab, n_vocab - 1, shard_tokens=shard_tokens)
    return docs, folder


def test_shards_round_trip_with_eot_between_documents(tmp_path):
    docs, folder = _corpus(tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["n_vocab"] == 256 and meta["eot_token"] == 255
    assert meta["num_tokens"] == sum(len(d) + 1 for d in docs)
    assert meta["shards"] == ["shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]  # 653 tokens, 250 a shard
    stream = np.concatenate([np.load(folder / s) for s in meta["shards"]])
    assert stream.dtype == np.uint16
    expected = np.concatenate([np.append(d, 255) for d in docs])
    assert np.array_equal(stream, expected)
    shards = TokenShards(str(folder))
    assert shards.num_tokens == len(expected) and isinstance(shards.arrays[0], np.memmap)


def test_split_and_windows_read_the_right_tokens(tmp_path):
    docs, folder = _corpus(tmp_path)
    stream = np.concatenate([np.append(d, 255) for d in docs])
    train, val = split_tokens([TokenShards(str(folder))], 0.2)
    n_val = round(len(stream) * 0.2)
    assert (train.num_tokens, val.num_tokens) == (len(stream) - n_val, n_val)
    val_tokens = np.concatenate([np.asarray(a[s:e]) for a, s, e in val.segments])
    assert np.array_equal(val_tokens, stream[-n_val:])
    # every window is a contiguous run of the stream, targets shifted by one
    x, y = train.random_batch(6, 16, key=(1, 0, 0))
    assert x.shape == (6, 16) and x.dtype == torch.long
    text = stream[: len(stream) - n_val].tolist()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert row_x[1:] == row_y[:-1]
        starts = [i for i in range(len(text) - 16) if text[i:i + 17] == row_x + row_y[-1:]]
        assert starts, "a window that is not in the training split"
    fixed = [b[0] for b in val.eval_batches(2, 16, 3)]
    assert len(fixed) == 3 and all(torch.equal(a, b[0]) for a, b in zip(fixed, val.eval_batches(2, 16, 3)))


def test_random_batches_are_keyed_and_ranks_slice_the_global_batch(tmp_path):
    _, folder = _corpus(tmp_path)
    train, _ = TokenShards(str(folder)).split(0.1)
    a, _ = train.random_batch(4, 8, key=(7, 3, 0))
    assert torch.equal(a, train.random_batch(4, 8, key=(7, 3, 0))[0])
    assert not torch.equal(a, train.random_batch(4, 8, key=(7, 4, 0))[0])
    whole, _ = train.random_batch(4, 8, key=(7, 3, 0), world_size=1)
    parts = [train.random_batch(2, 8, key=(7, 3, 0), rank=r, world_size=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


def test_text_files_are_tokenized_once_and_cached(tmp_path, tok):
    f1, f2 = tmp_path / "a.txt", tmp_path / "b.txt"
    f1.write_text("First document.", encoding="utf-8")
    f2.write_text("Second <|endoftext|> one.", encoding="utf-8")
    shards = tokenize_text_files([str(f1), str(f2)], str(tmp_path / "cache"), tok)
    expected = tok.encode("First document.") + [50256] + tok.encode("Second <|endoftext|> one.",
                                                                      allowed_special={"<|endoftext|>"}) + [50256]
    assert np.concatenate([np.asarray(a) for a in shards.arrays]).tolist() == expected
    assert shards.tokenizer_name == "gpt2" and shards.n_vocab == 50257
    mtime = (tmp_path / "cache" / "meta.json").stat().st_mtime_ns
    tokenize_text_files([str(f1), str(f2)], str(tmp_path / "cache"), tok)
    assert (tmp_path / "cache" / "meta.json").stat().st_mtime_ns == mtime  # reused, not rewritten


def test_text_sources_are_hashed_and_bad_utf8_is_named(tmp_path, tok):
    import hashlib

    from gptfast.data import data_fingerprint, data_sources

    good, bad = tmp_path / "a.txt", tmp_path / "b.txt"
    good.write_text("First document.", encoding="utf-8")
    bad.write_bytes(b"ok\nline two \xff\n")
    shards = tokenize_text_files([str(good)], str(tmp_path / "cache"), tok)
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    assert data_sources([shards]) == [{"path": str(good.resolve()), "sha256": digest}]
    before = data_fingerprint([shards])
    good.write_text("First Document.", encoding="utf-8")  # same length, other bytes
    assert data_fingerprint([tokenize_text_files([str(good)], str(tmp_path / "cache"), tok)]) != before
    with pytest.raises(DataError, match=r"b\.txt is not UTF-8 text \(byte 12, line 2: invalid start byte\)"):
        tokenize_text_files([str(good), str(bad)], str(tmp_path / "other"), tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "cache"]  # no other.tmp-N


def test_bad_data_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_token_data([str(tmp_path / "missing.txt")], str(tmp_path / "c"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        open_token_data([str(empty)], str(tmp_path / "c"))
    with pytest.raises(DataError, match="meta.json"):
        TokenShards(str(tmp_path))
    with pytest.raises(DataError, match="uint16"):
        write_shards([np.arange(3)], str(tmp_path / "big"), "big", MAX_VOCAB + 1, 0)
    _, folder = _corpus(tmp_path, lengths=(40,))
    train, val = TokenShards(str(folder)).split(0.5)
    with pytest.raises(DataError, match="fewer than one window of context_length \\+ 1 = 33"):
        val.check(32)
    with pytest.raises(DataError, match="outside the vocabulary"):
        write_shards([np.array([1, 999])], str(tmp_path / "oov"), "gpt2", 256, 255)


# ---- DATA as folders, globs and JSONL -------------------------------------------------------------


def test_expand_text_sources_folders_globs_and_shard_folders(tmp_path, monkeypatch):
    from gptfast.data import expand_text_sources

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for name in ("b.txt", "a.jsonl", "c.txt", "notes.md", "sub/d.txt"):
        (corpus / name).write_text("x", encoding="utf-8")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "meta.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    assert expand_text_sources(["corpus"]) == ["corpus/a.jsonl", "corpus/b.txt", "corpus/c.txt"]
    assert expand_text_sources(["corpus/*.txt", "corpus/b.txt"]) == ["corpus/b.txt", "corpus/c.txt"]
    assert expand_text_sources(["shards", "corpus/sub/d.txt"]) == ["shards", "corpus/sub/d.txt"]
    assert expand_text_sources(["shards/meta.json"]) == ["shards/meta.json"]
    assert expand_text_sources(["*"]) == ["corpus/a.jsonl", "corpus/b.txt", "corpus/c.txt", "shards"]
    for paths, message in [(["nothing/*.txt"], "matches no file"), (["corpus/sub/none.txt"], "does not exist"),
                           (["empt?"], "matches only folders"), ([str(tmp_path / "shards" / "x")], "does not exist")]:
        with pytest.raises(DataError, match=message):
            expand_text_sources(paths)
    with pytest.raises(DataError, match="no .txt or .jsonl files and no meta.json"):
        expand_text_sources(["empty"])


def test_a_folder_and_its_files_give_the_same_data_and_fingerprint(tmp_path, tok):
    from gptfast.data import data_fingerprint, data_sources

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "one.txt").write_text("the first document, " * 20, encoding="utf-8")
    (corpus / "two.jsonl").write_text('{"text": "a line"}\n{"text": "another line"}\n', encoding="utf-8")
    by_folder = open_token_data([str(corpus)], str(tmp_path / "c1"), tok)
    by_files = open_token_data([str(corpus / "one.txt"), str(corpus / "two.jsonl")], str(tmp_path / "c2"), tok)
    assert data_sources(by_folder) == data_sources(by_files)
    assert data_fingerprint(by_folder) == data_fingerprint(by_files)
    ids = np.concatenate([np.asarray(a) for a in by_folder[0].arrays]).tolist()
    eot = [tok.eot_token]
    assert ids == (tok.encode("the first document, " * 20) + eot + tok.encode("a line") + eot
                   + tok.encode("another line") + eot)


@pytest.mark.parametrize("content,message", [
    (b'{"text": "ok"}\n{"text": "cut', "line 2: not valid JSON"),
    (b'{"body": "x"}\n', 'line 1: has no "text" field'),
    (b'\n\n"just a string"\n', "line 3: is a JSON str, not an object"),
    (b'{"text": "ok"}\n{"text": "\xff"}\n', "line 2: not UTF-8 text"),
])
def test_jsonl_errors_name_the_file_and_the_line(tmp_path, content, message):
    from gptfast.data import jsonl_documents

    path = tmp_path / "docs.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{path}, {message}"):
        list(jsonl_documents(path))
