"""The core's block splitter (64 bytes at a time, csrc/bpe.cpp) against tiktoken, the oracle.

Its pieces come from bit masks per block of 64 bytes, with state carried from block to block: a
character of 2 or 3 bytes gets its class once and may run into the next block, and a piece-by-piece
path takes what the masks do not (characters of 4 bytes, whitespace that is not ASCII). So these
texts put every rule of the pattern at every offset around a block's edges: contractions, a space
joining what follows, whitespace runs, the end of the text, and ASCII next to longer characters.
"""

import random

import pytest

tiktoken = pytest.importorskip("tiktoken")

from gptfast.tokenizer import Tokenizer  # noqa: E402


def _boundary_vocab():
    """Every byte and every pair of ASCII bytes, at shuffled ranks: a token never crosses a piece
    boundary, so with every pair a token the ids show nearly every cut the splitter makes."""
    ranks = {bytes([b]): b for b in range(256)}
    pairs = [bytes([a, b]) for a in range(128) for b in range(128)]
    random.Random(5).shuffle(pairs)
    for p in pairs:
        ranks[p] = len(ranks)
    return ranks


@pytest.fixture(scope="module")
def boundaries():
    ranks = _boundary_vocab()
    pat = tiktoken.get_encoding("gpt2")._pat_str
    oracle = tiktoken.Encoding("pairs", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
    return oracle, Tokenizer(ranks, {}, name="pairs", impl="fast")


SNIPPETS = [
    "'s", "'re", "'ll", "'ve", "'d", "'m", "'t", "x'sy", "x'lly", "?'s", " 's", "'s's", "'ll've'd",
    "''s", "a''s", "\n's", "\t'll", "  's", "1'm", "'S", "'l", "'v", "'", "x'",
    "   abc", "\n\nabc", "\t abc", " \tabc", "  123", "\n\n123", "\t !!", "  !!", " \n x", "a \n",
    "word  ", "word \n\n", "x\t", "x ", "  ", "\n",
    "\u00e9t\u00e9", " \u00e9", "\u65e5\u672c", "a\u00a0b", " \u00a0 x", "x\u2028y", "\u2028 's", "e\u0301",
    "\u00a0'll", "\u00e9's", "\u65e5 \u672c", "\u0085x",
]
FILLERS = [
    lambda k: "a" * k,
    lambda k: ("ab cd 12 " * 20)[:k],
    lambda k: (" " * k),
    lambda k: ("x\n" * 70)[:k],
]


def _snippet_texts():
    texts = []
    for snip in SNIPPETS:
        for fill in FILLERS:
            for k in range(131):
                texts.append(fill(k) + snip)
                texts.append(fill(k) + snip + "z" + fill(130 - k))
    return texts


def _check(texts, oracle, mine):
    want = oracle.encode_ordinary_batch(texts, num_threads=2)
    got = mine.encode_ordinary_batch(texts, num_threads=2)
    for t, w, g in zip(texts, want, got):
        assert g == w, repr(t)


def test_snippets_at_every_offset_match_tiktoken(enc, fast):
    texts = _snippet_texts()
    _check(texts, enc, fast)
    # one at a time too (the batch runs on worker threads; this is the calling thread's path)
    for t in texts[::7]:
        assert fast.encode_ordinary(t) == enc.encode_ordinary(t), repr(t)
        assert fast.encode(t) == enc.encode(t), repr(t)


def test_snippets_at_every_offset_cut_where_tiktoken_cuts(boundaries):
    _check(_snippet_texts(), *boundaries)


def test_every_ascii_pair_at_a_block_edge(enc, boundaries):
    """Byte a last in a block and byte b first in the next, for every pair of ASCII bytes, after
    several fillers; and the same one byte later and earlier."""
    oracle, mine = boundaries
    texts = []
    for fill in ("q", " ", "1", "\n", "'"):
        for shift in (-1, 0, 1):
            for a in range(128):
                head = fill * (63 + shift) + chr(a)
                texts.append(head + "".join(chr(b) + fill * 62 + chr(a) for b in range(128)))
    _check(texts, oracle, mine)
    _check(texts, enc, Tokenizer.gpt2(impl="fast"))


def test_long_pieces_across_blocks(enc, fast):
    texts = []
    for k in (63, 64, 65, 127, 128, 129, 200, 300):
        for body in ("a" * k, "7" * k, "!" * k, " " * k, "\n" * k, " \t" * k):
            for before in ("", "x", " ", "'s", "\u00e9"):
                for after in ("", "x", " ", "\n", "'ll", "\u00e9", "\u00a0"):
                    texts.append(before + body + after)
                    texts.append("y" * (64 - len(before) % 64) + before + body + after + " end")
    _check(texts, enc, fast)


def test_random_texts_match_tiktoken(enc, boundaries):
    oracle, mine = boundaries
    fast = Tokenizer.gpt2(impl="fast")
    rng = random.Random(2026)
    alphabet = (list("aaaaeeebcxyzXQ") + list("stlvrdm") * 2 + list("0123456789") + [" "] * 12
                + ["\n"] * 4 + ["\t", "\r", "\x0b", "\x0c", "\x1c", "\x00"] + ["'"] * 6
                + list("?!.,-_#()[]{}:;\"") )
    rare = ["\u00e9", "\u65e5", "\u00a0", "\u2028", "\u0085", "\U0001F600", "\u0301", "\u3000", "\u00b2"]
    texts = []
    for _ in range(20000):
        n = rng.randrange(301)
        p_rare = rng.choice((0.0, 0.0, 0.01, 0.05))
        texts.append("".join(rng.choice(rare) if rng.random() < p_rare else rng.choice(alphabet) for _ in range(n)))
    _check(texts, enc, fast)
    _check(texts, oracle, mine)


# Characters of 2 and 3 bytes of each class: letters (Cyrillic, Devanagari, CJK, Latin), marks and
# other symbols (no letter: a class of their own in the pattern), digits that are not ASCII, and
# whitespace that is not ASCII (which the masks leave to the piece-by-piece path).
WIDE = ["\u043f", "\u0418", "\u00e9", "\u0915", "\u093f", "\u0301", "\u0482", "\u00ab", "\u201c",
        "\u2014", "\u0663", "\u0966", "\u00b2", "\uff11", "\u65e5", "\u00a0", "\u3000", "\u2028",
        "\u0085", "\U0001F600"]


def test_wide_characters_across_block_edges(enc, fast):
    """Each longer character with its bytes on either side of a block's edge (every shift), after
    and before ASCII and other longer characters, so that a character's class must carry over."""
    texts = []
    for fill in ("q", " ", "1", "\u0436", "\u0915", "\u00e9x"):
        for w in WIDE:
            for nxt in ("", "a", " ", "'s", "7", "\u0436", "\u093f", w):
                for shift in range(-3, 4):
                    head = fill * 70
                    head = head.encode()[: 64 + shift].decode("utf-8", errors="ignore")
                    texts.append(head + w + nxt + " " + w * 3 + "z")
                    texts.append(" " + head + " " + w + nxt)
    _check(texts, enc, fast)


def test_random_wide_texts_match_tiktoken(enc, fast):
    rng = random.Random(64)
    ascii_part = list("aestlvrdm0179") + [" "] * 6 + ["\n", "\t", "'", "'", ".", "-", "?"]
    texts = []
    for _ in range(6000):
        n = rng.randrange(400)
        p_ascii = rng.choice((0.0, 0.1, 0.5))
        texts.append("".join(rng.choice(ascii_part) if rng.random() < p_ascii else rng.choice(WIDE[:15])
                             if rng.random() < 0.97 else rng.choice(WIDE) for _ in range(n)))
    _check(texts, enc, fast)
