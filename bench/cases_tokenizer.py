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

Three regimes:

* **repeated** (``tokenizer.encode_ordinary`` and the other plain ops): the same text every call;
* **steady** (``tokenizer.steady.*``): a warm process, and every round new text: the corpus is dealt
  into as many slices as there are calls, each call takes the next slice, and every implementation
  gets the same slice in the same round;
* **cold** (``tokenizer.cold.*``): every call is a fresh child process that has loaded its library
  and vocabulary and read the text, and then makes one pass over it, first-use warm-ups included.

Every installed peer is timed in alternation with gptfast on the same inputs: tiktoken (the
baseline), gigatoken, tokenizers and fastokens (``pip install -e ".[bench]"`` in a venv of its own).
Each row's note names the peer's exact call, says whether the peer is exact (its ids equal tiktoken's
on the bench corpus and on the adversarial set) and gives its ratio to the fastest exact peer. The
baseline rows' notes carry the corpus's sha256 and what it holds.
"""

from __future__ import annotations

import gettext
import glob
import gzip
import hashlib
import importlib
import itertools
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

from .harness import Case, Context

MB = 1_000_000
FULL_SIZE = 32 * MB
# The quick plan's corpus; GPTFAST_BENCH_TOKENIZER_MB sets another (for runs by hand between the two
# plans: the steady slices and the cold pass grow with it).
QUICK_SIZE = int(float(os.environ.get("GPTFAST_BENCH_TOKENIZER_MB", "2")) * MB)


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


def corpus_file(size: int) -> str:
    """Where ``corpus(size)`` keeps its documents (separated by ``"\n\0\0DOC\0\0\n"``)."""
    key = hashlib.sha1(f"gptfast-tokenizer-corpus-v1-{size}".encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"gptfast-tokenizer-corpus-{size // MB}MB-{key}.txt")


def corpus(size: int) -> list[str]:
    """``build_corpus``, cached in the temp directory (rebuilt if the cache is unreadable)."""
    path = corpus_file(size)
    sep = "\n\x00\x00DOC\x00\x00\n"
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8", newline="") as f:  # no newline translation: "\r" stays
                return f.read().split(sep)
        except (OSError, UnicodeDecodeError):
            pass
    docs = build_corpus(size)
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(sep.join(docs))
    os.replace(tmp, path)
    return docs


def _describe(docs: list[str]) -> str:
    return f"{sum(len(d.encode('utf-8')) for d in docs) / MB:.0f} MB mixed"


# --------------------------------------------------------------------------------------------- peers

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PEERS = ("tiktoken", "gigatoken", "tokenizers", "fastokens")
# The oldest release of a peer that is timed: tokenizers before 1.0 is what transformers pins (the
# test extra), not the peer the bench extra installs.
PEER_MIN_MAJOR = {"tokenizers": 1}


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def peer_skip_reason(name: str) -> str | None:
    """Why peer ``name`` is not timed here (not installed, or older than the bench extra's), or None."""
    v = _dist_version(name)
    if v is None:
        return f"peer {name} is not installed (pip install -e \".[bench]\" in a venv of its own)"
    major = PEER_MIN_MAJOR.get(name)
    if major is not None:
        try:
            if int(v.split(".")[0]) < major:
                return f"peer {name} {v} is older than the bench extra's {major}.x (pip install -e \".[bench]\")"
        except ValueError:
            pass
    return None


def _tmp_file(name: str, make) -> str:
    """A file in the temp folder, written once (atomically) by ``make()`` -> bytes."""
    path = os.path.join(tempfile.gettempdir(), name)
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(make())
        os.replace(tmp, path)
    return path


# Set in a cold child to the parent's files, so that the child never imports gptfast (nor torch).
_RANKS_PATH: str | None = None
_HF_JSON_PATH: str | None = None


def ranks_path() -> str:
    """GPT-2's ranks in the ``.tiktoken`` format, from the copy gptfast ships."""
    if _RANKS_PATH:
        return _RANKS_PATH
    from gptfast.tokenizer import _R50K_SHA256, gpt2_ranks_bytes

    return _tmp_file(f"gptfast-bench-r50k-{_R50K_SHA256[:12]}.tiktoken", gpt2_ranks_bytes)


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte (the byte-level alphabet of tokenizer.json files)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _merges_of(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that rebuilds ``ranks`` (rank order): each token's last merge, found by merging
    its bytes with the tokens of lower rank only."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def hf_json_path() -> str:
    """A ``tokenizer.json`` of GPT-2 (byte-level BPE) rebuilt from the shipped ranks, for tokenizers."""
    import json

    if _HF_JSON_PATH:
        return _HF_JSON_PATH
    from gptfast.tokenizer import _R50K_SHA256

    def make() -> bytes:
        from gptfast.tokenizer import _parse_tiktoken, gpt2_ranks_bytes

        ranks = _parse_tiktoken(gpt2_ranks_bytes(), "r50k_base")
        chars = _byte_chars()
        show = lambda b: "".join(chars[x] for x in b)  # noqa: E731
        vocab = {show(t): r for t, r in ranks.items()}
        vocab["<|endoftext|>"] = 50256
        doc = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": 50256, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab,
                      "merges": [[show(a), show(b)] for a, b in _merges_of(ranks)]},
        }
        return json.dumps(doc).encode("utf-8")

    return _tmp_file(f"gptfast-bench-gpt2-{_R50K_SHA256[:12]}.tokenizer.json", make)


class Peer:
    """One library's GPT-2 encoder: ``calls`` names each method's exact call (None: it has none)."""

    def __init__(self, name, version, calls, list_fn, numpy_fn=None, batch_fn=None, decode_fn=None):
        self.name, self.version, self.calls = name, version, calls
        self.list, self.numpy, self.batch, self.decode = list_fn, numpy_fn, batch_fn, decode_fn
        self.exact: bool | None = None  # set by check_exact


def build_peer(name: str) -> Peer | None:
    """The peer ``name`` built on GPT-2's shipped ranks, or None when its package is not installed."""
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return None
    version = getattr(mod, "__version__", "?")
    try:
        from importlib.metadata import version as dist_version

        version = dist_version(name)
    except Exception:
        pass
    if name == "tiktoken":
        from tiktoken.load import load_tiktoken_bpe

        enc = mod.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=load_tiktoken_bpe(ranks_path()),
                           special_tokens={"<|endoftext|>": 50256})
        return Peer(name, version, {"list": "tiktoken.Encoding.encode_ordinary", "numpy": "Encoding.encode_to_numpy",
                                    "batch": "Encoding.encode_ordinary_batch(texts, num_threads=2)",
                                    "decode": "Encoding.decode_bytes"},
                    enc.encode_ordinary, enc.encode_to_numpy, lambda docs: enc.encode_ordinary_batch(docs, num_threads=2),
                    enc.decode_bytes)
    if name == "gigatoken":
        tok = mod.Tokenizer.from_tiktoken(ranks_path(), pretokenizer="gpt2")
        tt = tok.as_tiktoken()
        return Peer(name, version, {
            "list": 'Tokenizer.from_tiktoken(path, pretokenizer="gpt2").as_tiktoken().encode_ordinary',
            "numpy": 'Tokenizer.from_tiktoken(path, pretokenizer="gpt2").encode',
            "batch": "as_tiktoken().encode_ordinary_batch(texts, num_threads=2)",
            "decode": "as_tiktoken().decode_bytes"},
            tt.encode_ordinary, tok.encode, lambda docs: tt.encode_ordinary_batch(docs, num_threads=2), tt.decode_bytes)
    if name == "tokenizers":
        tok = mod.Tokenizer.from_file(hf_json_path())
        return Peer(name, version, {
            "list": "Tokenizer.from_file(gpt2 tokenizer.json).encode(text, add_special_tokens=False).ids",
            "numpy": "Tokenizer.encode(text, add_special_tokens=False).ids_array",
            "batch": "Tokenizer.encode_batch(texts, add_special_tokens=False), .ids of each",
            "decode": "Tokenizer.decode(ids) (a str)"},
            lambda t: tok.encode(t, add_special_tokens=False).ids,
            lambda t: tok.encode(t, add_special_tokens=False).ids_array,
            lambda docs: [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)],
            tok.decode)
    if name == "fastokens":
        tok = mod.Tokenizer.from_tiktoken(ranks_path(), pattern=GPT2_PATTERN, special_tokens={"<|endoftext|>": 50256})
        return Peer(name, version, {
            "list": "Tokenizer.from_tiktoken(path, pattern=GPT-2's).encode_ordinary(text).ids",
            "batch": "Tokenizer.encode_batch(texts), .ids of each", "decode": "Tokenizer.decode(ids) (a str)"},
            lambda t: tok.encode_ordinary(t).ids, None,
            lambda docs: [e.ids for e in tok.encode_batch(docs)], tok.decode)
    return None


def adversarial_texts(step: int = 1) -> list[str]:
    """Texts that probe the pattern's corners: its rules one by one, and every Unicode scalar value
    (every ``step``-th) in four contexts (inside a word, after a space and before a digit, between a
    digit and punctuation, around a whitespace run and a tab)."""
    rules = ["a  b", "a   b", "a\tb", "a \tb", "a\t b", "a\u00a0b", "a \u00a0b", "a\u3000b", "a\n\nb", "a \n b",
             "a  ", "  ", " ", "\t", "x\t\t", " \n", "a\r\nb", "a \r\n  b", "a\u2028b", "\u0085x", "a\u200bb",
             "don't", "I'm", "we're", "they've", "she'll", "he'd", "it's", "DON'T", "x'Ll", "'s", "''s", "'",
             "'ll", "'re'", "a'sb", "!'s", " 's", "it\u2019s", "1234567890123", " 2024", "x2", "²³", "½¼", "ⅫⅣ",
             "٣٤٥", "𝟘𝟙", "1.5", "-3", "e\u0301", " \u0301", "👩\u200d💻", "👍🏽", "🇺🇸", "\x00\x01\x02", "\x7f",
             "日本語のテキスト", "한국어", "Ελληνικά", "العربية", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "Ǆǅǆ", "   x", "\n\n\n  y",
             "a" * 300, "1" * 300, " " * 300, "ab" * 200, "é" * 200, "中" * 200]
    scalars = [chr(c) for c in range(0, 0x110000, step) if not 0xD800 <= c <= 0xDFFF]
    contexts = (lambda c: f"a{c}b", lambda c: f" {c}{c}1", lambda c: f"1{c}!", lambda c: f"  {c}\t{c}x")
    return rules + ["\n".join(ctx(c) for c in scalars) for ctx in contexts]


def check_exact(peer: Peer, truth, docs: list[str], adversarial: list[str]) -> bool:
    """Whether ``peer``'s ids equal tiktoken's (``truth(text)``) on every text, to a list and to numpy."""
    for t in itertools.chain(docs, adversarial):
        want = truth(t)
        if list(peer.list(t)) != want:
            return False
        if peer.numpy is not None and peer.numpy(t).tolist() != want:
            return False
    return True


def corpus_summary(docs: list[str]) -> str:
    text = "\n".join(docs).encode("utf-8")
    return (f"corpus sha256={hashlib.sha256(text).hexdigest()}, {len(text)} bytes, {len(docs)} documents "
            "(one per file): stdlib .py code, /usr/share/doc and stdlib .txt/.rst prose, /usr/share/locale "
            "message catalogues and stdlib cjkencodings samples, a third each")


class FieldNotes:
    """Keeps each row's note up to date with its ratio to the fastest exact peer of its group, from the
    calls timed so far (the harness reads the note after the group's last round)."""

    def __init__(self):
        self.groups: dict = {}

    def wrap(self, key, impl: str, case_ref: list, fn, is_peer: bool, exact: bool):
        g = self.groups.setdefault(key, [])
        rec = {"impl": impl, "times": [], "calls": 0, "ref": case_ref, "peer": is_peer, "exact": exact}
        g.append(rec)

        def run():
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            rec["calls"] += 1
            if rec["calls"] > 1:  # the harness's first call is its warm-up
                rec["times"].append(dt)
                self._update(g)
            return out
        return run

    @staticmethod
    def _update(g):
        med = {id(r): statistics.median(r["times"]) for r in g if r["times"]}
        peers = [r for r in g if r["peer"] and r["exact"] and id(r) in med]
        if not peers:
            return
        best = min(peers, key=lambda r: med[id(r)])
        for r in g:
            if id(r) not in med or not r["ref"]:
                continue
            case = r["ref"][0]
            base = case.note.split(" | vs fastest exact peer")[0]
            case.note = f"{base} | vs fastest exact peer ({best['impl']}): {med[id(best)] / med[id(r)]:.2f}x"


# --------------------------------------------------------------------------------------------- cold

_CHILD = r"""
import importlib, importlib.machinery, importlib.util, sys, time
root, modname, lib, kind, corpus_path, ext_path, ranks, hf_json = sys.argv[1:9]
if root:
    sys.path.insert(0, root)
m = importlib.import_module(modname)
m._RANKS_PATH, m._HF_JSON_PATH = ranks, hf_json
with open(corpus_path, encoding="utf-8", newline="") as f:
    docs = f.read().split("\n\x00\x00DOC\x00\x00\n")
if lib == "gptfast":
    # the extension alone: `import gptfast` would import torch, which the pass does not need
    loader = importlib.machinery.ExtensionFileLoader("_bpe", ext_path)
    spec = importlib.util.spec_from_file_location("_bpe", ext_path, loader=loader)
    _bpe = importlib.util.module_from_spec(spec)
    loader.exec_module(_bpe)
    core = _bpe.Encoder.from_tiktoken(open(ranks, "rb").read(), [("<|endoftext|>", 50256)])
    one = core.encode_ordinary if kind == "list" else (lambda t: core.encode_to_numpy(t, None))
else:
    peer = m.build_peer(lib)
    one = peer.list if kind == "list" else peer.numpy
if kind == "numpy":
    import numpy  # noqa: F401  (imported on a first call otherwise, inside the timed pass)
    (core.encode_to_numpy("", None) if lib == "gptfast" else one(""))  # the array type's first use
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
for d in docs:
    one(d)
print("done", time.perf_counter() - t0, flush=True)
"""


class ColdRuns:
    """Each call: one pass of a fresh child process over the corpus, per document. The children a case
    needs are all started (and have loaded their library, vocabulary and text) in the harness's
    untimed warm-up call, so a timed call is the pass alone, plus a pipe's round trip."""

    def __init__(self, lib: str, kind: str, corpus_path: str, rounds: int):
        self.lib, self.kind, self.corpus_path, self.rounds = lib, kind, corpus_path, rounds
        self.idle: list = []
        self.first = True
        self.inner: list[float] = []  # the pass as each child timed it

    def _start(self):
        from gptfast import _bpe

        mod = __name__
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) if mod == "bench.cases_tokenizer" else ""
        hf = hf_json_path() if self.lib == "tokenizers" else ""
        return subprocess.Popen([sys.executable, "-c", _CHILD, root, mod, self.lib, self.kind, self.corpus_path,
                                 _bpe.__file__, ranks_path(), hf], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)

    @staticmethod
    def _ready(p):
        line = p.stdout.readline()
        if line.strip() != "ready":
            p.kill()
            raise RuntimeError(f"a cold child did not start (it said {line!r})")

    def __call__(self):
        if self.first:  # the warm-up call: start every child this case will use
            self.first = False
            self.idle = [self._start() for _ in range(self.rounds + 1)]
            for p in self.idle:
                self._ready(p)
        if not self.idle:  # more rounds than planned: start one now (timed, so the plan avoids it)
            p = self._start()
            self._ready(p)
            self.idle.append(p)
        p = self.idle.pop(0)
        p.stdin.write("go\n")
        p.stdin.flush()
        line = p.stdout.readline().split()
        p.wait()
        if not line or line[0] != "done":
            raise RuntimeError(f"a cold child failed ({self.lib}, {self.kind})")
        self.inner.append(float(line[1]))


OPS = ("tokenizer.encode_ordinary", "tokenizer.encode_ordinary_batch", "tokenizer.encode_to_numpy",
       "tokenizer.decode_bytes", "tokenizer.encode_single_piece",
       "tokenizer.steady.encode_ordinary", "tokenizer.steady.encode_to_numpy",
       "tokenizer.cold.encode_ordinary", "tokenizer.cold.encode_to_numpy")

# What each implementation does a second on the shared 2-core machine the CPU plan is sized for, at
# its slow times (docs/tokenizer.md has the measured figures): it sets each case's declared budget.
# The peers (absent from the default environment) are not in the default plan's budget.
_ENC = {"tiktoken": 3.0, "fast": 25.0, "gigatoken": 20.0, "tokenizers": 4.0, "fastokens": 4.0}
RATE_MBPS = {
    "tokenizer.encode_ordinary": _ENC,
    "tokenizer.encode_ordinary_batch": _ENC,
    "tokenizer.encode_to_numpy": dict(_ENC, core=25.0),
    "tokenizer.steady.encode_ordinary": _ENC,
    "tokenizer.steady.encode_to_numpy": _ENC,
    "tokenizer.cold.encode_ordinary": {k: v / 2 for k, v in _ENC.items()},
    "tokenizer.cold.encode_to_numpy": {k: v / 2 for k, v in _ENC.items()},
    "tokenizer.decode_bytes": {"tiktoken": 30.0, "fast": 400.0, "fast[1 thread]": 300.0,
                               "fast[foreign-ints]": 250.0, "fast[array]": 400.0, "gigatoken": 30.0,
                               "tokenizers": 10.0, "fastokens": 5.0},
    "single word": {"tiktoken": 0.5, "fast": 5.0, "fast[1 thread]": 5.0, "gigatoken": 1.0, "tokenizers": 1.0,
                    "fastokens": 0.5},
    "single number": {"tiktoken": 0.28, "fast": 5.0, "fast[1 thread]": 5.0, "gigatoken": 0.5, "tokenizers": 0.5,
                      "fastokens": 0.28},
}
# Building the corpus from the files (once; it is cached in the temp folder) and loading both
# vocabularies, on the first case.
SETUP_S = {"quick": 4.0, "full": 25.0}
# Steady cases: rounds after the warm-up call (each gets a slice of the corpus of its own), and the
# share of the corpus they use. Cold cases: rounds, each a fresh process per implementation, and the
# bytes of the pass (the first documents of the corpus, per document).
STEADY_ROUNDS = {"quick": 5, "full": 7}
STEADY_SHARE = {"quick": 0.5, "full": 0.5}
COLD_ROUNDS = {"quick": 5, "full": 5}  # a median of 3 fresh processes was off by 2x once in 3 runs
COLD_BYTES = {"quick": max(300_000, QUICK_SIZE // 4), "full": 8 * MB}
# Seconds to start one cold child (a Python interpreter and one library, never torch), counted in the
# plan; the children of a case start side by side.
CHILD_START_S = 0.5


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
    plan = "quick" if ctx.quick else "full"

    size = QUICK_SIZE if ctx.quick else FULL_SIZE
    if ctx.dry_run:  # the plan only: no corpus is read
        docs, text, nbytes, shape = [], "", size, f"{size // MB} MB mixed"
        summary = ""
    else:
        docs = corpus(size)
        text = "\n".join(docs)
        nbytes = len(text.encode("utf-8"))
        shape = _describe(docs)
        summary = corpus_summary(docs)

    # The peers that are installed (tiktoken always is: it is the baseline), each checked for exactness.
    peers: dict[str, Peer] = {}
    for name in PEERS[1:]:
        reason = peer_skip_reason(name)
        if reason:
            ctx.skip(f"tokenizer: {reason}")
            continue
        if ctx.dry_run:
            peers[name] = Peer(name, _dist_version(name) or "?", {}, None, None, None, None)
            peers[name].exact = True
            continue
        try:
            peer = build_peer(name)
        except Exception as e:  # a peer that cannot load GPT-2 is reported, not fatal
            ctx.skip(f"tokenizer: peer {name} failed to load GPT-2 ({type(e).__name__}: {e})")
            continue
        if peer is None:
            ctx.skip(f"tokenizer: peer {name} could not be imported")
            continue
        truth_memo: dict = {}

        def truth(t, memo=truth_memo):
            if t not in memo:
                memo[t] = enc.encode_ordinary(t)
            return memo[t]

        # checked on an instance of its own: a peer that caches by content must not have seen the text
        # it is timed on
        peer.exact = check_exact(build_peer(name), truth, docs, adversarial_texts(1 if not ctx.quick else 7))
        peers[name] = peer
    if peers and not ctx.dry_run:
        for p in peers.values():
            if not p.exact:
                ctx.skip(f"tokenizer: peer {p.name} {p.version} is NOT exact (its ids differ from tiktoken's); "
                         "its rows are marked")

    out: list[Case] = []
    memo: dict = {}
    notes = FieldNotes()

    def ids(tok):  # computed on first use (the untimed warm-up call), not when the cases are listed
        key = f"ids-{id(tok)}"
        if key not in memo:
            memo[key] = tok(text)
        return memo[key]

    def id_array():
        if "array" not in memo:
            memo["array"] = fast.encode_to_numpy(text)
        return memo["array"]

    def add(op, impl, fn, work, shape_=shape, baseline=False, note="", unit="MB/s", rates=None, rounds=7,
            min_time_s=1.0, extra_setup=0.0, peer=None, warm_work=0.0):
        rate = (rates or RATE_MBPS[op])[impl.split("[")[0] if impl not in (rates or RATE_MBPS[op]) else impl] * MB
        extra_setup += warm_work / rate  # a first call that does more than the timed ones
        is_peer = impl == "tiktoken" or peer is not None
        exact = True if peer is None else bool(peer.exact)
        if peer is not None:
            impl = peer.name if exact else f"{peer.name}[inexact]"
            note = f"{peer.name} {peer.version}: {note}" + ("" if exact else " | NOT exact: ids differ from tiktoken's")
        if baseline and summary:
            note = f"{note} | {summary}"
        ref: list = []
        fn = notes.wrap((op, shape_), impl, ref, fn, is_peer, exact)
        case = Case(op=op, shape=shape_, impl=impl, fn=fn, unit=unit, work=work, baseline=baseline, note=note,
                    min_time_s=min_time_s, interleave=True, min_rounds=rounds, call_s=work / rate,
                    setup_s=(0.0 if out else SETUP_S[plan]) + extra_setup)
        ref.append(case)
        out.append(case)

    def one_thread(fn):  # for pieces long enough to cut, and sequences long enough to decode in parts
        def run():
            threads = long_piece_threads()
            set_long_piece_threads(1)
            try:
                return fn()
            finally:
                set_long_piece_threads(threads)
        return run

    def with_peers(op, method, make, work, **kw):
        """A row for each installed peer that has ``method``: ``make(bound method)`` -> the case's fn."""
        for p in peers.values():
            f = getattr(p, method)
            if ctx.dry_run or f is not None:
                add(op, p.name, make(f) if f is not None else (lambda: None), work, peer=p,
                    note=p.calls.get(method, method), **kw)

    # ---- steady: a warm process, new text every round (a slice of the corpus of its own per round)
    # Four groups (list and array, per document and one string), each with a slice of its own for every
    # timed call, so no implementation has met a slice's text before it is timed on it. These cases
    # run first, before any case has encoded the corpus; the first (untimed) call of each encodes
    # the rest of the corpus, which no slice holds, so that the process is warm (its caches made and
    # filled with the common pieces) when the new text comes.
    rounds = STEADY_ROUNDS[plan]
    n_slices = 4 * rounds
    keep = int(len(docs) * STEADY_SHARE[plan]) if docs else 0
    dealt = [docs[:keep][i::n_slices] for i in range(n_slices)] if docs else [[""]] * n_slices
    warm_docs = docs[keep:] or docs[:1]
    steady_bytes = (sum(len(d.encode("utf-8")) for sl in dealt for d in sl) / n_slices) if docs else \
        size * STEADY_SHARE[plan] / n_slices
    group_no = itertools.count()
    warm_bytes = sum(len(d.encode("utf-8")) for d in warm_docs) if docs else size * (1 - STEADY_SHARE[plan])

    def rotate(one, per_doc, slices):
        turn = itertools.count()
        joined = ["\n".join(sl) for sl in slices]
        warm = "\n".join(warm_docs)

        def run():
            k = next(turn)
            if k == 0:  # the harness's warm-up call
                return [one(d) for d in warm_docs] if per_doc else one(warm)
            k = (k - 1) % len(slices)
            return [one(d) for d in slices[k]] if per_doc else one(joined[k])
        return run

    for op, method, fast_fn, tk_fn, what in (
            ("tokenizer.steady.encode_ordinary", "list", fast.encode_ordinary, enc.encode_ordinary, "list of ints"),
            ("tokenizer.steady.encode_to_numpy", "numpy", fast.encode_to_numpy, enc.encode_to_numpy, "uint32 array")):
        for per_doc in (True, False):
            g = next(group_no)
            slices = dealt[g * rounds:(g + 1) * rounds]
            how = "per document" if per_doc else "one string"
            shape_ = f"{steady_bytes / MB:.2g} MB new each round, {how}"
            add(op, "tiktoken", rotate(tk_fn, per_doc, slices), steady_bytes, shape_=shape_, baseline=True, rounds=rounds,
                min_time_s=0.0, warm_work=warm_bytes, note=f"steady, 1 thread, {what}: tiktoken.Encoding.{fast_fn.__name__}")
            add(op, "fast", one_thread(rotate(fast_fn, per_doc, slices)), steady_bytes, shape_=shape_, rounds=rounds,
                min_time_s=0.0, warm_work=warm_bytes, note=f"steady, 1 thread, {what}: gptfast.Tokenizer.{fast_fn.__name__}")
            with_peers(op, method, lambda f, per_doc=per_doc, slices=slices: rotate(f, per_doc, slices), steady_bytes,
                       shape_=shape_,
                       rounds=rounds, min_time_s=0.0, warm_work=warm_bytes)

    # ---- cold: a fresh child process per call, one pass over the first documents, per document
    crounds = COLD_ROUNDS[plan]
    cold_docs: list[str] = []
    for d in docs:
        if sum(len(x) for x in cold_docs) >= COLD_BYTES[plan]:
            break
        cold_docs.append(d)
    cold_bytes = sum(len(d.encode("utf-8")) for d in cold_docs) if docs else COLD_BYTES[plan]
    cold_path = ""
    if docs:
        blob = "\n\x00\x00DOC\x00\x00\n".join(cold_docs).encode("utf-8")
        cold_path = _tmp_file(f"gptfast-bench-cold-{hashlib.sha256(blob).hexdigest()[:12]}.txt", lambda: blob)
    start_s = (crounds + 1) * CHILD_START_S
    for op, kind, what in (("tokenizer.cold.encode_ordinary", "list", "list of ints"),
                           ("tokenizer.cold.encode_to_numpy", "numpy", "uint32 array")):
        shape_ = f"{cold_bytes / MB:.2g} MB, fresh process, per document"
        for lib in ("tiktoken", "gptfast") + tuple(n for n, p in peers.items() if ctx.dry_run or getattr(p, kind)):
            impl = "fast" if lib == "gptfast" else lib
            call = ("gptfast.Tokenizer's core, " + ("encode_ordinary" if kind == "list" else "encode_to_numpy")
                    if lib == "gptfast" else
                    ("tiktoken.Encoding." + ("encode_ordinary" if kind == "list" else "encode_to_numpy")
                     if lib == "tiktoken" else peers[lib].calls.get(kind, kind)))
            add(op, impl, ColdRuns(lib, kind, cold_path, crounds), cold_bytes, shape_=shape_, baseline=lib == "tiktoken",
                rounds=crounds, min_time_s=0.0, extra_setup=start_s, peer=peers.get(lib),
                note=f"cold: one pass in a fresh process (library, vocabulary and text loaded first), {what}: {call}")

    # ---- repeated: the same text every call
    op = "tokenizer.encode_ordinary"
    add(op, "tiktoken", lambda: enc.encode_ordinary(text), nbytes, baseline=True,
        note="repeated text, one string, 1 thread, list of ints: tiktoken.Encoding.encode_ordinary")
    add(op, "fast", one_thread(lambda: fast.encode_ordinary(text)), nbytes,
        note="repeated text, one string, 1 thread, list of ints: gptfast.Tokenizer.encode_ordinary")
    with_peers(op, "list", lambda f: (lambda: f(text)), nbytes)

    op = "tokenizer.encode_ordinary_batch"
    add(op, "tiktoken", lambda: enc.encode_ordinary_batch(docs, num_threads=2), nbytes, baseline=True,
        note="repeated text, 2 threads: tiktoken.Encoding.encode_ordinary_batch(docs, num_threads=2)")
    add(op, "fast", lambda: fast.encode_ordinary_batch(docs, num_threads=2), nbytes,
        note="repeated text, 2 threads: gptfast.Tokenizer.encode_ordinary_batch(docs, num_threads=2)")
    with_peers(op, "batch", lambda f: (lambda: f(docs)), nbytes)

    op = "tokenizer.encode_to_numpy"
    add(op, "tiktoken", lambda: enc.encode_to_numpy(text), nbytes, baseline=True,
        note="repeated text, one string, uint32 array: tiktoken.Encoding.encode_to_numpy")
    add(op, "core", lambda: core.count_ordinary(text), nbytes,
        note="the C++ core alone: ids into a buffer, no Python objects")
    add(op, "fast", lambda: fast.encode_to_numpy(text), nbytes,
        note="repeated text, one string, uint32 array: gptfast.Tokenizer.encode_to_numpy")
    with_peers(op, "numpy", lambda f: (lambda: f(text)), nbytes)

    op = "tokenizer.decode_bytes"
    # Each tokenizer decodes the list its own encode made (the round trip); the same ids either way.
    add(op, "tiktoken", lambda: enc.decode_bytes(ids(enc.encode_ordinary)), nbytes, baseline=True,
        note="list of ints -> bytes: tiktoken.Encoding.decode_bytes")
    parts = f"in parts on {long_piece_threads()} threads"
    add(op, "fast", lambda: fast.decode_bytes(ids(fast.encode_ordinary)), nbytes,
        note=f"list of ints -> bytes, {parts}: gptfast.Tokenizer.decode_bytes")
    add(op, "fast[1 thread]", one_thread(lambda: fast.decode_bytes(ids(fast.encode_ordinary))), nbytes,
        note="list of ints -> bytes")
    add(op, "fast[foreign-ints]", lambda: fast.decode_bytes(ids(enc.encode_ordinary)), nbytes,
        note=f"tiktoken's list: every int object is read, {parts}")
    add(op, "fast[array]", lambda: fast.decode_bytes(id_array()), nbytes, note=f"uint32 array, read in place, {parts}")
    for p in peers.values():  # each peer decodes the list it encoded
        if ctx.dry_run or p.decode is not None:
            add(op, p.name, (lambda p=p: p.decode(ids(p.list))) if p.decode else (lambda: None), nbytes, peer=p,
                note=f"its own list: {p.calls.get('decode', 'decode')}")

    import random

    rng = random.Random(0)
    n_word = 200_000 if ctx.quick else 1_000_000
    op = "tokenizer.encode_single_piece"
    from gptfast import _bpe

    core_segment = _bpe._long_piece_segment()
    cut = f"cut across {min(long_piece_threads(), max(1, n_word // core_segment))} threads"

    piece_calls = 8  # the warm-up call and 7 rounds: each call of an implementation gets a piece it has not seen

    def rotating(fn, pieces):  # each call takes the next piece (the same sequence for every implementation)
        turn = itertools.count()
        return lambda: fn(pieces()[next(turn) % piece_calls])

    # One piece of the pattern each: a run of letters, and a run of digits (GPT-2's number tokens
    # overlap in many ways, so the walk backs up more often than in a word). Every call gets a new
    # random piece; the pieces are drawn on the first call.
    for kind, alphabet, note in (("word", "abcdefghijklmnopqrstuvwxyz", "random a-z"),
                                 ("number", "0123456789", "random 0-9")):
        def pieces(kind=kind, alphabet=alphabet):
            if kind not in memo:
                memo[kind] = ["".join(rng.choices(alphabet, k=n_word)) for _ in range(piece_calls)]
            return memo[kind]

        wshape, rates = f"{n_word / MB:g} MB single {kind}", RATE_MBPS[f"single {kind}"]
        kw = dict(shape_=wshape, rates=rates, min_time_s=0.0, rounds=piece_calls - 1)
        add(op, "tiktoken", rotating(enc.encode_ordinary, pieces), n_word, baseline=True,
            note=f"{note}, a new piece each call: tiktoken.Encoding.encode_ordinary", **kw)
        add(op, "fast", rotating(fast.encode_ordinary, pieces), n_word,
            note=f"{note}, {cut}: gptfast.Tokenizer.encode_ordinary", **kw)
        add(op, "fast[1 thread]", one_thread(rotating(fast.encode_ordinary, pieces)), n_word, note=note, **kw)
        with_peers(op, "list", lambda f, pieces=pieces: rotating(f, pieces), n_word, **kw)
    return out



def field_table(paths: list[str]) -> str:
    """The field as a markdown table from the JSON of one or more runs: each row's ratio to tiktoken
    for every implementation (the range over the runs where there are several), gptfast's ratio to
    the fastest exact peer, and which peer that is."""
    import json

    runs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            runs.append([r for r in json.load(f)["results"] if r["op"].startswith("tokenizer.")])
    impls = ["tiktoken", "fast"] + [p for p in PEERS[1:]]
    rows: dict = {}
    for run in runs:
        by_group: dict = {}
        for r in run:
            by_group.setdefault((r["op"], r["shape"]), {})[r["impl"]] = r["throughput"]
        for key, got in by_group.items():
            base = got.get("tiktoken")
            if not base:
                continue
            row = rows.setdefault(key, {})
            for impl, v in got.items():
                row.setdefault(impl, []).append(v / base)
            exact_peers = {k: v for k, v in got.items() if k in PEERS}
            best = max(exact_peers, key=exact_peers.get)
            if "fast" in got:
                row.setdefault("vs best", []).append((got["fast"] / exact_peers[best], best))

    def span(xs):
        lo, hi = min(xs), max(xs)
        return f"{lo:.2f}×" if abs(hi - lo) < 0.005 else f"{lo:.2f}–{hi:.2f}×"

    head = ["row", "shape"] + [("gptfast" if i == "fast" else i) for i in impls] + ["gptfast / fastest exact peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, shape), row in rows.items():
        cells = [op.replace("tokenizer.", ""), shape]
        for impl in impls:
            marks = [k for k in row if k.split("[")[0] == impl and (k == impl or k.endswith("[inexact]"))]
            cells.append(span(row[marks[0]]) + (" (inexact)" if marks[0].endswith("[inexact]") else "")
                         if marks else "—")
        vb = row.get("vs best")
        cells.append(f"{span([v for v, _ in vb])} ({', '.join(sorted({b for _, b in vb}))})" if vb else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m bench.cases_tokenizer RUN.json [RUN.json ...]
    print(field_table(sys.argv[1:]))
