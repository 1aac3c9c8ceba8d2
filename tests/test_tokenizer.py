"""gptfast.Tokenizer against tiktoken (the oracle) and the pure-Python reference.

The exactness tests ask for ``impl="fast"`` by name, so they fail (not fall back) when the C++
extension is missing.
"""

import contextlib
import pickle
import random
import sys

import pytest

tiktoken = pytest.importorskip("tiktoken")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gptfast import bpe_reference  # noqa: E402
from gptfast.tokenizer import Tokenizer  # noqa: E402

SCALARS = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]


@pytest.fixture(scope="module")
def ref():
    return Tokenizer.gpt2(impl="reference")


def chunks(items, n):
    step = (len(items) + n - 1) // n
    return [items[i:i + step] for i in range(0, len(items), step)]


# --------------------------------------------------------------------------- every code point

# Each code point c in several contexts; "\n" between items keeps pieces short.
CONTEXTS = [
    lambda c: f"a{c}b",        # inside a word: is c a letter?
    lambda c: f" {c}{c}1",     # after a space, doubled, before a digit: the ' ?' rule, runs, \p{N}
    lambda c: f"1{c}!",        # between a digit and punctuation
    lambda c: f"  {c}\t{c}x",  # after a whitespace run, around a tab: \s+(?!\S) and White_Space
]


@pytest.mark.parametrize("ctx", range(len(CONTEXTS)))
def test_every_scalar_value_matches_tiktoken(enc, fast, ctx):
    texts = ["\n".join(CONTEXTS[ctx](chr(c)) for c in part) for part in chunks(SCALARS, 4)]
    assert fast.encode_ordinary(texts[0]) == enc.encode_ordinary(texts[0])
    assert fast.encode_ordinary_batch(texts[1:], num_threads=2) == enc.encode_ordinary_batch(texts[1:], num_threads=2)


def _boundary_vocab():
    """All bytes, plus (any byte + marker) for a few markers: a merge across a piece boundary is
    impossible, so the ids reveal exactly where the splitter cut."""
    ranks = {bytes([b]): b for b in range(256)}
    for m in b"a1!\t ":
        for b in range(256):
            ranks.setdefault(bytes([b, m]), len(ranks))
    return ranks


def test_every_scalar_value_class_matches_tiktoken():
    """The Unicode 16.0 tables against tiktoken's own regex engine, code point by code point."""
    ranks = _boundary_vocab()
    pat = tiktoken.get_encoding("gpt2")._pat_str
    oracle = tiktoken.Encoding("boundaries", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
    mine = Tokenizer(ranks, {}, name="boundaries", impl="fast")
    for marker in ("a", "1", "!", "\t\tx", " a"):
        texts = ["x".join(f"{chr(c)}{marker}" for c in part) for part in chunks(SCALARS, 4)]
        assert mine.encode_ordinary_batch(texts, num_threads=2) == oracle.encode_ordinary_batch(texts, num_threads=2), repr(marker)


def test_reference_splitter_matches_core_on_every_scalar_value():
    from gptfast import _bpe

    text = "".join(f"{chr(c)}{chr(c)}\t" for c in SCALARS)
    ours = bpe_reference.split_gpt2(text)
    assert [p.encode("utf-8") for p in ours] == _bpe.split_gpt2(text)


# --------------------------------------------------------------------------- the pattern's rules

RULES = [
    # whitespace: the last whitespace character goes to the next word; only U+0020 attaches
    "a  b", "a   b", "a\tb", "a \tb", "a\t b", "a\u00a0b", "a \u00a0b", "a\u3000b", "a \u3000b",
    "a\n\nb", "a \n b", "a  ", "  ", " ", "\t", "x\t\t", " \n", "a\r\nb", "a \r\n  b", "a\u2028b",
    "\u0085x", "a\u200bb", "a\ufeffb", "a\u180eb", "a\u1680b", "a\u2000\u2001 b", "  !", " \t!",
    "a\x1cb", "a\x1fb", "\x0b\x0cx", "end \n",
    # contractions: ASCII apostrophe, lowercase, at a piece start
    "don't", "I'm", "we're", "they've", "she'll", "he'd", "it's", "DON'T", "I'M", "it'S", "x'Ll",
    "'s", "''s", "'", "'ll", "'l", "'re'", "a'sb", "!'s", " 's", "it\u2019s", "it`s", "'''",
    # numbers: one run, no chunking into 1-3 digits
    "1234567890123", " 2024", "x2", "²³", "½¼", "ⅫⅣ", "٣٤٥", "१२३", "𝟘𝟙", "1.5", "-3", "3rd",
    "①②", "1,000,000",
    # marks, emoji, punctuation, control characters
    "e\u0301", "cafe\u0301!", " \u0301", "👩\u200d💻", "👍🏽", "🇺🇸", "\u200d", "a\ufe0fb", "¡Hola!",
    "...", "!!!???", "\x00\x01\x02", "a\x00b", "\x7f", "<|endoftext|>", "日本語のテキスト", "한국어",
    "Ελληνικά", "עברית", "العربية", "ไทย", "ᚠᛇᚻ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "Ǆǅǆ", "ʰʲ", "ᴬᴮ", "ⓐⓑ",
]


@pytest.mark.parametrize("text", RULES)
def test_pattern_rules(enc, fast, ref, text):
    expected = enc.encode_ordinary(text)
    assert fast.encode_ordinary(text) == expected
    assert ref.encode_ordinary(text) == expected
    assert fast.decode(expected) == text


def test_whitespace_class_is_exactly_white_space():
    from gptfast._unicode_tables import SPACE

    ws = {c for c in SCALARS if bpe_reference.char_class(chr(c)) == SPACE}
    assert ws == {*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
                  0x205F, 0x3000}


# --------------------------------------------------------------------------- special tokens

def test_special_tokens(enc, fast, ref):
    text = "hi<|endoftext|> there<|endoftext|>"
    for tok in (fast, ref):
        assert tok.encode(text, allowed_special={"<|endoftext|>"}) == enc.encode(text, allowed_special={"<|endoftext|>"})
        assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
        assert tok.encode(text, disallowed_special=()) == enc.encode(text, disallowed_special=())
        assert tok.encode_ordinary(text) == enc.encode_ordinary(text)
        with pytest.raises(ValueError, match="<|endoftext|>"):
            tok.encode(text)
        with pytest.raises(ValueError):
            enc.encode(text)
        assert (tok.encode_to_numpy(text, allowed_special="all").tolist()
                == enc.encode_to_numpy(text, allowed_special="all").tolist())
        assert tok.encode_to_numpy("x").dtype == enc.encode_to_numpy("x").dtype
        assert tok.special_tokens_set == enc.special_tokens_set
        assert tok.eot_token == enc.eot_token == 50256
        assert tok.n_vocab == enc.n_vocab
        assert tok.decode([50256]) == "<|endoftext|>"


def test_several_special_tokens_leftmost_longest():
    ranks = {bytes([b]): b for b in range(256)}
    specials = {"<a>": 256, "<a><b>": 257, "<b>": 258}
    tiktoken_enc = tiktoken.Encoding("s", pat_str=tiktoken.get_encoding("gpt2")._pat_str, mergeable_ranks=ranks,
                                     special_tokens={"<b>": 258})
    for impl in ("fast", "reference"):
        tok = Tokenizer(ranks, specials, impl=impl)
        assert tok.encode("x<a><b>y<b>", allowed_special="all") == [120, 257, 121, 258]
        assert tok.encode("x<a>", allowed_special={"<a>"}) == [120, 256]
        with pytest.raises(ValueError, match="<a><b>"):
            tok.encode("x<a><b>")
        # with one special token, the same as tiktoken
        one = Tokenizer(ranks, {"<b>": 258}, impl=impl)
        for text in ("a<b>b<b>", "<b><b>", "<<b>>"):
            assert one.encode(text, allowed_special="all") == tiktoken_enc.encode(text, allowed_special="all")


def test_default_arguments_refuse_special_tokens_anywhere(enc, fast, ref):
    # Left at their defaults, encode and encode_to_numpy look for the special tokens in the same
    # call that encodes (on the fast engine, in C++): the result and the error must be tiktoken's,
    # wherever the token is, whatever the string's width, and for text that only nearly holds one.
    class Str(str):
        pass

    eot = "<|endoftext|>"
    near = ["<|endoftext|", "|endoftext|>", "<|endoftext |>", "<|ENDOFTEXT|>", "<<|endoftext||>>"[:-3]]
    for tok in (fast, ref):
        for body in ("plain ascii " * 700, "café " * 700, "日本語 " * 700, "emoji 😀 " * 700):
            for text in [body + n for n in near] + [body]:
                assert tok.encode(text) == enc.encode(text)
                assert tok.encode_to_numpy(text).tolist() == enc.encode_to_numpy(text).tolist()
            for at in (0, len(body) // 2, len(body)):
                text = body[:at] + eot + body[at:]
                for call in (tok.encode, tok.encode_to_numpy, lambda t: tok.encode(Str(t))):
                    with pytest.raises(ValueError, match="disallowed special token"):
                        call(text)
                with pytest.raises(ValueError):
                    enc.encode(text)
        # a lone surrogate is replaced as tiktoken does, and a special token beside it still refused
        assert tok.encode("a\udc80b") == enc.encode("a\udc80b")
        assert tok.encode_to_numpy("a\udc80b").tolist() == enc.encode("a\udc80b")  # (tiktoken's own raises)
        with pytest.raises(ValueError, match="disallowed special token"):
            tok.encode("a\udc80" + eot)
        assert tok.encode(Str("hello world")) == enc.encode("hello world")
    # several special tokens: any of them refuses the text, with the leftmost longest named
    ranks = {bytes([b]): b for b in range(256)}
    several = Tokenizer(ranks, {"<a>": 256, "<a><b>": 257, "<b>": 258}, impl="fast")
    assert several.encode("x<a b>") == [120, 60, 97, 32, 98, 62]
    for text, name in (("xx<b>", "<b>"), ("<a>y", "<a>"), ("z<a><b>", "<a><b>")):
        for call in (several.encode, several.encode_to_numpy):
            with pytest.raises(ValueError, match=name):
                call(text)


# --------------------------------------------------------------------------- batches, decoding, errors

def test_long_lists_hold_one_reference_an_element(enc, fast):
    # A list of 1024 ids or more gets its references added per distinct id, in one pass over the
    # distinct ids: each element must still hold exactly one reference, given back when it goes.
    text = "hello world, " * 400 + "".join(chr(0x400 + i % 64) for i in range(3000)) + " 123" * 300
    first = fast.encode_ordinary(text)
    assert first == enc.encode_ordinary(text) and len(first) >= 1024
    for obj in {id(x): x for x in first}.values():
        before = sys.getrefcount(obj)
        if before >= 2**30:  # an immortal int (Python 3.12 and later): nothing is counted
            continue
        again = fast.encode_ordinary(text)
        assert sys.getrefcount(obj) - before == sum(x is obj for x in again)
        del again
        assert sys.getrefcount(obj) == before


def test_batches(enc, fast, ref):
    texts = ["hello world", "", "<|endoftext|> x", "日本語 " * 50, "a" * 300] * 5
    for tok in (fast, ref):
        assert tok.encode_ordinary_batch(texts, num_threads=2) == enc.encode_ordinary_batch(texts, num_threads=2)
        assert (tok.encode_batch(texts, num_threads=2, allowed_special="all")
                == enc.encode_batch(texts, num_threads=2, allowed_special="all"))
        ids = enc.encode_ordinary_batch(texts)
        assert tok.decode_batch(ids) == enc.decode_batch(ids) == texts
        with pytest.raises(ValueError):
            tok.encode_batch(texts)
        assert tok.encode_ordinary_batch([], num_threads=4) == enc.encode_ordinary_batch([]) == []
        assert tok.encode_batch([], num_threads=4) == enc.encode_batch([]) == []


def test_decode(enc, fast, ref):
    text = "Ünïcödé 😀 text\n\twith bytes"
    ids = enc.encode(text)
    for tok in (fast, ref):
        assert tok.decode_bytes(ids) == enc.decode_bytes(ids)
        assert tok.decode(ids) == text
        assert tok.decode([]) == ""
        assert tok.decode_bytes(tuple(ids)) == text.encode()
        # a token cut in the middle of a character
        part = [enc.encode("😀")[0]]
        assert tok.decode(part) == enc.decode(part)
        assert tok.decode(part, errors="ignore") == enc.decode(part, errors="ignore")
        for t in (0, 100, 995, 50256):
            assert tok.decode_single_token_bytes(t) == enc.decode_single_token_bytes(t)
        assert [tok.decode_single_token_bytes(t) for t in ids] == enc.decode_tokens_bytes(ids)
        assert tok.encode_single_token(" world") == enc.encode_single_token(" world")


@pytest.mark.parametrize("bad,error", [([50257], KeyError), ([10**6], KeyError), ([-1], OverflowError),
                                      ([2**32], OverflowError), ([2**70], OverflowError)])
def test_decode_errors_match_tiktoken(enc, fast, ref, bad, error):
    with pytest.raises(error):
        enc.decode(bad)
    for tok in (fast, ref):
        with pytest.raises(error):
            tok.decode([1, *bad])


def test_decode_error_order_matches_tiktoken(enc, fast, ref):
    # tiktoken converts every id before it looks any up: a bad id anywhere beats an unknown one.
    np = pytest.importorskip("numpy")
    own = fast.encode_ordinary("ids the fast path made itself " * 300)  # > one block of ids
    cases = [[60000, -1], [60000, 1.5], own + [60000] + own + [2**40], own + [60000] + own + ["x"],
             own + [60000, 50257], [1, 2, 3] + own + [-5], list(own), own + [True, 2]]
    for ids in cases:
        try:
            want = enc.decode_bytes(ids)
        except Exception as e:
            want = type(e)
        for tok in (fast, ref):
            for arg in (ids, tuple(ids)):
                try:
                    got = tok.decode_bytes(arg)
                except Exception as e:
                    got = type(e)
                assert got == want, (tok, ids[-3:])
    for values, dtype in (([60000, -1], np.int64), ([60000, 2**40], np.uint64), ([60000, 1, -2], np.int8),
                          ([-1, 60000], np.int32), ([60000, 3], np.uint16)):
        arr = np.array(values).astype(dtype)
        for view in (arr, arr[::-1], np.repeat(arr, 3000)[::3]):
            try:
                want = enc.decode_bytes(view)
            except Exception as e:
                want = type(e)
            assert want in (OverflowError, KeyError)
            for tok in (fast, ref):
                with pytest.raises(want):
                    tok.decode_bytes(view)


def test_decode_survives_index_that_changes_the_list(enc, fast, ref):
    # __index__ may run any Python code, even code that empties the list being decoded. The list is
    # then read as Python's own iteration (and tiktoken) reads it, and nothing from freed memory.
    ids = fast.encode_ordinary("a list that changes while it is decoded " * 200)
    tail = enc.encode_ordinary(" and its tail")

    def victim_list():
        class Shrinker:
            def __index__(self):
                victim.clear()
                victim.extend([31373] * (len(ids) + 3))  # "hello": read from the new list onwards
                return 995  # " world"

        victim = ids + [Shrinker()] + tail
        return victim

    want = enc.decode_bytes(victim_list())
    assert want.endswith(b" world" + b"hello" * 2)
    for tok in (fast, ref):
        assert tok.decode_bytes(victim_list()) == want


@pytest.mark.parametrize("dtype", ["uint32", "int64", "uint16", "int32", "uint64", ">u4", "<i8"])
def test_decode_arrays_match_tiktoken(enc, fast, ref, dtype):
    np = pytest.importorskip("numpy")
    text = "Arrays: Ünïcödé 😀, code `x += 1`, and\n\twhitespace."
    ids = np.array(enc.encode(text), dtype=dtype)
    for tok in (fast, ref):
        assert tok.decode_bytes(ids) == enc.decode_bytes(ids) == text.encode()
        assert tok.decode(ids[::2]) == enc.decode(ids[::2])  # a strided view
    assert fast.decode_bytes(np.array([], dtype=dtype)) == b""


def test_decode_other_buffers_and_tensors(enc, fast, ref):
    import array

    ids = enc.encode("array.array, memoryview and torch tensors decode too")
    want = enc.decode_bytes(ids)
    for tok in (fast, ref):
        assert tok.decode_bytes(array.array("I", ids)) == want
        assert tok.decode_bytes(memoryview(array.array("q", ids))) == want
    torch = pytest.importorskip("torch")
    for tok in (fast, ref):
        assert tok.decode_bytes(torch.tensor(ids)) == want
        assert tok.decode_bytes(torch.tensor(ids, dtype=torch.int32)[1:]) == enc.decode_bytes(ids[1:])


def test_decode_array_errors_match_tiktoken(enc, fast, ref):
    np = pytest.importorskip("numpy")
    bad = [(np.array([1, -1], np.int64), OverflowError), (np.array([2**40], np.uint64), OverflowError),
           (np.array([5, 60000], np.uint32), KeyError), (np.array([1.0, 2.0]), TypeError),
           (np.array([[1, 2], [3, 4]]), TypeError)]
    for arr, error in bad:
        with pytest.raises(error):
            enc.decode_bytes(arr)
        for tok in (fast, ref):
            with pytest.raises(error):
                tok.decode_bytes(arr)


def test_decode_grows_its_output(enc, fast):
    # The fast path guesses 3 bytes a token and grows; long tokens force it to grow many times.
    np = pytest.importorskip("numpy")
    longest = max(range(50257), key=lambda t: len(enc.decode_single_token_bytes(t)))
    rng = random.Random(3)
    ids = [longest if rng.random() < 0.5 else rng.randrange(50257) for _ in range(40_000)]
    want = enc.decode_bytes(ids)
    assert len(want) > 3 * len(ids)
    assert fast.decode_bytes(ids) == want
    assert fast.decode_bytes(np.array(ids, dtype=np.uint32)) == want
    for n in (1, 2, 3, 17, 1000):  # short inputs, where the slack and the tail matter most
        assert fast.decode_bytes(ids[:n]) == enc.decode_bytes(ids[:n])


def _raised(fn):
    try:
        fn()
    except Exception as e:  # the type is what is compared
        return type(e)
    return None


def test_decode_long_sequences_across_threads(enc, fast):
    """A sequence of a million ids or more is decoded in parts on several threads: the bytes, and
    which error wins, are those of one pass (and of tiktoken), wherever the parts are cut."""
    np = pytest.importorskip("numpy")
    from gptfast.tokenizer import long_piece_threads, set_long_piece_threads

    longest = max(range(50256), key=lambda t: len(enc.decode_single_token_bytes(t)))
    own = [None] * fast.n_vocab
    for i in fast._core.mergeable_ranks().values():  # the core's own int objects
        own[i] = i
    rng = random.Random(5)
    ids = [longest if rng.random() < 0.2 else rng.randrange(50256) for _ in range(1_700_000)]
    mine = [own[i] for i in ids]
    want = enc.decode_bytes(ids)
    assert len(want) > 3 * len(ids)  # the parts outgrow their first guess
    late_unknown, late_huge, early_str = mine[:], mine[:], mine[:]
    late_unknown[1_650_000] = 50257
    late_huge[1_200_000] = 2**40
    early_str[7] = "7"
    both = late_unknown[:]
    both[3] = "3"
    unknown_then_str = mine[:]
    unknown_then_str[5], unknown_then_str[-2] = 60_000, "x"
    ranks = {bytes([b]): b for b in range(256)}
    holey_fast = Tokenizer(ranks, {"<|end|>": 300}, impl="fast")  # ids 256-299 are no token
    holey_ref = Tokenizer(ranks, {"<|end|>": 300}, impl="reference")
    byte_ids = [rng.randrange(256) for _ in range(1_200_000)]
    late_hole = byte_ids[:]
    late_hole[1_100_000] = 280
    early_str_late_hole = late_hole[:]
    early_str_late_hole[1] = "1"
    before = long_piece_threads()
    try:
        for threads in (1, 2, 3, 4):
            set_long_piece_threads(threads)
            assert fast.decode_bytes(mine) == want, threads
            assert fast.decode_bytes(ids) == want, threads  # ints that are not the core's
            assert fast.decode_bytes(mine[:900_000] + ids[900_000:]) == want, threads
            assert fast.decode_bytes(np.array(ids, dtype=np.uint32)) == want, threads
            assert fast.decode_bytes(np.array(ids, dtype=np.int64)[::-1][::-1]) == want, threads
            for bad in (late_unknown, late_huge, early_str, both, unknown_then_str):
                got = _raised(lambda: fast.decode_bytes(bad))
                assert got is not None and got is _raised(lambda: enc.decode_bytes(bad)), (threads, got)
            with pytest.raises(KeyError, match="50257"):
                fast.decode_bytes(np.array(late_unknown[:1_660_000], dtype=np.uint32))
            # An id below n_vocab that is no token (a gap in the ids) raises inside a part.
            assert holey_fast.decode_bytes(byte_ids) == bytes(byte_ids)
            for bad in (late_hole, early_str_late_hole):
                got = _raised(lambda: holey_fast.decode_bytes(bad))
                assert got is not None and got is _raised(lambda: holey_ref.decode_bytes(bad)), (threads, got)
    finally:
        set_long_piece_threads(before)


def test_single_token_errors(enc, fast, ref):
    for tok in (fast, ref, enc):
        with pytest.raises(KeyError):
            tok.decode_single_token_bytes(60000)


@pytest.mark.parametrize("method", ["encode", "encode_ordinary", "encode_to_numpy"])
def test_non_str_raises_type_error(enc, fast, ref, method):
    for tok in (enc, fast, ref):
        for arg in (5, b"bytes", None):
            with pytest.raises(TypeError):
                getattr(tok, method)(arg)


def test_surrogates(enc, fast, ref):
    for text in ("a\ud83d\ude00b", "a\ud800b", "\udc00", "x\ud83dy\ude00", "\ud800\ud800\udfff"):
        expected = enc.encode(text)
        for tok in (fast, ref):
            assert tok.encode(text) == expected
            assert tok.encode_ordinary(text) == expected
            assert tok.encode_ordinary_batch([text, "ok"]) == [expected, enc.encode("ok")]
            assert tok.encode_to_numpy(text).tolist() == expected


# --------------------------------------------------------------------------- real text, random text

def test_the_verdict(enc, fast, ref, shared_data):
    text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
    expected = enc.encode(text)
    assert len(expected) == 5145
    assert fast.encode(text) == expected
    assert ref.encode(text) == expected
    assert fast.encode_to_numpy(text).tolist() == expected
    assert fast.decode(expected) == text


HOSTILE = [
    "a", "Z", "é", "ß", "中", "ア", "Ω", " ", "  ", "\t", "\n", "\r", "\r\n", "\u00a0", "\u3000", "\u2028", "\u0085",
    "\x0b", "'", "s", "t", "re", "ve", "ll", "m", "d", "S", "1", "9", "²", "½", "Ⅻ", "٣", "!", "?", ".", "-", "`",
    "\u0301", "\u200d", "\ufe0f", "😀", "👩", "💻", "🏽", "\x00", "\x1b", "\x7f", "\ud800", "\udfff", "\ud83d",
    "<|endoftext|>", "<|", "|>", "\U0010ffff", "\ufffd", "ǅ", "𝟙",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(HOSTILE), max_size=60).map("".join))
def test_hypothesis_hostile_alphabet(text):
    enc, fast, ref = _shared()
    expected = enc.encode(text, disallowed_special=())
    assert fast.encode(text, disallowed_special=()) == expected
    assert ref.encode(text, disallowed_special=()) == expected
    assert fast.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_hypothesis_any_text(text):
    enc, fast, ref = _shared()
    expected = enc.encode_ordinary(text)
    assert fast.encode_ordinary(text) == expected
    assert ref.encode_ordinary(text) == expected


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="abcdeé中 ", min_size=100, max_size=2000).map(lambda s: s.replace(" ", "")))
def test_hypothesis_long_pieces(text):
    """Long pieces take the left-to-right backtracking path; it must match the merge rule exactly."""
    enc, fast, _ = _shared()
    assert fast.encode_ordinary(text) == enc.encode_ordinary(text)


_SHARED = {}


def _shared():
    if not _SHARED:
        _SHARED["v"] = (tiktoken.get_encoding("gpt2"), Tokenizer.gpt2(impl="fast"), Tokenizer.gpt2(impl="reference"))
    return _SHARED["v"]


# --------------------------------------------------------------------------- worst cases

def test_long_single_words(enc, fast):
    rng = random.Random(0)
    words = ["a" * 200_000, "ab" * 100_000, "".join(rng.choice("abcdefghij") for _ in range(200_000)),
             "".join(rng.choice("aé中") for _ in range(50_000)), "1" * 100_000, "!" * 100_000]
    for w in words:
        assert fast.encode_ordinary(w) == enc.encode_ordinary(w)
    big = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1_000_000))
    ids = fast.encode_ordinary(big)
    assert fast.decode(ids) == big


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["ab", "abc ", "aaab", "xyzq", "thequickbrownfox", "1234567890", "!?.,;:-_=+",
                        "中文字符", "ÄÖÜäöüß", "😀🎉👍"]),
       st.integers(129, 3000), st.integers(0, 2**32))
def test_long_pieces_many_alphabets(alphabet, size, seed):
    """Pieces past 128 bytes, from alphabets that stress different merges, match tiktoken."""
    enc, fast, _ = _shared()
    assert fast._core.long_piece_method == "backtrack"
    rng = random.Random(seed)
    text = "".join(rng.choice(alphabet) for _ in range(size))
    assert fast.encode_ordinary(text) == enc.encode_ordinary(text)


def test_long_pieces_on_many_threads(enc, gpt2_files):
    """The long-piece tables are built once, on first use, by whichever thread gets there first."""
    rng = random.Random(7)
    texts = ["".join(rng.choice(alpha) for _ in range(rng.randrange(200, 5000)))
             for alpha in ("abcdefghij", "xyz", "ab", "thequick") for _ in range(4)]
    fresh = Tokenizer.from_tiktoken_file(gpt2_files / "gpt2.tiktoken", impl="fast")  # tables not built yet
    assert fresh.encode_ordinary_batch(texts, num_threads=8) == enc.encode_ordinary_batch(texts)


@contextlib.contextmanager
def _long_pieces_cut(threads, min_bytes):
    """Cut long pieces into segments of at least `min_bytes` on up to `threads` threads; restored after."""
    from gptfast import _bpe
    from gptfast.tokenizer import long_piece_threads, set_long_piece_threads

    saved = (long_piece_threads(), _bpe._long_piece_segment())
    set_long_piece_threads(threads)
    _bpe._set_long_piece_segment(min_bytes)
    try:
        yield
    finally:
        set_long_piece_threads(saved[0])
        _bpe._set_long_piece_segment(saved[1])


@pytest.mark.parametrize("alphabet", ["0123456789", "abcdefghijklmnopqrstuvwxyz", "ab", "a", "0", "01", " ",
                                      "!-=", "aaaaaaab", "中文字符", "😀🎉"])
def test_long_pieces_cut_across_threads(enc, fast, alphabet):
    """A long piece cut into segments encoded apart (many cuts, on up to 8 threads) and joined
    gives tiktoken's ids: the joins must find the true token boundaries near every cut."""
    rng = random.Random(alphabet)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(300, 6000))) for _ in range(6)]
    expected = [enc.encode_ordinary(t) for t in texts]
    for threads, min_bytes in ((2, 100), (3, 37), (8, 16), (8, 250)):
        with _long_pieces_cut(threads, min_bytes):
            assert [fast.encode_ordinary(t) for t in texts] == expected, (threads, min_bytes)
            # batch workers encode each piece on their own thread: the same ids
            assert fast.encode_ordinary_batch(texts, num_threads=2) == expected


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["0123456789", "abé", "ab", "0"]).flatmap(
           lambda alphabet: st.text(alphabet=alphabet, min_size=200, max_size=3000)),
       st.integers(2, 8), st.integers(8, 400))
def test_hypothesis_long_pieces_cut(text, threads, min_bytes):
    # One character class per text, so the whole text is one piece of the pattern, long enough to cut.
    enc, fast, _ = _shared()
    with _long_pieces_cut(threads, min_bytes):
        assert fast.encode_ordinary(text) == enc.encode_ordinary(text)


def test_long_piece_threads_setting():
    from gptfast.tokenizer import long_piece_threads, set_long_piece_threads

    before = long_piece_threads()
    try:
        set_long_piece_threads(3)
        assert long_piece_threads() == 3
        set_long_piece_threads(None)
        assert long_piece_threads() >= 1
        set_long_piece_threads(5000)  # documented: more than 1024 counts as 1024
        assert long_piece_threads() == 1024
        for bad in (0, -1, 2.5, "2", True):
            with pytest.raises(ValueError, match="positive int"):
                set_long_piece_threads(bad)
    finally:
        set_long_piece_threads(before)


@pytest.mark.parametrize("alphabet", ["0123456789", "0", "01", "ab", "aaaaaaab", "=-", "0123456789abcdef",
                                      "abcdefghij", " \t", "中文字符"])
def test_long_pieces_with_few_distinct_tokens(enc, fast, alphabet):
    """Pieces of 4 KB and more over a small alphabet: the walk keeps the answers of its pair checks
    (the same few tokens meet again and again); they must stay right, piece after piece."""
    rng = random.Random(alphabet)
    for size in (4096, 9000, 40_000):
        text = "".join(rng.choice(alphabet) for _ in range(size))
        assert fast.encode_ordinary(text) == enc.encode_ordinary(text), size


def _number_tokens(ranks):
    return sum(1 for b in ranks if b.isdigit())  # bytes.isdigit: ASCII digits only


def test_number_pair_table_matches_the_pair_check(enc, gpt2_files):
    """The walk's table of which pairs of number tokens are valid, computed for all pairs at once,
    agrees with the one-pair check on every pair (for GPT-2: 994 tokens, 988,036 pairs)."""
    fresh = Tokenizer.from_tiktoken_file(gpt2_files / "gpt2.tiktoken", impl="fast")
    n = _number_tokens(enc.decode_single_token_bytes(i) for i in range(enc.n_vocab - 1))
    assert fresh._core._check_number_pairs() == (n * n, 0)


@pytest.mark.parametrize("merges", [300, 1200])  # 1200: more number tokens than the table's 1023 rows
def test_number_pairs_in_a_trained_vocabulary(enc, merges):
    rng = random.Random(merges)
    texts = ["".join(rng.choice("0123456789") for _ in range(rng.randrange(50, 2000))) for _ in range(300)]
    trained = Tokenizer.train(texts, 256 + 1 + merges)
    ranks = trained._core.mergeable_ranks()
    assert _number_tokens(ranks) > (1023 if merges == 1200 else 250)
    n = min(_number_tokens(ranks), 1023)
    assert trained._core._check_number_pairs() == (n * n, 0)
    ref = Tokenizer(ranks, {"<|endoftext|>": 256 + merges}, impl="reference")
    other = tiktoken.Encoding("trained", pat_str=enc._pat_str, mergeable_ranks=ranks, special_tokens={})
    for size in (200, 3000, 20_000, 100_000):
        text = "".join(rng.choice("0123456789") for _ in range(size))
        want = other.encode_ordinary(text)
        assert trained.encode_ordinary(text) == want, size
        if size <= 3000:  # the reference's merge loop is quadratic
            assert ref.encode_ordinary(text) == want, size


def test_long_pieces_alternating_vocabularies(enc, fast):
    """One thread encoding long pieces with two vocabularies in turn gets each one's own ids."""
    ranks = _tiny_vocab({b"ab": 256, b"abab": 257, b"ba": 258, b"aab": 259, b"bb": 260, b"abb": 261})
    small_fast, small_ref = Tokenizer(ranks, impl="fast"), Tokenizer(ranks, impl="reference")
    rng = random.Random(3)
    for _ in range(3):
        text = "".join(rng.choice("ab") for _ in range(6000))
        assert small_fast.encode_ordinary(text) == small_ref.encode_ordinary(text)
        digits = "".join(rng.choice("0123456789") for _ in range(6000))
        assert fast.encode_ordinary(digits) == enc.encode_ordinary(digits)


def _tiny_vocab(merges):
    """256 bytes (ranks 0-255), then `merges`: bytes -> rank."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update(merges)
    return ranks


@pytest.mark.parametrize("merges,method", [
    # proper: every token's last merge joins two lower-ranked tokens
    ({b"ab": 256, b"abab": 257, b"ba": 258, b"aab": 259, b"bb": 260, b"abb": 261, b"ababab": 262}, "backtrack"),
    # improper: b"abc" ranks below its parts, so the long-piece path must fall back to merging
    ({b"bc": 300, b"ab": 301, b"abc": 256, b"ca": 257}, "merge"),
    # a token the merge rule never produces (no pair inside b"xyz" is a token): never a candidate
    ({b"ab": 256, b"xyz": 257, b"ba": 258, b"bab": 259}, "backtrack"),
])
def test_long_pieces_custom_vocabularies(merges, method):
    """The fast path, on its own vocabularies, against the reference's plain merge loop."""
    ranks = _tiny_vocab(merges)
    fast = Tokenizer(ranks, impl="fast")
    assert fast._core.long_piece_method == method
    ref = Tokenizer(ranks, impl="reference")
    rng = random.Random(len(merges))
    for size in (129, 200, 1000, 3000):
        for alphabet in ("ab", "abc", "abxyz", "aab"):
            text = "".join(rng.choice(alphabet) for _ in range(size))
            assert fast.encode_ordinary(text) == ref.encode_ordinary(text), (alphabet, size)


def test_million_whitespace_run_then_letter(enc, fast):
    """tiktoken's backtracking gives up here; the pattern defines the answer, and we give it:
    the run minus its last character, then that character with the word."""
    n = 1_000_000
    for ws, tail in ((" ", "a"), ("\t", "a"), ("\n", "1")):
        text = ws * n + tail
        expected = enc.encode_ordinary(ws * (n - 1)) + enc.encode_ordinary(ws + tail)
        if ws != " ":
            expected = enc.encode_ordinary(ws * (n - 1)) + enc.encode_ordinary(ws) + enc.encode_ordinary(tail)
        assert fast.encode_ordinary(text) == expected
    # the reference splitter says the same, in linear time
    assert bpe_reference.split_gpt2(" " * n + "a") == [" " * (n - 1), " a"]


# --------------------------------------------------------------------------- pickling, constructors

def test_pickle(enc, fast, ref):
    text = "pickled tokenizers go to DataLoader workers"
    for tok in (fast, ref):
        clone = pickle.loads(pickle.dumps(tok))
        assert clone.encode(text) == enc.encode(text)
        assert clone.impl == tok.impl and clone.name == "gpt2"
    custom = Tokenizer.train(["some text to learn from, some text"], 256 + 10 + 1, progress=False, impl="fast")
    clone = pickle.loads(pickle.dumps(custom))
    assert clone.encode("some text") == custom.encode("some text")
    assert clone.special_tokens_set == custom.special_tokens_set


def test_from_files_and_tiktoken_file(enc, gpt2_files):
    text = "Files from OpenAI give the same ids.\n  Ünïcödé!"
    expected = enc.encode(text)
    for impl in ("fast", "reference"):
        a = Tokenizer.from_files(gpt2_files / "encoder.json", gpt2_files / "vocab.bpe", impl=impl)
        assert a.encode(text) == expected
        assert a.eot_token == 50256 and a.n_vocab == 50257
        b = Tokenizer.from_tiktoken_file(gpt2_files / "gpt2.tiktoken", special_tokens={"<|endoftext|>": 50256},
                                         impl=impl)
        assert b.encode(text) == expected


def test_bad_files_name_file_and_line(tmp_path, gpt2_files):
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"IQ== 0\nIg== 1\nnot base64! 2\n")
    for impl in ("fast", "reference"):
        with pytest.raises(ValueError, match=r"bad\.tiktoken.*line 3"):
            Tokenizer.from_tiktoken_file(bad, impl=impl)
        with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
            Tokenizer.from_tiktoken_file(tmp_path / "missing.tiktoken", impl=impl)
    bpe = tmp_path / "vocab.bpe"
    lines = (gpt2_files / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    lines[5] = "onlyonetoken"
    bpe.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.bpe: line 6"):
        Tokenizer.from_files(gpt2_files / "encoder.json", bpe)
    js = tmp_path / "encoder.json"
    js.write_text('{"a": 0,\n "b": }', encoding="utf-8")
    with pytest.raises(ValueError, match=r"encoder\.json: line 2"):
        Tokenizer.from_files(js, gpt2_files / "vocab.bpe")


# --------------------------------------------------------------------------- training

def test_training_core_matches_reference(shared_data):
    text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
    texts = [text[:8000], "<|endoftext|>".join([text[8000:12000], "déjà vu 1234 😀😀 " * 20])]
    size = 256 + 400 + 1
    fast = Tokenizer.train(texts, size, impl="fast", progress=False)
    ref = Tokenizer.train(texts, size, impl="reference", progress=False)
    assert fast.mergeable_ranks == ref.mergeable_ranks
    rng = random.Random(1)
    for alphabet in ("thequickbrownfox", "ab c"):  # pieces past 128 bytes take the long-piece path
        long = "".join(rng.choice(alphabet) for _ in range(2000)).replace(" ", "")
        assert fast.encode_ordinary(long) == ref.encode_ordinary(long)
    assert fast.n_vocab == ref.n_vocab == size
    assert fast.eot_token == ref.eot_token == size - 1
    assert not any(b"<|" in t for t in fast.mergeable_ranks)  # special tokens are never learned from
    sample = text[12000:14000]
    assert fast.encode(sample) == ref.encode(sample)
    assert fast.decode(fast.encode(sample)) == sample
    # deterministic
    again = Tokenizer.train(list(reversed(texts)), size, impl="fast", progress=False, num_threads=1)
    assert again.mergeable_ranks == fast.mergeable_ranks


@pytest.mark.filterwarnings("ignore:the corpus only supports")
@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(alphabet="aab ba\u00e9!1", max_size=40), max_size=8), st.integers(0, 40))
def test_training_hypothesis(texts, merges):
    fast = Tokenizer.train(texts, 256 + merges + 1, impl="fast", progress=False)
    ref = Tokenizer.train(texts, 256 + merges + 1, impl="reference", progress=False)
    assert fast.mergeable_ranks == ref.mergeable_ranks


def test_save_load(tmp_path):
    tok = Tokenizer.train(["the cat sat on the mat"] * 3, 256 + 10 + 2, special_tokens=("<|endoftext|>", "<|pad|>"),
                          progress=False)
    path = tmp_path / "cats.tiktoken"
    tok.save(path)
    assert (tmp_path / "cats.json").is_file()
    for impl in ("fast", "reference"):
        back = Tokenizer.load(path, impl=impl)
        assert back.mergeable_ranks == tok.mergeable_ranks
        assert back.special_tokens_set == {"<|endoftext|>", "<|pad|>"}
        assert back.encode("the cat<|pad|>", allowed_special="all") == tok.encode("the cat<|pad|>", allowed_special="all")
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["x"], 100)


def test_save_writes_with_the_users_umask(tmp_path):
    import os
    import stat

    tok = Tokenizer.train(["the cat sat on the mat"] * 3, 256 + 5, progress=False)
    old = os.umask(0o027)
    try:
        tok.save(tmp_path / "cats.tiktoken")
    finally:
        os.umask(old)
    modes = {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in tmp_path.iterdir()}
    assert modes == {"cats.tiktoken": "0o640", "cats.json": "0o640"}


# --------------------------------------------------------------------------- choosing the engine

def test_impl_selection(monkeypatch):
    import gptfast.tokenizer as T

    monkeypatch.setattr(T, "_load_extension", lambda: (None, ImportError("not built")))
    monkeypatch.delenv(T.REQUIRE_EXT_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="not built"):
        tok = T.Tokenizer.gpt2()
    assert tok.impl == "reference"
    with pytest.raises(ImportError, match="impl='fast'"):
        T.Tokenizer.gpt2(impl="fast")
    monkeypatch.setenv(T.REQUIRE_EXT_ENV, "1")
    with pytest.raises(ImportError, match=T.REQUIRE_EXT_ENV):
        T.Tokenizer.gpt2()
    with pytest.raises(ValueError, match="impl"):
        T.Tokenizer.gpt2(impl="rust")
    assert T.Tokenizer.gpt2(impl="reference").impl == "reference"


def test_ids_are_plain_ints_that_outlive_the_tokenizer(enc):
    import gc

    tok = Tokenizer.train(["abc abc abd"], 260, progress=False, impl="fast")
    ids = tok.encode("abc abd")
    expected = [int(str(i)) for i in ids]
    del tok
    gc.collect()
    assert all(type(i) is int for i in ids)
    assert ids == expected and pickle.loads(pickle.dumps(ids)) == expected
    assert {i: 1 for i in ids} == {i: 1 for i in expected}
    big = Tokenizer.gpt2(impl="fast").encode_ordinary("hello world " * 5000)
    assert big == enc.encode_ordinary("hello world " * 5000)
    assert sum(big) == sum(enc.encode_ordinary("hello world " * 5000))
