"""Tokenizer benchmarks: gptfast.Tokenizer side by side with tiktoken's gpt2 encoding (CPU).

The corpus mixes code, English prose and non-English text taken from files that ship with
Python and the operating system, so it can be rebuilt anywhere without a download:

* code:        the standard library's ``.py`` files;
* prose:       ``/usr/share/doc`` (plain and gzipped text), plus the stdlib's ``.txt``/``.rst``;
* non-English: translations in ``/usr/share/locale/*/LC_MESSAGES/*.mo`` and the UTF-8 samples of
               the stdlib's ``test/cjkencodings``.

Files are taken in sorted order (deterministic) until each third of the target size is full;
when a source runs short the others fill the gap. The result is cached in the temp directory.
``python -m bench --only tokenizer`` runs these cases; the quick plan (a CPU's default) uses a 2 MB
corpus and 0.2 MB single pieces, ``--full`` 32 MB and 1 MB. tiktoken is built from the ranks gptfast
ships (``gptfast.tokenizer.tiktoken_gpt2``), so no case needs the network.
"""

from __future__ import annotations

import gettext
import glob
import gzip
import hashlib
import itertools
import os
import sysconfig
import tempfile

from .harness import Case, Context

MB = 1_000_000
FULL_SIZE = 32 * MB
QUICK_SIZE = 2 * MB


def _stdlib() -> str:
    return sysconfig.get_paths()["stdlib"]


def _code_files():
    root = _stdlib()
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        if "site-packages" not in path:
            yield path


def _prose_files():
    yield from sorted(p for p in glob.glob("/usr/share/doc/**/*", recursive=True) if os.path.isfile(p))
    root = _stdlib()
    for ext in ("txt", "rst"):
        yield from sorted(p for p in glob.glob(os.path.join(root, "**", f"*.{ext}"), recursive=True)
                          if "site-packages" not in p)


def _foreign_texts():
    yield from ((p, None) for p in sorted(glob.glob(os.path.join(_stdlib(), "test", "cjkencodings", "*-utf8.txt"))))
    for p in sorted(glob.glob("/usr/share/locale/*/LC_MESSAGES/*.mo")):
        yield p, "mo"


def _read_text(path: str, kind: str | None = None) -> str | None:
    try:
        if kind == "mo":
            with open(path, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog
            msgs = [v for k, v in sorted(catalog.items(), key=lambda kv: str(kv[0])) if k and isinstance(v, str)]
            return "\n".join(msgs) + "\n"
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read(4 * MB)
        if b"\0" in data:
            return None
        return data.decode("utf-8")
    except Exception:  # unreadable, binary or not UTF-8: skip it
        return None


def _take(items, budget: int, kind_aware: bool = False) -> list[str]:
    out, size = [], 0
    for item in items:
        path, kind = item if kind_aware else (item, None)
        text = _read_text(path, kind)
        if not text:
            continue
        out.append(text)
        size += len(text.encode("utf-8"))
        if size >= budget:
            break
    return out


def build_corpus(size: int) -> list[str]:
    """Documents (one per file) totalling at least ``size`` UTF-8 bytes when the sources allow."""
    third = size // 3
    docs = _take(_code_files(), third) + _take(_prose_files(), third) + _take(_foreign_texts(), third, kind_aware=True)
    total = sum(len(d.encode("utf-8")) for d in docs)
    if total < size:  # top up with more code, which the standard library has plenty of
        docs += _take(_code_files(), 2 * size - total)
    return _trim(docs, size)


def _trim(docs: list[str], size: int) -> list[str]:
    out, total = [], 0
    for d in docs:
        if total >= size:
            break
        out.append(d)
        total += len(d.encode("utf-8"))
    return out


def corpus(size: int) -> list[str]:
    """``build_corpus``, cached in the temp directory (rebuilt if the cache is unreadable)."""
    key = hashlib.sha1(f"gptfast-tokenizer-corpus-v1-{size}".encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"gptfast-tokenizer-corpus-{size // MB}MB-{key}.txt")
    sep = "\n\x00\x00DOC\x00\x00\n"
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().split(sep)
        except (OSError, UnicodeDecodeError):
            pass
    docs = build_corpus(size)
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(sep.join(docs))
    os.replace(tmp, path)
    return docs


def _describe(docs: list[str]) -> str:
    return f"{sum(len(d.encode('utf-8')) for d in docs) / MB:.0f} MB mixed"


OPS = ("tokenizer.encode_ordinary", "tokenizer.encode_ordinary_batch", "tokenizer.encode_to_numpy",
       "tokenizer.decode_bytes", "tokenizer.encode_single_piece")

# What each implementation does a second on the shared 2-core machine the CPU plan is sized for, at
# its slow times (docs/tokenizer.md has the measured figures): it sets each case's declared budget.
RATE_MBPS = {
    "tokenizer.encode_ordinary": {"tiktoken": 3.0, "fast": 25.0},
    "tokenizer.encode_ordinary_batch": {"tiktoken": 3.0, "fast": 25.0},
    "tokenizer.encode_to_numpy": {"core": 25.0, "fast": 25.0, "tiktoken": 3.0},
    "tokenizer.decode_bytes": {"tiktoken": 30.0, "fast": 400.0, "fast[1 thread]": 300.0,
                               "fast[foreign-ints]": 250.0, "fast[array]": 400.0},
    "single word": {"tiktoken": 0.5, "fast": 5.0, "fast[1 thread]": 5.0},
    "single number": {"tiktoken": 0.28, "fast": 5.0, "fast[1 thread]": 5.0},
}
# Building the corpus from the files (once; it is cached in the temp folder) and loading both
# vocabularies, on the first case.
SETUP_S = {"quick": 4.0, "full": 25.0}


def cases(ctx: Context) -> list[Case]:
    if not any(ctx.wants(op) for op in OPS):  # building the corpus takes a while: only when asked for
        return []
    try:
        import tiktoken  # noqa: F401  (the baseline)
    except ImportError:
        ctx.skip("tokenizer: tiktoken is not installed (the baseline)")
        return []
    from gptfast.tokenizer import Tokenizer, long_piece_threads, set_long_piece_threads, tiktoken_gpt2

    try:
        fast = Tokenizer.gpt2(impl="fast")
    except ImportError as e:
        ctx.skip(f"tokenizer: the C++ extension is not built ({e})")
        return []
    enc = tiktoken_gpt2()  # tiktoken's gpt2 encoding from the ranks gptfast ships: no download
    core = fast._core

    size = QUICK_SIZE if ctx.quick else FULL_SIZE
    if ctx.dry_run:  # the plan only: no corpus is read
        docs, text, nbytes, shape = [], "", size, f"{size // MB} MB mixed"
    else:
        docs = corpus(size)
        text = "\n".join(docs)
        nbytes = len(text.encode("utf-8"))
        shape = _describe(docs)
    out: list[Case] = []
    memo: dict = {}

    def ids(tok):  # computed on first use (the untimed warm-up call), not when the cases are listed
        key = "ids-" + ("tiktoken" if tok is enc else "fast")
        if key not in memo:
            memo[key] = tok.encode_ordinary(text)
        return memo[key]

    def id_array():
        if "array" not in memo:
            memo["array"] = fast.encode_to_numpy(text)
        return memo["array"]

    def add(op, impl, fn, work, shape_=shape, baseline=False, note="", unit="MB/s", rates=None):
        rate = (rates or RATE_MBPS[op])[impl] * MB
        out.append(Case(op=op, shape=shape_, impl=impl, fn=fn, unit=unit, work=work, baseline=baseline, note=note,
                        min_time_s=1.0, interleave=True, min_rounds=7, call_s=work / rate,
                        setup_s=0.0 if out else SETUP_S["quick" if ctx.quick else "full"]))

    def one_thread(fn):  # for pieces long enough to cut, and sequences long enough to decode in parts
        def run():
            threads = long_piece_threads()
            set_long_piece_threads(1)
            try:
                return fn()
            finally:
                set_long_piece_threads(threads)
        return run

    op = "tokenizer.encode_ordinary"
    add(op, "tiktoken", lambda: enc.encode_ordinary(text), nbytes, baseline=True, note="1 thread, list of ints")
    add(op, "fast", one_thread(lambda: fast.encode_ordinary(text)), nbytes, note="1 thread, list of ints")

    op = "tokenizer.encode_ordinary_batch"
    add(op, "tiktoken", lambda: enc.encode_ordinary_batch(docs, num_threads=2), nbytes, baseline=True, note="2 threads")
    add(op, "fast", lambda: fast.encode_ordinary_batch(docs, num_threads=2), nbytes, note="2 threads")

    op = "tokenizer.encode_to_numpy"
    add(op, "core", lambda: core.count_ordinary(text), nbytes, baseline=True,
        note="the C++ core alone: ids into a C++ vector, no Python objects")
    add(op, "fast", lambda: fast.encode_to_numpy(text), nbytes, note="uint32 array")
    add(op, "tiktoken", lambda: enc.encode_to_numpy(text), nbytes, note="uint32 array")

    op = "tokenizer.decode_bytes"
    # Each tokenizer decodes the list its own encode made (the round trip); the same ids either way.
    add(op, "tiktoken", lambda: enc.decode_bytes(ids(enc)), nbytes, baseline=True, note="list of ints -> bytes")
    parts = f"in parts on {long_piece_threads()} threads"
    add(op, "fast", lambda: fast.decode_bytes(ids(fast)), nbytes, note=f"list of ints -> bytes, {parts}")
    add(op, "fast[1 thread]", one_thread(lambda: fast.decode_bytes(ids(fast))), nbytes, note="list of ints -> bytes")
    add(op, "fast[foreign-ints]", lambda: fast.decode_bytes(ids(enc)), nbytes,
        note=f"tiktoken's list: every int object is read, {parts}")
    add(op, "fast[array]", lambda: fast.decode_bytes(id_array()), nbytes, note=f"uint32 array, read in place, {parts}")

    import random

    rng = random.Random(0)
    n_word = 200_000 if ctx.quick else 1_000_000
    op = "tokenizer.encode_single_piece"
    from gptfast import _bpe

    core_segment = _bpe._long_piece_segment()
    cut = f"cut across {min(long_piece_threads(), max(1, n_word // core_segment))} threads"

    def rotating(fn, pieces):  # each call takes the next piece: no call repeats the one before
        turn = itertools.count()
        return lambda: fn(pieces()[next(turn) % 4])

    # One piece of the pattern each: a run of letters, and a run of digits (GPT-2's number tokens
    # overlap in many ways, so the walk backs up more often than in a word). Every call gets a new
    # random piece; the pieces are drawn on the first call.
    for kind, alphabet, note in (("word", "abcdefghijklmnopqrstuvwxyz", "random a-z"),
                                 ("number", "0123456789", "random 0-9")):
        def pieces(kind=kind, alphabet=alphabet):
            if kind not in memo:
                memo[kind] = ["".join(rng.choices(alphabet, k=n_word)) for _ in range(4)]
            return memo[kind]

        wshape, rates = f"{n_word / MB:g} MB single {kind}", RATE_MBPS[f"single {kind}"]
        add(op, "tiktoken", rotating(enc.encode_ordinary, pieces), n_word, shape_=wshape, baseline=True, note=note,
            rates=rates)
        add(op, "fast", rotating(fast.encode_ordinary, pieces), n_word, shape_=wshape, note=f"{note}, {cut}",
            rates=rates)
        add(op, "fast[1 thread]", one_thread(rotating(fast.encode_ordinary, pieces)), n_word, shape_=wshape,
            note=note, rates=rates)
    return out
