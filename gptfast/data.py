"""Training data: the book's sliding-window dataset, and token shards for real runs.

The book (chapter 2) tokenizes one text in memory and cuts it into overlapping windows
(:class:`GPTDatasetV1`, :func:`create_dataloader_v1`). A real corpus does not fit in memory, so the
trainer reads **token shards** instead -- one format whether they come from ``gptfast tokenize`` or
from plain text files that ``gptfast train`` tokenizes itself:

* ``shard-00000.npy``, ``shard-00001.npy``, ...: 1-D ``uint16`` arrays of token ids, read with
  ``numpy.load(mmap_mode="r")`` so only the windows a batch needs are paged in;
* documents follow each other with the tokenizer's end-of-text token between them;
* ``meta.json``: ``{"tokenizer": "gpt2", "n_vocab": 50257, "eot_token": 50256, "dtype": "uint16",
  "shards": ["shard-00000.npy", ...], "num_tokens": N}``.

:class:`TokenShards` opens such a folder; :meth:`TokenShards.split` cuts off the last tokens as the
validation split; :meth:`TokenSplit.random_batch` draws random windows, seeded by the step number so
that a resumed run reads exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

META_FILE = "meta.json"
TEXT_SUFFIXES = (".txt", ".jsonl")  # what a folder of documents is read for
JSONL_KEY = "text"
SHARD_DTYPE = np.uint16
MAX_VOCAB = int(np.iinfo(SHARD_DTYPE).max) + 1  # ids 0..65535 fit a uint16


class DataError(ValueError):
    """Training data that cannot be used; the message says what is wrong and how to fix it."""


def default_tokenizer():
    """GPT-2's BPE: gptfast's own tokenizer when it is available, else tiktoken's (identical ids)."""
    try:
        from .tokenizer import Tokenizer

        return Tokenizer.gpt2()
    except ImportError:
        import tiktoken

        return tiktoken.get_encoding("gpt2")


def tokenizer_by_name(name: str):
    """The tokenizer ``meta.json`` names: ``gpt2`` (see :func:`default_tokenizer`) or a tiktoken encoding."""
    if name in ("gpt2", "r50k_base"):
        return default_tokenizer()
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except ValueError as e:
        raise DataError(f"unknown tokenizer {name!r} ({e})") from None


# --------------------------------------------------------------------------------------------------
# The book's chapter-2 dataset and loader
# --------------------------------------------------------------------------------------------------


class GPTDatasetV1(Dataset):
    """The book's dataset: ``txt`` tokenized once, cut into windows of ``max_length`` tokens every
    ``stride`` tokens; item i is ``(input_ids, target_ids)``, the targets shifted by one token.

    >>> import tiktoken
    >>> ds = GPTDatasetV1("a b c d e f", tiktoken.get_encoding("gpt2"), max_length=2, stride=2)
    >>> len(ds), ds[0][0].tolist(), ds[0][1].tolist()
    (2, [64, 275], [275, 269])
    """

    def __init__(self, txt, tokenizer, max_length, stride):
        self.tokenizer = tokenizer
        self.input_ids = []
        self.target_ids = []
        token_ids = tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
        for i in range(0, len(token_ids) - max_length, stride):
            input_chunk = token_ids[i:i + max_length]
            target_chunk = token_ids[i + 1:i + max_length + 1]
            self.input_ids.append(torch.tensor(input_chunk))
            self.target_ids.append(torch.tensor(target_chunk))

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, idx):
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader_v1(txt, batch_size=4, max_length=256, stride=128, shuffle=True, drop_last=True,
                         num_workers=0, tokenizer=None):
    """The book's loader over :class:`GPTDatasetV1`, GPT-2's tokenizer unless ``tokenizer`` is given."""
    tokenizer = default_tokenizer() if tokenizer is None else tokenizer
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers)


# --------------------------------------------------------------------------------------------------
# Writing shards
# --------------------------------------------------------------------------------------------------


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name", None) or "gpt2"


def check_vocab(n_vocab: int, where: str) -> None:
    if n_vocab > MAX_VOCAB:
        raise DataError(
            f"{where}: the vocabulary has {n_vocab} ids, but token shards store uint16 ids (at most {MAX_VOCAB}); "
            f"use a tokenizer with at most {MAX_VOCAB} tokens"
        )


def write_shards(documents, folder: str, tokenizer_name: str, n_vocab: int, eot_token: int,
                 shard_tokens: int = 100_000_000, extra_meta: dict | None = None) -> dict:
    """Write token documents (an iterable of 1-D integer arrays) as shards plus ``meta.json``.

    Each document is followed by ``eot_token``. Everything is written into a temporary folder that is
    renamed to ``folder`` at the end, so a crash never leaves a half-written data set. Returns the meta.
    """
    check_vocab(n_vocab, folder)
    tmp = f"{folder.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        meta = _write_shards_into(tmp, documents, tokenizer_name, n_vocab, eot_token, shard_tokens, extra_meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves no half data set behind
        raise
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return meta


def _write_shards_into(tmp, documents, tokenizer_name, n_vocab, eot_token, shard_tokens, extra_meta):
    shards, pending, pending_n, total = [], [], 0, 0

    def flush():
        nonlocal pending, pending_n
        name = f"shard-{len(shards):05d}.npy"
        np.save(os.path.join(tmp, name), np.concatenate(pending).astype(SHARD_DTYPE, copy=False))
        shards.append(name)
        pending, pending_n = [], 0

    for doc in documents:
        doc = np.asarray(doc)
        if doc.size and (doc.min() < 0 or doc.max() >= n_vocab):
            raise DataError(f"a document holds token id {int(doc.max())} outside the vocabulary of {n_vocab}")
        piece = np.concatenate([doc.astype(np.int64), [eot_token]])
        while piece.size:
            take = piece[: shard_tokens - pending_n]
            pending.append(take)
            pending_n += take.size
            total += take.size
            piece = piece[take.size:]
            if pending_n == shard_tokens:
                flush()
    if pending_n:
        flush()
    meta = {"tokenizer": tokenizer_name, "n_vocab": int(n_vocab), "eot_token": int(eot_token),
            "dtype": "uint16", "shards": shards, "num_tokens": int(total)}
    meta.update(extra_meta or {})
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def _stat_sources(paths) -> list:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append({"path": os.path.abspath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def decode_utf8(data: bytes, path) -> str:
    """``data.decode("utf-8")``, or a :class:`DataError` naming the file, the byte and the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, e.start, data.count(b"\n", 0, e.start) + 1, e.reason) from None


def not_utf8(path, byte: int, line: int, reason: str) -> DataError:
    """The error for a file that is not UTF-8 at ``byte`` (0-based) on ``line`` (1-based)."""
    return DataError(f"{path} is not UTF-8 text (byte {byte:,}, line {line:,}: {reason}); convert it to UTF-8 "
                     f"first, e.g. with `iconv -f latin1 -t utf-8`")


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def expand_text_sources(paths, suffixes=TEXT_SUFFIXES) -> list[str]:
    """DATA arguments -> files and shard folders, in a fixed order.

    * a file stays as it is;
    * a shard folder (one with ``meta.json``), or its ``meta.json``, stays a shard folder;
    * another folder stands for the files in it (not below) whose names end in ``suffixes``
      (``.txt`` and ``.jsonl``), sorted by name;
    * a pattern with ``*``, ``?`` or ``[...]`` that names no file itself (the shell did not expand
      it, e.g. it was quoted) is expanded here: the files it matches, sorted; a folder it matches
      counts as above.

    A path that names nothing, a pattern that matches nothing and a folder without such files raise
    :class:`DataError`. A path given twice is read once."""
    out = []
    for p in paths:
        p = os.fspath(p)
        if not os.path.exists(p) and _has_glob(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise DataError(f"{p} matches no file: check the pattern (it is expanded relative to "
                                f"{os.getcwd()})")
            out += _expand_one_level(matches, suffixes, pattern=p)
        else:
            out += _expand_one_level([p], suffixes)
    return list(dict.fromkeys(out))


def _expand_one_level(paths, suffixes, pattern=None):
    out = []
    for p in paths:
        if os.path.isdir(p) and not os.path.isfile(os.path.join(p, META_FILE)):
            files = sorted(os.path.join(p, n) for n in os.listdir(p)
                           if n.endswith(tuple(suffixes)) and os.path.isfile(os.path.join(p, n)))
            if not files:
                if pattern is not None:
                    continue  # a pattern's folder match without documents: the pattern's files count
                raise DataError(f"{p} is a folder with no {' or '.join(suffixes)} files and no {META_FILE}: pass "
                                f"a folder of text files, or one written by `gptfast tokenize`")
            out += files
        elif os.path.isdir(p) or os.path.isfile(p):
            out.append(p)
        else:
            raise DataError(f"{p} does not exist")
    if pattern is not None and not out:
        raise DataError(f"{pattern} matches only folders without {' or '.join(suffixes)} files")
    return out


def is_jsonl(path) -> bool:
    return os.fspath(path).endswith(".jsonl")


def jsonl_documents(path, key: str = JSONL_KEY, data: bytes | None = None):
    """The documents of a JSONL file: ``(line_number, text)`` for each line ``{"text": "..."}`` (blank
    lines are skipped). A line that is not JSON, not an object, or has no string ``key`` raises
    :class:`DataError` naming the file and the line. ``data``: the file's bytes, when already read."""
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}, line {number}: not UTF-8 text ({e.reason} at byte {e.start} of the line); "
                            f"convert the file to UTF-8 first") from None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}); each line must "
                            f"be one object such as {{\"{key}\": \"...\"}}") from None
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            what = ("has no \"%s\" field" % key if isinstance(record, dict) and key not in record
                    else f"its \"{key}\" is not a string" if isinstance(record, dict)
                    else f"is a JSON {type(record).__name__}, not an object")
            raise DataError(f"{path}, line {number}: {what}; each line must be one object such as "
                            f"{{\"{key}\": \"...\"}}")
        yield number, record[key]


def tokenize_text_files(paths, folder: str, tokenizer=None, shard_tokens: int = 100_000_000) -> "TokenShards":
    """Tokenize plain text files (one document each) and JSONL files (``.jsonl``: one document per line,
    ``{"text": ...}``) into shards in ``folder``; reuse them when the files have not changed since
    (same paths, sizes and modification times).

    ``meta.json``'s ``sources`` records each file's path, size, modification time and the sha256 of
    its bytes (what :func:`data_sources` reports). A file that is not UTF-8 raises :class:`DataError`
    naming it, and leaves ``folder`` as it was.
    """
    tokenizer = default_tokenizer() if tokenizer is None else tokenizer
    sources = _stat_sources(paths)
    meta_path = os.path.join(folder, META_FILE)
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                old = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}  # a damaged cache is rebuilt
        recorded = [{k: v for k, v in s.items() if k != "sha256"} for s in old.get("sources", [])
                    if isinstance(s, dict)]
        hashed = all(isinstance(s, dict) and "sha256" in s for s in old.get("sources", []))
        if recorded == sources and hashed and old.get("tokenizer") == _tokenizer_name(tokenizer):
            return TokenShards(folder)
    check_vocab(tokenizer.n_vocab, "tokenizer")

    def documents():
        for p, source in zip(paths, sources):
            with open(p, "rb") as f:
                data = f.read()
            source["sha256"] = hashlib.sha256(data).hexdigest()
            if is_jsonl(p):  # each line one document
                for _, text in jsonl_documents(p, data=data):
                    yield np.asarray(tokenizer.encode(text, allowed_special={"<|endoftext|>"}), dtype=np.int64)
                continue
            text = decode_utf8(data, p)
            yield np.asarray(tokenizer.encode(text, allowed_special={"<|endoftext|>"}), dtype=np.int64)

    write_shards(documents(), folder, _tokenizer_name(tokenizer), tokenizer.n_vocab, tokenizer.eot_token,
                 shard_tokens=shard_tokens, extra_meta={"sources": sources})
    return TokenShards(folder)


# --------------------------------------------------------------------------------------------------
# Reading shards
# --------------------------------------------------------------------------------------------------


class TokenShards:
    """A shard folder: its ``meta`` and its shards as memory-mapped uint16 arrays."""

    def __init__(self, folder: str):
        meta_path = os.path.join(folder, META_FILE)
        if not os.path.isfile(meta_path):
            raise DataError(f"{folder} has no {META_FILE}: pass text files or a folder written by `gptfast tokenize`")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path} is not valid JSON ({e})") from None
        missing = [k for k in ("tokenizer", "n_vocab", "eot_token", "shards") if k not in self.meta]
        if missing:
            raise DataError(f"{meta_path} lacks {', '.join(missing)}")
        if self.meta.get("dtype", "uint16") != "uint16":
            raise DataError(f"{meta_path}: shards must be uint16, got {self.meta['dtype']!r}")
        check_vocab(int(self.meta["n_vocab"]), meta_path)
        self.folder = folder
        self.arrays = []
        for name in self.meta["shards"]:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise DataError(f"{path} is listed in {META_FILE} but missing")
            arr = np.load(path, mmap_mode="r")
            if arr.dtype != SHARD_DTYPE or arr.ndim != 1:
                raise DataError(f"{path} must be a 1-D uint16 array, got {arr.ndim}-D {arr.dtype}")
            self.arrays.append(arr)
        self.num_tokens = sum(a.shape[0] for a in self.arrays)

    @property
    def tokenizer_name(self) -> str:
        return self.meta["tokenizer"]

    @property
    def n_vocab(self) -> int:
        return int(self.meta["n_vocab"])

    def split(self, val_fraction: float):
        """(train, validation): the validation split is the last ``val_fraction`` of the tokens."""
        return split_tokens([self], val_fraction)


def split_tokens(datasets, val_fraction: float):
    """Concatenate the shards of several :class:`TokenShards` and cut the last ``val_fraction`` off
    as validation. Returns two :class:`TokenSplit`."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    arrays = [a for d in datasets for a in d.arrays if a.shape[0]]
    total = sum(a.shape[0] for a in arrays)
    cut = total - int(round(total * val_fraction))
    train, val, offset = [], [], 0
    for a in arrays:
        n = a.shape[0]
        lo, hi = offset, offset + n
        if lo < cut:
            train.append((a, 0, min(hi, cut) - lo))
        if hi > cut:
            val.append((a, max(lo, cut) - lo, n))
        offset = hi
    return TokenSplit(train, "training"), TokenSplit(val, "validation")


class TokenSplit:
    """Pieces of memory-mapped token arrays, ``(array, start, stop)``, read as random or fixed windows."""

    def __init__(self, segments, name: str):
        self.segments = segments
        self.name = name
        self.num_tokens = sum(stop - start for _, start, stop in segments)

    def _starts(self, seq_len: int):
        """How many windows of ``seq_len + 1`` tokens start in each segment, and their cumulative sum."""
        counts = np.array([max(0, stop - start - seq_len) for _, start, stop in self.segments], dtype=np.int64)
        return counts, np.cumsum(counts)

    def check(self, seq_len: int) -> None:
        counts, _ = self._starts(seq_len)
        if counts.sum() == 0:
            longest = max((stop - start for _, start, stop in self.segments), default=0)
            raise DataError(
                f"the {self.name} split has {self.num_tokens} tokens (longest piece {longest}), fewer than one "
                f"window of context_length + 1 = {seq_len + 1} tokens; use more data, a shorter --context-length"
                + (", or a larger --val-fraction" if self.name == "validation" else "")
            )

    def _gather(self, flat_starts, seq_len, cumsum):
        seg = np.searchsorted(cumsum, flat_starts, side="right")
        rows = []
        for s, g in zip(flat_starts, seg):
            arr, start, _ = self.segments[g]
            offset = start + int(s - (cumsum[g - 1] if g else 0))
            rows.append(np.asarray(arr[offset: offset + seq_len + 1], dtype=np.int64))
        chunk = torch.from_numpy(np.stack(rows))  # (B, T + 1)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def random_batch(self, batch_size: int, seq_len: int, key, rank: int = 0, world_size: int = 1):
        """Random windows for one micro-batch: ``(inputs, targets)``, each (batch_size, seq_len) long.

        ``key`` (e.g. ``(seed, step, micro_step)``) seeds the draw of the *global* batch of
        ``batch_size * world_size`` windows, of which ``rank`` reads its own slice: the same run on one
        process with ``world_size`` times the batch reads the same windows.
        """
        _, cumsum = self._starts(seq_len)
        rng = np.random.default_rng([int(k) for k in key])
        flat = rng.integers(0, int(cumsum[-1]), size=batch_size * world_size)
        return self._gather(flat[rank * batch_size:(rank + 1) * batch_size], seq_len, cumsum)

    def eval_batches(self, batch_size: int, seq_len: int, num_batches: int):
        """``num_batches`` fixed batches of windows spread evenly over the split (the same at every evaluation)."""
        _, cumsum = self._starts(seq_len)
        total = int(cumsum[-1])
        flat = np.linspace(0, total - 1, num=batch_size * num_batches).astype(np.int64)
        for i in range(num_batches):
            yield self._gather(flat[i * batch_size:(i + 1) * batch_size], seq_len, cumsum)


def open_token_data(paths, cache_folder: str, tokenizer=None):
    """``gptfast train``'s DATA arguments -> a list of :class:`TokenShards`.

    Shard folders (or their ``meta.json``) are read as they are; text and JSONL files -- given
    one by one, as a folder of them or as a glob (see :func:`expand_text_sources`) -- are tokenized
    together into ``cache_folder`` (reused while they are unchanged).
    """
    if not paths:
        raise DataError("no training data given: pass text files or shard folders written by `gptfast tokenize`")
    given = paths
    paths = expand_text_sources(paths)
    folders, texts = [], []
    for p in paths:
        if os.path.isdir(p):
            folders.append(p)
        elif os.path.basename(p) == META_FILE and os.path.isfile(p):
            folders.append(os.path.dirname(p) or ".")
        elif os.path.isfile(p):
            if os.path.getsize(p) == 0:
                raise DataError(f"{p} is empty")
            texts.append(p)
        else:
            raise DataError(f"{p} does not exist")
    datasets = [TokenShards(f) for f in folders]
    if texts:
        datasets.append(tokenize_text_files(texts, cache_folder, tokenizer))
    names = {d.tokenizer_name for d in datasets}
    if len(names) > 1:
        raise DataError(f"the data sets were tokenized with different tokenizers ({', '.join(sorted(names))})")
    if sum(d.num_tokens for d in datasets) == 0:
        raise DataError(f"the training data holds no tokens ({', '.join(map(str, given))})")
    return datasets


def data_sources(datasets) -> list[dict]:
    """What the data was made from, ``[{"path", "sha256"}]``: each text file's path and the hash of its
    bytes where the shards' ``meta.json`` records them, else the shard folder and a hash of its meta
    and shard sizes. A run keeps this list, so a resumed run can say which input changed."""
    out = []
    for d in datasets:
        listed = d.meta.get("sources", [])
        hashes = d.meta.get("source_sha256")  # `gptfast tokenize` lists paths, and their hashes beside them
        if listed and isinstance(hashes, list) and len(hashes) == len(listed):
            out += [{"path": str(p), "sha256": h} for p, h in zip(listed, hashes)]
            continue
        if listed and all(isinstance(s, dict) and "sha256" in s for s in listed):
            out += [{"path": s["path"], "sha256": s["sha256"]} for s in listed]
            continue
        h = hashlib.sha256(json.dumps([d.meta.get("tokenizer"), d.meta.get("n_vocab"), d.meta.get("shards"),
                                       [int(a.shape[0]) for a in d.arrays], d.meta.get("sources")]).encode())
        out.append({"path": os.path.abspath(d.folder), "sha256": h.hexdigest()})
    return out


def data_fingerprint(datasets) -> str:
    """A short hash of the data (see :func:`data_sources`): equal exactly when the inputs are."""
    h = hashlib.sha256()
    for d, source in zip(datasets, [data_sources([d]) for d in datasets]):
        h.update(json.dumps([source, d.num_tokens, d.meta.get("tokenizer")]).encode())
    return h.hexdigest()[:16]
