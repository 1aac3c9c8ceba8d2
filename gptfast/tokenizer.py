"""``gptfast.Tokenizer``: GPT-2's byte-pair encoding, with the ids of tiktoken's ``gpt2`` encoding.

>>> from gptfast import Tokenizer
>>> tok = Tokenizer.gpt2()
>>> tok.encode("Hello, do you like tea?")
[15496, 11, 466, 345, 588, 8887, 30]
>>> tok.decode([15496, 11, 466, 345, 588, 8887, 30])
'Hello, do you like tea?'

The work is done by a C++ core (``gptfast._bpe``); ``gptfast.bpe_reference`` is the same
algorithm in plain Python, used when the extension is missing and by the tests. See
docs/tokenizer.md for the details, the speed and the one deliberate difference from tiktoken.
"""

from __future__ import annotations

import base64
import functools
import json
import operator
import os
import pathlib
import warnings
from typing import AbstractSet, Callable, Collection, Iterable, Literal, Sequence

from . import bpe_reference as _ref
from .files import atomic_write_bytes

__all__ = ["Tokenizer", "REQUIRE_EXT_ENV", "set_long_piece_threads", "long_piece_threads", "tiktoken_gpt2",
           "gpt2_ranks_bytes"]

#: Set this environment variable to 1 to make a missing C++ extension an error for ``impl="auto"``.
REQUIRE_EXT_ENV = "GPTFAST_REQUIRE_EXT"

ENDOFTEXT = "<|endoftext|>"
PATTERNS = {"gpt2": _ref.GPT2_PATTERN}

# GPT-2's ranks, shipped with the package: the r50k_base.tiktoken file OpenAI publishes (MIT license),
# byte for byte, which holds the ranks of tiktoken's "gpt2" encoding. Checked against this hash on load.
_R50K_FILE = "r50k_base.tiktoken"
_R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

_BUILD_HINT = (
    "build it with a C++17 compiler and pybind11 installed: "
    "`pip install pybind11 && pip install --no-build-isolation -e .` from the repository "
    "(or `python setup.py build_ext --inplace`)"
)

Impl = Literal["auto", "fast", "reference"]


_threads_set = False  # the long-piece thread default is set once, when the extension first loads


def _load_extension():
    try:
        from . import _bpe
    except ImportError as e:
        return None, e
    global _threads_set
    if not _threads_set:
        _threads_set = True
        _bpe.set_long_piece_threads(_usable_cpus())
    return _bpe, None


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS reports one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def set_long_piece_threads(threads: int | None = None) -> None:
    """Set how many threads one very long piece of text may be encoded on.

    A piece is what the GPT-2 pattern cuts text into: a word, a number, a run of spaces or of
    punctuation. Ordinary pieces are a few bytes, but a run of letters or digits can be
    megabytes long; such a piece (from 128 KB) is cut into segments that are encoded at the same
    time and joined exactly, so the ids are the same whatever the setting. ``None`` (the default)
    uses the CPUs this process may run on; ``1`` keeps all work on the calling thread; more than
    1024 counts as 1024 (a piece is never cut finer than 64 KB anyway). Applies to
    the whole process, and only to the C++ core. ``encode_batch`` and its relatives already use
    one thread per text, so their pieces are never cut further. The same setting caps the
    threads ``decode_bytes`` (and ``decode``) use for one sequence of about a million ids or
    more, decoded in parts at the same time; the bytes and errors are those of one pass.

    >>> set_long_piece_threads(1); long_piece_threads()
    1
    >>> set_long_piece_threads()
    """
    if threads is None:
        threads = _usable_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int or None, not {threads!r}")
    ext, _ = _load_extension()
    if ext is None:
        return  # the pure-Python reference encodes on the calling thread
    ext.set_long_piece_threads(min(threads, 1024))


def long_piece_threads() -> int:
    """How many threads one very long piece may be encoded on, or one long sequence of ids decoded
    on (see :func:`set_long_piece_threads`)."""
    ext, _ = _load_extension()
    return ext.long_piece_threads() if ext is not None else 1


def _resolve_impl(impl: str):
    """Return ``(impl, extension module or None)`` for a requested ``impl``."""
    if impl not in ("auto", "fast", "reference"):
        raise ValueError(f"impl must be 'auto', 'fast' or 'reference', not {impl!r}")
    if impl == "reference":
        return "reference", None
    ext, err = _load_extension()
    if ext is not None:
        return "fast", ext
    if impl == "fast":
        raise ImportError(f"impl='fast' needs gptfast's C++ tokenizer (gptfast._bpe), which is not built ({err}); {_BUILD_HINT}")
    if os.environ.get(REQUIRE_EXT_ENV, "") not in ("", "0"):
        raise ImportError(
            f"{REQUIRE_EXT_ENV} is set but gptfast's C++ tokenizer (gptfast._bpe) is not built ({err}); {_BUILD_HINT}"
        )
    warnings.warn(
        f"gptfast's C++ tokenizer is not built ({err}); using the pure-Python reference, which is many times "
        f"slower. To fix: {_BUILD_HINT}",
        RuntimeWarning,
        stacklevel=3,
    )
    return "reference", None


def _fix_surrogates(text: str) -> str:
    """A valid surrogate pair becomes its character, a lone surrogate U+FFFD (as tiktoken does)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _on_core(fn, text, *args):
    """``fn(text, *args)`` on the C++ core; a str (or list of str) holding surrogates, which has no
    UTF-8, is retried with them fixed as tiktoken does."""
    try:
        return fn(text, *args)
    except UnicodeEncodeError:
        fixed = _fix_surrogates(text) if isinstance(text, str) else [_fix_surrogates(t) for t in text]
        return fn(fixed, *args)


def _check_str(text) -> None:
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")


def _parse_tiktoken(data: bytes, source: str) -> dict[bytes, int]:
    """The ``.tiktoken`` format in Python (the reference path): one ``<base64> <rank>`` per line."""
    ranks = {}
    for n, line in enumerate(data.split(b"\n"), 1):
        line = line.rstrip(b"\r")
        if not line:
            continue
        parts = line.split(b" ")
        if len(parts) != 2:
            raise ValueError(f"{source}: line {n}: expected '<base64 token> <rank>'")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except ValueError:
            raise ValueError(f"{source}: line {n}: the token is not valid base64") from None
        if not parts[1].isdigit():
            raise ValueError(f"{source}: line {n}: the rank is not a decimal number")
        if token in ranks:
            raise ValueError(f"{source}: line {n}: the token {token!r} appears twice")
        ranks[token] = int(parts[1])
    return ranks


def _to_tiktoken(ranks: dict[bytes, int]) -> bytes:
    return b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def _gpt2_byte_table() -> dict[str, int]:
    """GPT-2's encoder.json spells each byte as a printable character; this maps them back."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def gpt2_ranks_bytes() -> bytes:
    """The bytes of GPT-2's ranks file (``r50k_base.tiktoken``) that ship inside the package.

    No network and no cache are involved. The file's sha256 is checked, so a damaged install is an
    error that says how to repair it rather than a tokenizer with wrong ids.
    """
    import hashlib
    from importlib import resources

    try:
        data = resources.files("gptfast").joinpath("assets", _R50K_FILE).read_bytes()
    except (FileNotFoundError, OSError) as e:
        raise RuntimeError(
            f"GPT-2's ranks file gptfast/assets/{_R50K_FILE} is missing from this install ({e}); "
            "reinstall the package: pip install --force-reinstall gptfast-from-scratch"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != _R50K_SHA256:
        raise RuntimeError(
            f"GPT-2's ranks file gptfast/assets/{_R50K_FILE} is damaged (sha256 {digest[:12]}..., expected "
            f"{_R50K_SHA256[:12]}...); reinstall the package: pip install --force-reinstall gptfast-from-scratch"
        )
    return data


def tiktoken_gpt2():
    """tiktoken's own ``gpt2`` encoding, built from the ranks the package ships, so it needs no network.

    The same object as ``tiktoken.get_encoding("gpt2")`` gives (same name, split pattern, ranks and
    special token), for comparing against tiktoken offline.

    >>> tiktoken_gpt2().encode("Hello, do you like tea?")
    [15496, 11, 466, 345, 588, 8887, 30]
    """
    try:
        import tiktoken
    except ImportError as e:
        raise ImportError(f"tiktoken_gpt2() builds a tiktoken.Encoding: `pip install tiktoken` ({e})") from None
    try:  # tiktoken's own spelling of the split pattern (the same regex as ours)
        from tiktoken_ext.openai_public import r50k_pat_str as pattern
    except ImportError:
        pattern = _ref.GPT2_PATTERN
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=pattern,
        mergeable_ranks=_parse_tiktoken(gpt2_ranks_bytes(), _R50K_FILE),
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )


@functools.lru_cache(maxsize=None)
def _gpt2_core(impl: str):
    """The GPT-2 vocabulary, loaded once per process and shared by every ``Tokenizer.gpt2()``."""
    data = gpt2_ranks_bytes()
    specials = {ENDOFTEXT: 50256}
    if impl == "fast":
        ext, _ = _load_extension()
        return ext.Encoder.from_tiktoken(data, list(specials.items())), None, specials
    return None, _parse_tiktoken(data, _R50K_FILE), specials


# The default of ``allowed_special``: no special token allowed. A call that leaves it (and
# ``disallowed_special``) as they are is checked for special tokens by the C++ core, in the same
# call that encodes the text. Never changed.
_NONE_ALLOWED: AbstractSet[str] = set()


class Tokenizer:
    """A byte-pair-encoding tokenizer with the API of ``tiktoken.Encoding``.

    Build one with :meth:`gpt2`, :meth:`from_files`, :meth:`from_tiktoken_file`, :meth:`load`,
    :meth:`train`, or directly from ranks (like ``tiktoken.Encoding``):

    >>> tok = Tokenizer({bytes([b]): b for b in range(256)} | {b"ab": 256}, {"<|endoftext|>": 257})
    >>> tok.encode("abc")
    [256, 99]

    ``impl`` picks the engine: ``"fast"`` (the C++ core; an error when it is not built),
    ``"reference"`` (plain Python) or ``"auto"`` (the core, else the reference with a warning; an
    error instead when the environment variable ``GPTFAST_REQUIRE_EXT=1`` is set). Both give the
    same ids. Tokenizers pickle, so they can go to DataLoader workers.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None, *,
                 name: str = "custom", pattern: str = "gpt2", impl: Impl = "auto"):
        impl, ext = _resolve_impl(impl)
        ranks = dict(mergeable_ranks)
        core = ext.Encoder.from_ranks(list(ranks.items()), list((special_tokens or {}).items())) if ext else None
        self._init(name, pattern, impl, core, None if core else ranks, dict(special_tokens or {}))

    def _init(self, name, pattern, impl, core, ranks, specials, source=None):
        if pattern not in PATTERNS:
            raise ValueError(f"unknown split pattern {pattern!r}; the supported one is 'gpt2'")
        self.name = name
        self.pattern = pattern
        self.impl = impl
        self._core = core
        self._ranks = ranks  # bytes -> id; only kept by the reference (the core has its own table)
        self._specials = specials  # str -> id
        self._source = source  # how to rebuild cheaply when unpickled
        self._decoder = None
        if core is None:
            if len({*ranks.values(), *specials.values()}) != len(ranks) + len(specials):
                raise ValueError("two tokens have the same id")
            missing = [b for b in range(256) if bytes([b]) not in ranks]
            if missing:
                raise ValueError(f"the vocabulary lacks the single byte {missing[0]}; every one of the 256 bytes must be a token")
            self._decoder = {i: t for t, i in ranks.items()}
            self._decoder.update({i: s.encode("utf-8") for s, i in specials.items()})
            self._n_vocab = max(self._decoder) + 1
        else:
            self._n_vocab = core.n_vocab
        return self

    @classmethod
    def _make(cls, *args, **kwargs) -> "Tokenizer":
        return cls.__new__(cls)._init(*args, **kwargs)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def gpt2(cls, impl: Impl = "auto") -> "Tokenizer":
        """GPT-2's tokenizer: the ids of ``tiktoken.get_encoding("gpt2")``.

        The ranks ship with the package (no network, no cache), checked by their sha256 on load.

        >>> Tokenizer.gpt2().n_vocab
        50257
        """
        impl, _ = _resolve_impl(impl)
        core, ranks, specials = _gpt2_core(impl)
        return cls._make("gpt2", "gpt2", impl, core, ranks, dict(specials), source=("gpt2", impl))

    @classmethod
    def from_tiktoken_file(cls, path, *, special_tokens: dict[str, int] | None = None, name: str | None = None,
                           pattern: str = "gpt2", impl: Impl = "auto") -> "Tokenizer":
        """Ranks from a ``.tiktoken`` file (``<base64 token> <rank>`` per line)."""
        path = pathlib.Path(path)
        impl, ext = _resolve_impl(impl)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such ranks file; pass the path of a .tiktoken file") from None
        specials = dict(special_tokens or {})
        name = name or path.name.split(".")[0]
        if ext:
            try:
                core = ext.Encoder.from_tiktoken(data, list(specials.items()))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            return cls._make(name, pattern, impl, core, None, specials)
        return cls._make(name, pattern, impl, None, _parse_tiktoken(data, str(path)), specials)

    @classmethod
    def from_files(cls, encoder_json, vocab_bpe, *, name: str = "gpt2", impl: Impl = "auto") -> "Tokenizer":
        """OpenAI's ``encoder.json`` + ``vocab.bpe`` (or Hugging Face's ``vocab.json`` + ``merges.txt``).

        Tokens of ``encoder_json`` that no merge of ``vocab_bpe`` produces (``<|endoftext|>``)
        become special tokens.
        """
        encoder_json, vocab_bpe = pathlib.Path(encoder_json), pathlib.Path(vocab_bpe)
        byte_of = _gpt2_byte_table()

        def to_bytes(s: str, where: str) -> bytes:
            try:
                return bytes(byte_of[c] for c in s)
            except KeyError as e:
                raise ValueError(f"{where}: {s!r} holds {e.args[0]!r}, which is not one of GPT-2's byte characters") from None

        try:
            with open(encoder_json, encoding="utf-8") as f:
                encoder = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{encoder_json}: no such file; pass the path of GPT-2's encoder.json (or vocab.json)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{encoder_json}: line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(encoder, dict):
            raise ValueError(f"{encoder_json}: line 1: expected a JSON object mapping tokens to ids")
        known = {bytes([b]) for b in range(256)}
        try:
            lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
        except FileNotFoundError:
            raise FileNotFoundError(f"{vocab_bpe}: no such file; pass the path of GPT-2's vocab.bpe (or merges.txt)") from None
        for n, line in enumerate(lines, 1):
            if not line.strip() or (n == 1 and line.startswith("#version")):
                continue
            parts = line.rstrip("\r").split(" ")
            if len(parts) != 2:
                raise ValueError(f"{vocab_bpe}: line {n}: expected two tokens separated by one space, found {line!r}")
            joined = parts[0] + parts[1]
            if joined not in encoder:
                raise ValueError(f"{vocab_bpe}: line {n}: the merge {line!r} makes {joined!r}, which {encoder_json.name} lacks")
            known.add(to_bytes(joined, f"{vocab_bpe}: line {n}"))
        ranks, specials = {}, {}
        for s, i in encoder.items():
            if not isinstance(i, int):
                raise ValueError(f"{encoder_json}: the id of {s!r} is not an integer")
            b = bytes(byte_of[c] for c in s) if all(c in byte_of for c in s) else None
            if b is not None and b in known:
                ranks[b] = i
            else:
                specials[s] = i
        missing = known - ranks.keys()
        if missing:
            raise ValueError(f"{encoder_json}: lacks the token {sorted(missing)[0]!r}")
        return cls(ranks, specials, name=name, impl=impl)

    @classmethod
    def load(cls, path, *, impl: Impl = "auto") -> "Tokenizer":
        """Read what :meth:`save` wrote: ``path`` (ranks) and its ``.json`` sidecar."""
        path = pathlib.Path(path)
        side = _sidecar(path)
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{side}: no such file; Tokenizer.load needs the JSON written beside the ranks by save()") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{side}: line {e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_tiktoken_file(path, special_tokens=meta.get("special_tokens", {}), name=meta.get("name"),
                                      pattern=meta.get("pattern", "gpt2"), impl=impl)

    def save(self, path) -> None:
        """Write the ranks to ``path`` (``.tiktoken`` format) and the pattern and special tokens to
        a JSON sidecar beside it (``path`` with the suffix ``.json``). Atomic."""
        path = pathlib.Path(path)
        side = _sidecar(path)
        data = self._core.to_tiktoken() if self._core is not None else _to_tiktoken(self._ranks)
        meta = {"name": self.name, "pattern": self.pattern, "pattern_regex": PATTERNS[self.pattern],
                "special_tokens": self._specials, "n_vocab": self.n_vocab}
        atomic_write_bytes(path, data)
        atomic_write_bytes(side, (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))

    @classmethod
    def train(cls, texts: str | Iterable[str], vocab_size: int, *, pattern: str = "gpt2",
              special_tokens: Sequence[str] = (ENDOFTEXT,), impl: Impl = "auto", progress: bool = True,
              num_threads: int | None = None, name: str = "trained") -> "Tokenizer":
        """Learn a byte-level BPE vocabulary of ``vocab_size`` tokens from ``texts``.

        ``vocab_size`` counts the 256 byte tokens and the special tokens. Each step merges the most
        frequent adjacent pair (ties: the smallest pair of byte strings), so training is
        deterministic; the C++ core and the reference learn the same merges. Special tokens are cut
        out of the texts and get the last ids.

        >>> tok = Tokenizer.train(["low lower lowest"] * 10, 256 + 3 + 1, progress=False)
        >>> tok.encode("lowest")
        [257, 101, 115, 116]
        """
        if pattern not in PATTERNS:
            raise ValueError(f"unknown split pattern {pattern!r}; the supported one is 'gpt2'")
        texts = [texts] if isinstance(texts, str) else list(texts)
        for t in texts:
            _check_str(t)
        specials = list(dict.fromkeys(special_tokens))
        num_merges = vocab_size - 256 - len(specials)
        if num_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is below 256 byte tokens + {len(specials)} special tokens; "
                             f"pass vocab_size >= {256 + len(specials)}")
        impl, ext = _resolve_impl(impl)
        bar = None
        if progress and num_merges:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_merges, desc="BPE merges", unit="merge", disable=None)

        def report(done: int) -> None:
            if bar is not None:
                bar.update(done - bar.n)

        try:
            if ext:
                texts = [_fix_surrogates(t) for t in texts]
                merges, _ = ext.train(texts, specials, num_merges, num_threads or os.cpu_count() or 1, report)
            else:
                merges = _ref.train(texts, num_merges, specials, report)
        finally:
            if bar is not None:
                bar.close()
        if len(merges) < num_merges:
            warnings.warn(f"the corpus only supports {len(merges)} merges: the vocabulary has "
                          f"{256 + len(merges) + len(specials)} tokens, not {vocab_size}", RuntimeWarning, stacklevel=2)
        ranks = {bytes([b]): b for b in range(256)}
        ranks.update({m: 256 + i for i, m in enumerate(merges)})
        special_ids = {s: len(ranks) + i for i, s in enumerate(specials)}
        return cls(ranks, special_ids, name=name, pattern=pattern, impl=impl)

    # ------------------------------------------------------------------ pickling

    def __reduce__(self):
        if self._source is not None and self._source[0] == "gpt2":
            return (_rebuild_gpt2, (self.impl,))
        data = self._core.to_tiktoken() if self._core is not None else _to_tiktoken(self._ranks)
        return (_rebuild, (data, self._specials, self.name, self.pattern, self.impl))

    # ------------------------------------------------------------------ properties

    @property
    def n_vocab(self) -> int:
        """The number of ids (the largest id + 1)."""
        return self._n_vocab

    @property
    def max_token_value(self) -> int:
        return self._n_vocab - 1

    @property
    def eot_token(self) -> int:
        """The id of ``<|endoftext|>``."""
        try:
            return self._specials[ENDOFTEXT]
        except KeyError:
            raise AttributeError(f"this vocabulary ({self.name}) has no {ENDOFTEXT} token; pass it in special_tokens") from None

    @property
    def special_tokens_set(self) -> set[str]:
        return set(self._specials)

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        """The ordinary tokens' bytes and ids (built on request from the C++ table)."""
        if self._ranks is None:
            self._ranks = self._core.mergeable_ranks()
        return dict(self._ranks)

    def __repr__(self) -> str:
        return f"<Tokenizer {self.name!r} n_vocab={self.n_vocab} impl={self.impl!r}>"

    # ------------------------------------------------------------------ encoding

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode, treating special tokens as ordinary text.

        >>> Tokenizer.gpt2().encode_ordinary("hello <|endoftext|>")
        [31373, 1279, 91, 437, 1659, 5239, 91, 29]
        """
        if self._core is not None:
            return _on_core(self._core.encode_ordinary, text)
        _check_str(text)
        return _ref.encode_ordinary(_fix_surrogates(text), self._ranks)

    def _allowed(self, text: str, allowed_special, disallowed_special) -> set[str]:
        """tiktoken's rules: returns the allowed set; raises if the text holds a disallowed token."""
        _check_str(text)
        if allowed_special == "all":
            allowed_special = self.special_tokens_set
        if disallowed_special == "all":
            disallowed_special = self.special_tokens_set - set(allowed_special)
        if disallowed_special:
            found = _leftmost(text, disallowed_special)
            if found is not None:
                raise ValueError(
                    f"Encountered text corresponding to disallowed special token {found!r}.\n"
                    f"If you want this text to be encoded as a special token, pass it to `allowed_special`, "
                    f"e.g. `allowed_special={{{found!r}, ...}}`.\n"
                    f"If you want this text to be encoded as normal text, disable the check for this token by "
                    f"passing `disallowed_special=(tok.special_tokens_set - {{{found!r}}})`.\n"
                    f"To disable this check for all special tokens, pass `disallowed_special=()`.\n"
                )
        return set(allowed_special)

    def _plain(self, text, allowed_special, disallowed_special) -> bool:
        """Whether the call has the defaults (no special token allowed, all refused) and a plain str, so
        that the core can check for special tokens in the call that encodes."""
        return (allowed_special is _NONE_ALLOWED and disallowed_special == "all" and self._core is not None
                and type(text) is str)

    def _mask(self, allowed: set[str]):
        return [s in allowed for s, _ in self._core.specials] if allowed else None

    def encode(self, text: str, *, allowed_special: Literal["all"] | AbstractSet[str] = _NONE_ALLOWED,
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Encode ``text``; special tokens follow tiktoken's rules.

        By default a special token in the text raises ``ValueError``; ``allowed_special`` lists
        those to encode as their ids, ``disallowed_special=()`` lets them through as text.

        >>> tok = Tokenizer.gpt2()
        >>> tok.encode("hi<|endoftext|>", allowed_special={"<|endoftext|>"})
        [5303, 50256]
        >>> tok.encode("hi<|endoftext|>", disallowed_special=())
        [5303, 27, 91, 437, 1659, 5239, 91, 29]
        """
        if self._plain(text, allowed_special, disallowed_special):
            ids = _on_core(self._core.encode_plain, text)  # None where the text holds a special token
            if ids is not None:
                return ids
        allowed = self._allowed(text, allowed_special, disallowed_special)
        if self._core is not None:
            return _on_core(self._core.encode, text, self._mask(allowed))
        return self._ref_encode(_fix_surrogates(text), allowed)

    def _ref_encode(self, text: str, allowed: set[str]) -> list[int]:
        ids: list[int] = []
        for segment, special in _ref.cut_specials(text, [s for s in self._specials if s in allowed]):
            ids.extend(_ref.encode_ordinary(segment, self._ranks))
            if special is not None:
                ids.append(self._specials[special])
        return ids

    def encode_to_numpy(self, text: str, *, allowed_special: Literal["all"] | AbstractSet[str] = _NONE_ALLOWED,
                        disallowed_special: Literal["all"] | Collection[str] = "all"):
        """Like :meth:`encode`, as a ``numpy.uint32`` array (no Python list in between).

        >>> Tokenizer.gpt2().encode_to_numpy("hello world")
        array([31373,   995], dtype=uint32)
        """
        if self._plain(text, allowed_special, disallowed_special):
            ids = _on_core(self._core.encode_to_numpy_plain, text)
            if ids is not None:
                return ids
        allowed = self._allowed(text, allowed_special, disallowed_special)
        if self._core is not None:
            return _on_core(self._core.encode_to_numpy, text, self._mask(allowed))
        import numpy as np

        return np.array(self._ref_encode(_fix_surrogates(text), allowed), dtype=np.uint32)

    def encode_ordinary_batch(self, text: list[str], *, num_threads: int = 8) -> list[list[int]]:
        """:meth:`encode_ordinary` of each string, on up to ``num_threads`` threads.

        >>> Tokenizer.gpt2().encode_ordinary_batch(["hello world", "goodbye world"])
        [[31373, 995], [11274, 16390, 995]]
        """
        texts = list(text)
        if self._core is None:
            return [self.encode_ordinary(t) for t in texts]
        n = max(1, min(num_threads, os.cpu_count() or 1))
        return _on_core(self._core.encode_batch, texts, None, n)

    def encode_batch(self, text: list[str], *, num_threads: int = 8,
                     allowed_special: Literal["all"] | AbstractSet[str] = set(),
                     disallowed_special: Literal["all"] | Collection[str] = "all") -> list[list[int]]:
        """:meth:`encode` of each string, on up to ``num_threads`` threads."""
        texts = list(text)
        allowed = set()
        for t in texts:
            allowed = self._allowed(t, allowed_special, disallowed_special)
        if self._core is None:
            return [self._ref_encode(_fix_surrogates(t), allowed) for t in texts]
        n = max(1, min(num_threads, os.cpu_count() or 1))
        mask = self._mask(allowed) or []
        return _on_core(self._core.encode_batch, texts, mask, n)

    def encode_single_token(self, text_or_bytes: str | bytes) -> int:
        """The id of a text that is exactly one token; ``KeyError`` otherwise.

        >>> Tokenizer.gpt2().encode_single_token(" world")
        995
        """
        b = text_or_bytes.encode("utf-8") if isinstance(text_or_bytes, str) else bytes(text_or_bytes)
        if isinstance(text_or_bytes, str) and text_or_bytes in self._specials:
            return self._specials[text_or_bytes]
        r = self._core.rank_of(b) if self._core is not None else self._ranks.get(b)
        if r is None:
            raise KeyError(text_or_bytes)
        return r

    # ------------------------------------------------------------------ decoding

    def decode_bytes(self, tokens: Sequence[int]) -> bytes:
        """The bytes of ``tokens``. Unknown ids raise ``KeyError``, negative or huge ones ``OverflowError``.

        ``tokens`` is a sequence of ints, or a 1-D integer NumPy array, ``array.array`` or tensor. The
        fast path reads arrays in place, which is quicker than a list (see docs/tokenizer.md).

        >>> Tokenizer.gpt2().decode_bytes([31373, 995])
        b'hello world'
        """
        if self._core is not None:
            if type(tokens).__module__ == "torch" and hasattr(tokens, "numpy"):  # read a tensor in place
                tokens = tokens.detach().cpu().numpy()
            return self._core.decode_bytes(tokens)
        # Every id is converted before any is looked up, as tiktoken does, so a TypeError or an
        # OverflowError anywhere wins over a KeyError.
        ids = []
        for t in tokens:
            t = operator.index(t)
            if t < 0 or t >= 1 << 32:
                raise OverflowError("out of range integral type conversion attempted")
            ids.append(t)
        out = []
        for t in ids:
            try:
                out.append(self._decoder[t])
            except KeyError:
                raise KeyError(f"Invalid token for decoding: {t}") from None
        return b"".join(out)

    def decode(self, tokens: Sequence[int], errors: str = "replace") -> str:
        """Decode to a str; bytes that are not UTF-8 become U+FFFD unless ``errors`` says otherwise.

        >>> Tokenizer.gpt2().decode([31373, 995])
        'hello world'
        """
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)

    def decode_single_token_bytes(self, token: int) -> bytes:
        """The bytes of one token.

        >>> Tokenizer.gpt2().decode_single_token_bytes(995)
        b' world'
        """
        if self._core is not None:
            try:
                return self._core.token_bytes(token)
            except KeyError:
                raise KeyError(token) from None
        if not isinstance(token, int):
            token = int(token.__index__())
        try:
            return self._decoder[token]
        except KeyError:
            raise KeyError(token) from None

    def decode_tokens_bytes(self, tokens: Sequence[int]) -> list[bytes]:
        return [self.decode_single_token_bytes(t) for t in tokens]

    def decode_batch(self, batch: Sequence[Sequence[int]], *, errors: str = "replace", num_threads: int = 8) -> list[str]:
        """:meth:`decode` of each sequence, one after another (``num_threads`` is accepted for tiktoken's
        signature; a single thread here decodes faster than tiktoken's pool)."""
        return [self.decode(t, errors) for t in batch]

    def decode_bytes_batch(self, batch: Sequence[Sequence[int]], *, num_threads: int = 8) -> list[bytes]:
        return [self.decode_bytes(t) for t in batch]


def _leftmost(text: str, tokens: Iterable[str]) -> str | None:
    best, best_tok = -1, None
    for s in tokens:
        if not s:
            continue
        j = text.find(s)
        if j >= 0 and (best < 0 or j < best or (j == best and len(s) > len(best_tok))):
            best, best_tok = j, s
    return best_tok


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_suffix(".json") if path.suffix != ".json" else path.with_name(path.name + ".meta.json")


def _rebuild_gpt2(impl: str) -> Tokenizer:
    return Tokenizer.gpt2(impl=impl)


def _rebuild(data: bytes, specials: dict, name: str, pattern: str, impl: str) -> Tokenizer:
    _, ext = _resolve_impl(impl)
    if ext:
        return Tokenizer._make(name, pattern, impl, ext.Encoder.from_tiktoken(data, list(specials.items())), None, specials)
    return Tokenizer._make(name, pattern, impl, None, _parse_tiktoken(data, "pickled tokenizer"), specials)
