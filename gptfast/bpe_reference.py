"""Byte-pair encoding in plain Python: the readable reference the C++ core is tested against.

This is the algorithm of the book's "BPE from scratch", written to be read:

1. **Split** the text into pieces with the GPT-2 pattern (``split_gpt2``). Merges never cross a
   piece boundary, so "dog." becomes "dog" + ".", and " dog" keeps its leading space.
2. **Merge** each piece's UTF-8 bytes (``bpe``): start from single bytes and repeatedly join the
   adjacent pair whose joined bytes have the lowest rank in the vocabulary (the leftmost pair on
   ties), until no adjacent pair is in the vocabulary. The ranks of the final parts are the ids.
3. **Train** a vocabulary (``train``): count the pieces of a corpus, then repeatedly join the most
   frequent adjacent pair everywhere and give the joined bytes the next rank.

The split pattern is::

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

It is implemented by hand rather than with ``re``/``regex`` for two reasons: the ``\\p{L}`` and
``\\p{N}`` classes must be the Unicode 16.0 ones (``gptfast/_unicode_tables.py``), and a
backtracking engine needs quadratic time (or crashes) on a long whitespace run.

>>> split_gpt2("Hello world's  2024 ½!!")
['Hello', ' world', "'s", ' ', ' 2024', ' ½', '!!']
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

from ._unicode_tables import LETTER, NUMBER, OTHER, RANGES, SPACE  # noqa: F401 (re-exported)

__all__ = ["char_class", "split_gpt2", "bpe", "encode_ordinary", "train", "cut_specials", "GPT2_PATTERN"]

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _class_table() -> bytearray:
    """One byte per code point: its class (built once from the generated ranges, about 1 MB)."""
    table = bytearray(0x110000)  # 0 is OTHER
    for first, last, cls in RANGES:
        table[first:last + 1] = bytes([cls]) * (last - first + 1)
    return table


_CLASS = _class_table()


def char_class(ch: str) -> int:
    """``LETTER``, ``NUMBER``, ``SPACE`` or ``OTHER`` for one character (Unicode 16.0)."""
    return _CLASS[ord(ch)]


def _run_end(text: str, i: int, cls: int) -> int:
    """Index just past the run of characters of class ``cls`` starting at ``i``."""
    n = len(text)
    while i < n and _CLASS[ord(text[i])] == cls:
        i += 1
    return i


def split_gpt2(text: str) -> list[str]:
    """Split ``text`` into pieces exactly as the GPT-2 pattern does (in linear time)."""
    pieces = []
    i, n = 0, len(text)
    while i < n:
        # 's 't 're 've 'm 'll 'd -- ASCII apostrophe, lowercase only
        if text[i] == "'":
            c = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
            if c:
                pieces.append(c)
                i += len(c)
                continue
        cls = char_class(text[i])
        # ' ?\p{L}+' ' ?\p{N}+' ' ?[^\s\p{L}\p{N}]+' -- only U+0020 joins the run after it
        if text[i] == " " and i + 1 < n and char_class(text[i + 1]) != SPACE:
            end = _run_end(text, i + 1, char_class(text[i + 1]))
        elif cls != SPACE:
            end = _run_end(text, i, cls)
        else:
            run = _run_end(text, i, SPACE)
            if run == n:  # whitespace up to the end: one piece
                end = n
            elif run - i >= 2:  # '\s+(?!\S)': leave the last whitespace character for the word after it
                end = run - 1
            else:  # a single whitespace character before a non-space: '\s+'
                end = run
        pieces.append(text[i:end])
        i = end
    return pieces


def bpe(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Merge the bytes of one piece into token ids (lowest-ranked adjacent pair first).

    >>> bpe(b"hug", {b"h": 0, b"u": 1, b"g": 2, b"ug": 3, b"hug": 4})
    [4]
    """
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_rank is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


def encode_ordinary(text: str, ranks: dict[bytes, int]) -> list[int]:
    """Split, then merge each piece: the whole encoder without special tokens."""
    ids: list[int] = []
    for piece in split_gpt2(text):
        ids.extend(bpe(piece.encode("utf-8"), ranks))
    return ids


def cut_specials(text: str, specials: Iterable[str]) -> list[tuple[str, str | None]]:
    """Split ``text`` at occurrences of ``specials`` (leftmost first, longest on ties).

    Returns ``(ordinary_text, special_or_None)`` pairs: each stretch of ordinary text followed by
    the special token that ended it (``None`` after the last stretch).

    >>> cut_specials("a<|x|>b", ["<|x|>"])
    [('a', '<|x|>'), ('b', None)]
    """
    specials = [s for s in specials if s]
    out = []
    pos = 0
    while True:
        best, best_tok = -1, None
        for s in specials:
            j = text.find(s, pos)
            if j >= 0 and (best < 0 or j < best or (j == best and len(s) > len(best_tok))):
                best, best_tok = j, s
        if best < 0:
            out.append((text[pos:], None))
            return out
        out.append((text[pos:best], best_tok))
        pos = best + len(best_tok)


def train(texts: Iterable[str], num_merges: int, specials: Iterable[str] = (),
          progress: Callable[[int], None] | None = None) -> list[bytes]:
    """Learn up to ``num_merges`` merges; returns the new tokens' bytes in rank order (256, 257, ...).

    Ranks 0..255 are the single bytes. Each step joins the adjacent pair with the highest count
    (summed over every piece of the corpus), ties going to the smallest ``(bytes(left),
    bytes(right))``. If the joined bytes already are a token, the pair is joined into it without
    taking a new rank. Stops early when no adjacent pair is left.

    >>> train(["aaab aab"], 2)
    [b'aa', b' aa']
    """
    specials = list(specials)
    # 1. Count the distinct pieces (special tokens are cut out, never learned from).
    counts: Counter[str] = Counter()
    for text in texts:
        for segment, _ in cut_specials(text, specials):
            counts.update(split_gpt2(segment))
    vocab = [bytes([b]) for b in range(256)]  # id -> bytes
    id_of = {v: i for i, v in enumerate(vocab)}
    words = [(list(piece.encode("utf-8")), c) for piece, c in sorted(counts.items(), key=lambda kv: kv[0].encode("utf-8"))]
    merged: list[bytes] = []
    while len(merged) < num_merges:
        # 2. Count every adjacent pair, weighted by how often its piece occurs.
        pairs: Counter[tuple[int, int]] = Counter()
        for symbols, c in words:
            for a, b in zip(symbols, symbols[1:]):
                pairs[a, b] += c
        if not pairs:
            break
        # 3. The most frequent pair wins; ties go to the smallest pair of byte strings.
        a, b = min(pairs, key=lambda p: (-pairs[p], vocab[p[0]], vocab[p[1]]))
        joined = vocab[a] + vocab[b]
        if joined in id_of:
            new = id_of[joined]
        else:
            new = len(vocab)
            vocab.append(joined)
            id_of[joined] = new
            merged.append(joined)
        # 4. Join the pair, left to right, in every piece.
        for symbols, _ in words:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == a and symbols[i + 1] == b:
                    symbols[i:i + 2] = [new]
                i += 1
        if progress is not None:
            progress(len(merged))
    return merged
