"""``gptfast tokenize FILE... --out DIR``: text files -> uint16 token shards for training.

Each text FILE is one document, each line ``{"text": ...}`` of a ``.jsonl`` FILE one document; a
folder stands for its ``.txt`` and ``.jsonl`` files, and a glob (``'corpus/*.txt'``) is expanded
here when the shell did not. The end-of-text token follows every document. The shards are
``DIR/shard-00000.npy``, ``DIR/shard-00001.npy``, ... (1-D ``numpy.uint16`` arrays) and
``DIR/meta.json`` describes them::

    {"tokenizer": "gpt2", "n_vocab": 50257, "eot_token": 50256, "dtype": "uint16",
     "shards": ["shard-00000.npy", ...], "shard_tokens": [...], "num_tokens": N, ...}

Text that looks like a special token (``<|endoftext|>``) is encoded as ordinary text. Files are
read in chunks cut just before a newline that follows a non-space character: no piece of the
split pattern crosses such a point, so the ids equal those of encoding each file whole.

``meta.json`` also lists each file's sha256 (``source_sha256``), which ``gptfast train`` keeps to
notice changed inputs. The shards are written into a temporary folder inside DIR and moved into
place once every file is encoded: a failure (a file that is not UTF-8, say) leaves DIR as it was.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

from gptfast.cli import CommandError

HELP = "encode text files into uint16 token shards (.npy) for training"

MAX_UINT16 = 65535


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="UTF-8 text files (each one a document), JSONL files ({\"text\": ...} per line, each "
                             "line a document), folders of them, or globs such as 'corpus/*.txt'")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the shards and meta.json")
    parser.add_argument("--tokenizer", default="gpt2",
                        help="'gpt2' (default) or the path of a tokenizer written by Tokenizer.save (.tiktoken)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                        help="tokens per shard (default 100,000,000; 200 MB of uint16)")
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="encoding threads (default: all cores)")
    parser.add_argument("--chunk-bytes", type=int, default=4 << 20, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load_tokenizer(spec: str):
    from gptfast.tokenizer import Tokenizer

    if spec == "gpt2":
        return Tokenizer.gpt2()
    path = pathlib.Path(spec)
    if not path.is_file():
        raise CommandError(f"--tokenizer {spec!r}: no such file; pass 'gpt2' or the .tiktoken path given to Tokenizer.save")
    try:
        return Tokenizer.load(path)
    except (OSError, ValueError) as e:
        raise CommandError(f"--tokenizer {spec!r}: {e}") from None


def _safe_cut(text: str, limit: int) -> int:
    """An index <= limit just before a newline that follows a non-space character (0 if none)."""
    from gptfast.bpe_reference import SPACE, char_class

    i = text.rfind("\n", 1, limit)
    while i > 0:
        if char_class(text[i - 1]) != SPACE:
            return i
        i = text.rfind("\n", 1, i)
    return 0


def _chunks(path: pathlib.Path, chunk_bytes: int, digest):
    """Yield text pieces of a file, cut where the tokenization cannot change; ``digest`` sees every byte.

    A byte sequence that is not UTF-8 raises :class:`~gptfast.data.DataError` naming the file, the byte
    offset and the line.
    """
    from gptfast.data import not_utf8

    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, offset, lines = "", 0, 0  # bytes and newlines before this block
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            digest.update(block)
            held = decoder.getstate()[0]  # the start of a character cut by the previous block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                data = held + block  # what e.start counts in
                raise not_utf8(path, offset - len(held) + e.start, lines + data.count(b"\n", 0, e.start) + 1,
                               e.reason) from None
            offset += len(block)
            lines += block.count(b"\n")
            pending += text
            while len(pending) > chunk_bytes:
                cut = _safe_cut(pending, chunk_bytes)
                if cut == 0:
                    break  # no safe point yet: read more
                yield pending[:cut]
                pending = pending[cut:]
            if not block:
                break
    if pending:
        yield pending


def _save(path: pathlib.Path, array) -> None:
    import numpy as np

    with open(path, "wb") as f:  # inside the temporary folder: renamed into DIR when all is done
        np.save(f, array)


class _ShardWriter:
    def __init__(self, out: pathlib.Path, shard_tokens: int):
        import numpy as np

        self.np = np
        self.out = out
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.names: list[str] = []
        self.sizes: list[int] = []

    def add(self, ids) -> None:
        ids = self.np.asarray(ids, dtype=self.np.uint16)
        while len(ids):
            take = min(len(ids), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + take] = ids[:take]
            self.fill += take
            ids = ids[take:]
            if self.fill == len(self.buf):
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = f"shard-{len(self.names):05d}.npy"
        _save(self.out / name, self.buf[:self.fill])
        self.names.append(name)
        self.sizes.append(self.fill)
        self.fill = 0


def run(args: argparse.Namespace) -> int:
    from gptfast import checkpoint
    from gptfast.data import DataError

    from gptfast.data import META_FILE, expand_text_sources

    try:
        expanded = expand_text_sources(args.files)
    except DataError as e:
        raise CommandError(str(e)) from None
    for f in expanded:
        if os.path.isdir(f):
            raise CommandError(f"{f} is already tokenized (it holds {META_FILE}): pass it to `gptfast train` as it "
                               f"is, or pass the text files it was made from")
    files = [pathlib.Path(f) for f in expanded]
    for f in files:
        if not f.is_file():
            raise CommandError(f"{f}: no such file" if not f.exists() else f"{f} is not a file: pass text files")
        if f.stat().st_size == 0:
            raise CommandError(f"{f} is empty: there is nothing to tokenize in it; leave it out")
    if args.shard_tokens <= 0:
        raise CommandError("--shard-tokens must be positive")
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file: pass a folder for the shards (new or empty)")
    if out.is_dir():
        for old in out.glob("shard-*.npy"):
            raise CommandError(f"{out} already holds shards ({old.name}); pass an empty or new --out folder")
    tok = _load_tokenizer(args.tokenizer)
    if tok.n_vocab - 1 > MAX_UINT16:
        raise CommandError(f"the tokenizer has {tok.n_vocab} ids, more than uint16 shards hold (ids up to {MAX_UINT16}); "
                           f"train a vocabulary of at most 65,536 tokens")
    try:
        eot = tok.eot_token
    except AttributeError:
        raise CommandError("the tokenizer has no <|endoftext|> token to put between documents; "
                           "train it with special_tokens=('<|endoftext|>',)") from None

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix=".tokenize-", suffix=".tmp", dir=out))
    try:
        meta = _encode(files, tok, eot, work, args)
        for name in meta["shards"]:
            os.replace(work / name, out / name)
        with checkpoint.atomic_open(out / "meta.json", "w") as fh:
            json.dump(meta, fh, indent=1)
    except DataError as e:
        raise CommandError(str(e)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()  # a failed run leaves no folder of its own behind
    docs = f" ({meta['documents']:,} documents)" if meta["documents"] != len(files) else ""
    print(f"wrote {meta['num_tokens']:,} tokens from {len(files)} file(s){docs} into {len(meta['shards'])} shard(s) "
          f"in {out}")
    return 0


def _encode(files, tok, eot, work: pathlib.Path, args) -> dict:
    """Encode every file into shards in ``work``; returns meta.json's contents."""
    total_bytes = sum(f.stat().st_size for f in files)
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize")
    writer = _ShardWriter(work, args.shard_tokens)
    threads = max(1, args.num_threads)
    num_tokens = 0
    hashes = []

    def encode(batch):
        nonlocal num_tokens
        for ids in tok.encode_ordinary_batch(batch, num_threads=threads):
            writer.add(ids)
            num_tokens += len(ids)
        if bar is not None:
            bar.update(sum(len(t.encode("utf-8")) for t in batch))

    documents = 0
    try:
        for f in files:
            batch: list[str] = []
            digest = hashlib.sha256()
            if f.suffix == ".jsonl":  # each line a document, the end-of-text token after each
                from gptfast.data import jsonl_documents

                data = f.read_bytes()
                digest.update(data)
                texts = [text for _, text in jsonl_documents(f, data=data)]
                for start in range(0, len(texts), 256):
                    part = texts[start:start + 256]
                    for ids in tok.encode_ordinary_batch(part, num_threads=threads):
                        writer.add(ids)
                        writer.add([eot])
                        num_tokens += len(ids) + 1
                    if bar is not None:
                        bar.update(sum(len(t.encode("utf-8")) for t in part))
                documents += len(texts)
                hashes.append(digest.hexdigest())
                continue
            documents += 1
            for chunk in _chunks(f, max(1, args.chunk_bytes), digest):
                batch.append(chunk)
                if len(batch) >= 2 * threads:
                    encode(batch)
                    batch = []
            if batch:
                encode(batch)
            writer.add([eot])
            num_tokens += 1
            hashes.append(digest.hexdigest())
        writer.flush()
    finally:
        if bar is not None:
            bar.close()
    return {
        "tokenizer": tok.name if args.tokenizer == "gpt2" else str(args.tokenizer),
        "n_vocab": tok.n_vocab,
        "eot_token": eot,
        "dtype": "uint16",
        "shards": writer.names,
        "shard_tokens": writer.sizes,
        "num_tokens": num_tokens,
        "documents": documents,
        "sources": [str(f) for f in files],
        "source_sha256": hashes,
    }
