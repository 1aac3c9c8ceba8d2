"""``gptfast tokenize FILE... --out DIR``: text files -> uint16 token shards for training.

Each FILE is one document; the end-of-text token follows every document. The shards are
``DIR/shard-00000.npy``, ``DIR/shard-00001.npy``, ... (1-D ``numpy.uint16`` arrays) and
``DIR/meta.json`` describes them::

    {"tokenizer": "gpt2", "n_vocab": 50257, "eot_token": 50256, "dtype": "uint16",
     "shards": ["shard-00000.npy", ...], "shard_tokens": [...], "num_tokens": N, ...}

Text that looks like a special token (``<|endoftext|>``) is encoded as ordinary text. Files are
read in chunks cut just before a newline that follows a non-space character: no piece of the
split pattern crosses such a point, so the ids equal those of encoding each file whole.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

from gptfast.cli import CommandError

HELP = "encode text files into uint16 token shards (.npy) for training"

MAX_UINT16 = 65535


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files; each one is a document")
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


def _chunks(path: pathlib.Path, chunk_chars: int):
    """Yield (text, nbytes) pieces of a file, cut where the tokenization cannot change."""
    pending = ""
    with open(path, encoding="utf-8", newline="") as f:
        while True:
            block = f.read(chunk_chars)
            pending += block
            while len(pending) > chunk_chars:
                cut = _safe_cut(pending, chunk_chars)
                if cut == 0:
                    break  # no safe point yet: read more
                yield pending[:cut]
                pending = pending[cut:]
            if not block:
                break
    if pending:
        yield pending


def _atomic_save(path: pathlib.Path, array) -> None:
    import numpy as np

    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
        _atomic_save(self.out / name, self.buf[:self.fill])
        self.names.append(name)
        self.sizes.append(self.fill)
        self.fill = 0


def run(args: argparse.Namespace) -> int:
    files = [pathlib.Path(f) for f in args.files]
    for f in files:
        if not f.is_file():
            raise CommandError(f"{f}: no such file")
    if args.shard_tokens <= 0:
        raise CommandError("--shard-tokens must be positive")
    tok = _load_tokenizer(args.tokenizer)
    if tok.n_vocab - 1 > MAX_UINT16:
        raise CommandError(f"the tokenizer has {tok.n_vocab} ids, more than uint16 shards hold (ids up to {MAX_UINT16}); "
                           f"train a vocabulary of at most 65,536 tokens")
    try:
        eot = tok.eot_token
    except AttributeError:
        raise CommandError("the tokenizer has no <|endoftext|> token to put between documents; "
                           "train it with special_tokens=('<|endoftext|>',)") from None
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.npy"):
        raise CommandError(f"{out} already holds shards ({old.name}); pass an empty or new --out folder")

    total_bytes = sum(f.stat().st_size for f in files)
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize")
    writer = _ShardWriter(out, args.shard_tokens)
    threads = max(1, args.num_threads)
    num_tokens = 0
    try:
        for f in files:
            batch: list[str] = []

            def encode(batch):
                nonlocal num_tokens
                for ids in tok.encode_ordinary_batch(batch, num_threads=threads):
                    writer.add(ids)
                    num_tokens += len(ids)
                if bar is not None:
                    bar.update(sum(len(t.encode("utf-8")) for t in batch))

            try:
                for chunk in _chunks(f, max(1, args.chunk_bytes)):
                    batch.append(chunk)
                    if len(batch) >= 2 * threads:
                        encode(batch)
                        batch = []
            except UnicodeDecodeError as e:
                raise CommandError(f"{f}: not UTF-8 text (byte {e.start} of a chunk: {e.reason})") from None
            if batch:
                encode(batch)
            writer.add([eot])
            num_tokens += 1
        writer.flush()
    finally:
        if bar is not None:
            bar.close()
    meta = {
        "tokenizer": tok.name if args.tokenizer == "gpt2" else str(args.tokenizer),
        "n_vocab": tok.n_vocab,
        "eot_token": eot,
        "dtype": "uint16",
        "shards": writer.names,
        "shard_tokens": writer.sizes,
        "num_tokens": num_tokens,
        "documents": len(files),
        "sources": [str(f) for f in files],
    }
    fd, tmp = tempfile.mkstemp(prefix="meta.json.", suffix=".tmp", dir=out)
    with os.fdopen(fd, "w") as fh:
        json.dump(meta, fh, indent=1)
    os.replace(tmp, out / "meta.json")
    print(f"wrote {num_tokens:,} tokens from {len(files)} file(s) into {len(writer.names)} shard(s) in {out}")
    return 0
