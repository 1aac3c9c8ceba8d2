"""The C++ core's piece cache: exact whatever its size, and bounded in memory.

Each thread that encodes keeps a cache from piece bytes to token ids in three levels (csrc/bpe.cpp):
a first of pieces of up to 15 bytes and 7 tokens (3 where ids pass 2**16), a second of pieces up to
30 bytes and 16 tokens (8), and a third of pieces up to 128 bytes that the second does not hold.
Keys are compared whole, so a hit is always the piece's own encoding. These tests shrink the first
two through the test hook so that every piece collides and evicts another, fill the third past its
arena so that it is emptied again and again, and check the ids against tiktoken; and check that the
memory stays at its fixed bound on a text of millions of distinct words.
"""

import contextlib
import os
import random

import pytest

tiktoken = pytest.importorskip("tiktoken")

from gptfast.tokenizer import Tokenizer  # noqa: E402

_bpe = pytest.importorskip("gptfast._bpe")

DEFAULT_SETS = 1 << 17


@contextlib.contextmanager
def cache_sets(sets):
    old = _bpe._piece_cache_sets()
    _bpe._set_piece_cache_sets(sets)
    try:
        yield
    finally:
        _bpe._set_piece_cache_sets(old)


def _words(rng, n, alphabets=("abcdefghijklmnopqrstuvwxyz", "абвгдежзиклмнопрстуфхцчшщыэюя", "αβγδεζηθικλμνξοπρστυφχψω",
                              "日本語中文字漢字仮名", "0123456789", "!?.,;:-_=+*/", "éèêëàâäôöûüçñ")):
    out = []
    for _ in range(n):
        a = rng.choice(alphabets)
        out.append("".join(rng.choice(a) for _ in range(rng.randint(1, 18))))
    return out


def _texts(seed=0):
    rng = random.Random(seed)
    words = _words(rng, 4000)
    seps = [" ", "  ", "\n", "\t", ", ", "'s ", "'ll ", " \n ", ""]
    return ["".join(w + rng.choice(seps) for w in rng.sample(words, 600)) for _ in range(8)]


def test_the_default_size_and_its_bound():
    assert _bpe._piece_cache_sets() == DEFAULT_SETS
    # the first level: 2 buckets a set, each 2 entries of 32 bytes; the second: half a set of 2 entries
    # of 64; the third: 4096 slots of 16 bytes and an arena of 1 MiB
    third = 4096 * 16 + 2**20
    assert _bpe.piece_cache_bytes() == DEFAULT_SETS * (2 * 2 * 32) + DEFAULT_SETS // 2 * (2 * 64) + third
    assert _bpe.piece_cache_bytes() == 24 * 2**20 + third


@pytest.mark.parametrize("sets", [1, 2, 3, 64, DEFAULT_SETS])
def test_any_cache_size_gives_tiktokens_ids(enc, sets):
    with cache_sets(sets):
        assert _bpe._piece_cache_sets() >= sets
        tok = Tokenizer.gpt2(impl="fast")
        for text in _texts(sets):
            want = enc.encode_ordinary(text)
            # twice: the second pass hits whatever the first left, or what evicted it
            assert tok.encode_ordinary(text) == want
            assert tok.encode_ordinary(text) == want
            assert tok.encode_to_numpy(text).tolist() == want
        assert tok.encode_ordinary_batch(_texts(sets + 100), num_threads=2) == \
            enc.encode_ordinary_batch(_texts(sets + 100), num_threads=2)


def test_long_pieces_through_the_third_level_give_tiktokens_ids(enc):
    # Pieces of 16-128 bytes that the second level cannot hold: words longer than 30 bytes, and
    # shorter ones of more than 16 tokens. Enough distinct ones (about 5 MB of pieces and ids) that
    # the third level's 1 MiB arena fills and is emptied several times, and its 4096 slots collide;
    # each text is encoded twice (the second pass hits what the first left) and checked whole.
    rng = random.Random(5)
    alphabets = ["абвгдежзиклмнопрстуфхцчшщыэюя", "αβγδεζηθικλμνξοπρστυφχψω", "日本語中文字漢字仮名平片",
                 "😀🎉🚀🌍👍🔥", "abcdefghijklmnopqrstuvwxyz"]

    def word():
        a = rng.choice(alphabets)
        return "".join(rng.choice(a) for _ in range(rng.randint(8, 60 if a[0] == "a" else 30)))

    tok = Tokenizer.gpt2(impl="fast")
    seen_long = 0
    for _ in range(12):
        words = [word() for _ in range(3000)]
        seen_long += sum(16 <= len(w.encode()) <= 128 for w in words)
        text = " ".join(words + rng.sample(words, 1000))  # repeats within a text, too
        want = enc.encode_ordinary(text)
        assert tok.encode_ordinary(text) == want
        assert tok.encode_ordinary(text) == want
        assert tok.encode_to_numpy(text).tolist() == want
        assert tok.encode(text) == want
    assert seen_long > 20_000


def test_two_tokenizers_on_one_thread_do_not_share_entries(enc):
    # Tokenizers with different ids for the same bytes: each use of the other empties the thread's cache.
    ranks = enc._mergeable_ranks
    shifted = {b: (r if r < 256 else r + 1) for b, r in ranks.items()}
    other = tiktoken.Encoding("shifted", pat_str=enc._pat_str, mergeable_ranks=shifted, special_tokens={})
    a, b = Tokenizer.gpt2(impl="fast"), Tokenizer(shifted, {}, impl="fast")
    for text in _texts(7)[:3]:
        assert a.encode_ordinary(text) == enc.encode_ordinary(text)
        assert b.encode_ordinary(text) == other.encode_ordinary(text)
        assert a.encode_ordinary(text) == enc.encode_ordinary(text)


@pytest.mark.parametrize("offset", [70_000, 1_100_000], ids=["past-2^16", "past-2^20"])
@pytest.mark.parametrize("sets", [1, 64])
def test_ids_past_16_bits_are_cached_whole(sets, offset):
    # A vocabulary whose ids pass 2**16: the cache keeps 32-bit ids (fewer a entry). Past 2**20 long
    # pieces are merged rather than walked (the walk's tables hold 20-bit ids).
    enc = tiktoken.get_encoding("gpt2")
    wide = {b: (r if r < 256 else r + offset) for b, r in enc._mergeable_ranks.items()}
    oracle = tiktoken.Encoding("wide", pat_str=enc._pat_str, mergeable_ranks=wide, special_tokens={})
    with cache_sets(sets):
        tok = Tokenizer(wide, {}, impl="fast")
        for text in _texts(3)[:4]:
            want = oracle.encode_ordinary(text)
            assert max(want) >= 256 + offset
            assert tok.encode_ordinary(text) == want
            assert tok.encode_ordinary(text) == want


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read the resident size")
def test_memory_stays_bounded_on_millions_of_distinct_words(enc, fast):
    # 2,000,000 distinct random words (about 17 MB of text): a cache that kept every piece would grow
    # by hundreds of MB; this one stays at its fixed size.
    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    chunks = [" ".join("".join(rng.choices(letters, k=rng.randint(5, 12))) for _ in range(100_000))
              for _ in range(20)]
    fast.encode_ordinary("warm up the caches of this thread")
    before = _rss()
    for i, text in enumerate(chunks):
        ids = fast.encode_ordinary(text)
        if i % 7 == 0:
            assert ids == enc.encode_ordinary(text)
        del ids
    grown = _rss() - before
    assert grown < _bpe.piece_cache_bytes() + 48 * 2**20, f"grew by {grown / 2**20:.0f} MiB"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_batches_work_in_a_forked_child_after_the_parent_started_its_workers():
    # the batch workers live for the process; a DataLoader worker forked after the parent's first batch
    # has none of them, and must start its own rather than wait on threads that do not exist there
    import gptfast

    tok = gptfast.Tokenizer.gpt2()
    texts = ["hello world", "Every effort moves you", "  spaces\tand\ttabs"] * 40
    expected = tok.encode_ordinary_batch(texts, num_threads=2)
    pid = os.fork()
    if pid == 0:  # the child: same ids, or exit code 3
        try:
            ok = tok.encode_ordinary_batch(texts, num_threads=2) == expected
        except BaseException:
            ok = False
        os._exit(0 if ok else 3)
    import signal
    import time

    deadline = time.monotonic() + 60
    while True:  # a child waiting on its parent's workers would wait forever: stop it and fail
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's batch did not finish in 60 s")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
