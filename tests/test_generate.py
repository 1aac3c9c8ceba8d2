"""Generation with a KV cache: the same tokens as the book's recompute-everything loop at any length,
prompts of different lengths, per-row eos, the decode path through causal_attention's cache_seqlens,
and ``gptfast generate``."""

import pytest
import tiktoken
import torch

import gptfast
from gptfast import checkpoint, ops
from gptfast.cli import main
from gptfast.commands.generate import TextStream
from gptfast.generation import generate, generate_stream, generate_text_simple
from gptfast.kv_cache import KVCache

TINY = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return gptfast.GPTModel(dict(TINY, **kw)).eval()


def test_cache_prefill_and_decode_reproduce_the_full_forward():
    model = _model()
    x = torch.randint(0, 97, (3, 11))
    full = model(x)
    cache = KVCache.for_model(model, batch_size=3)
    parts = [model(x[:, :5], cache=cache), model(x[:, 5:6], cache=cache), model(x[:, 6:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.lengths == [11] * 3 and cache.seqlens.tolist() == [11] * 3
    with pytest.raises(ValueError, match="holds up to 16 tokens"):
        model(torch.zeros(3, 6, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_greedy_equals_the_books_loop_past_the_context_length(seed):
    model = _model(seed)
    idx = torch.randint(0, 97, (2, 5))
    n = 3 * TINY["context_length"]  # slides the window many times
    book = generate_text_simple(model, idx, max_new_tokens=n, context_size=16)
    assert torch.equal(generate(model, idx, n, use_cache=True), book)
    assert torch.equal(generate(model, idx, n, use_cache=False), book)
    assert torch.equal(generate(model, idx, n, context_size=8, use_cache=True),
                       generate_text_simple(model, idx, max_new_tokens=n, context_size=8))


def test_cached_sampling_draws_the_same_tokens_under_a_seed():
    model = _model(3)
    idx = torch.randint(0, 97, (4, 3))
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(42)
        runs.append(generate(model, idx, 20, temperature=1.3, top_k=20, top_p=0.9, use_cache=use_cache))
    assert torch.equal(*runs)


def test_prompts_of_different_lengths_equal_generating_each_alone():
    model = _model(4)
    prompts = [torch.randint(0, 97, (n,)) for n in (1, 6, 13)]
    out = generate(model, prompts, 12)
    assert isinstance(out, list) and [len(o) for o in out] == [13, 18, 25]
    for p, o in zip(prompts, out):
        assert torch.equal(o, generate(model, p[None], 12, use_cache=False)[0])
    uncached = generate(model, [p.tolist() for p in prompts], 12, use_cache=False)  # lists of ints work too
    assert all(torch.equal(a, b) for a, b in zip(out, uncached))


def test_eos_finishes_rows_separately_with_the_cache():
    model = _model(5)
    prompts = [torch.randint(0, 97, (n,)) for n in (3, 8)]
    alone = [generate(model, p[None], 10)[0] for p in prompts]
    eos_id = int(alone[0][3 + 2])  # the first row's third new token
    first = generate(model, prompts[0][None], 10, eos_id=eos_id)[0]
    assert torch.equal(first, alone[0][:5])  # stops before the eos, like the book
    both = generate(model, prompts, 10, eos_id=eos_id)
    assert torch.equal(both[0][:5], alone[0][:5]) and (both[0][5:] == eos_id).all()
    stop = (alone[1][8:] == eos_id).nonzero()
    n1 = int(stop[0]) if len(stop) else 10
    assert torch.equal(both[1][:8 + n1], alone[1][:8 + n1])
    assert len(both[0]) - 3 == len(both[1]) - 8  # every row gets the same number of new positions


def test_decode_goes_through_causal_attention_with_cache_seqlens(monkeypatch):
    model = _model(6)
    seen = []
    real = ops.causal_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[2], k.shape[2], None if kw.get("cache_seqlens") is None else kw["cache_seqlens"].tolist()))
        return real(q, k, v, **kw)

    monkeypatch.setattr(ops, "causal_attention", spy)
    generate(model, [torch.tensor([1, 2, 3]), torch.tensor([4, 5])], 3)
    per_layer = seen[::TINY["n_layers"]]
    assert per_layer[0] == (3, 3, [0, 0])  # prefill of the right-padded prompts
    assert per_layer[1] == (1, 4, [3, 2])  # decode: one query per row at its own position
    assert per_layer[2] == (1, 5, [4, 3])


def test_stream_yields_what_generate_returns():
    model = _model(7)
    idx = torch.randint(0, 97, (2, 4))
    steps = list(generate_stream(model, idx, 6))
    assert len(steps) == 6 and all(s.shape == (2, 1) for s in steps)
    assert torch.equal(torch.cat([idx, *steps], dim=1), generate(model, idx, 6))


def test_bad_arguments_are_named():
    model = _model()

    class NoCache(torch.nn.Module):
        cfg = model.cfg

        def forward(self, idx):
            return model(idx)

    assert torch.equal(generate(NoCache(), torch.tensor([[1, 2]]), 3), generate(model, torch.tensor([[1, 2]]), 3))
    with pytest.raises(ValueError, match="use_cache=True needs a model"):
        generate(NoCache(), torch.tensor([[1, 2]]), 3, use_cache=True)
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty 1-D"):
        generate(model, [torch.tensor([1]), torch.tensor([], dtype=torch.long)], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, torch.tensor([[1]]), 3, temperature=1.0, top_p=0.0)


def test_text_stream_holds_back_partial_characters():
    tok = tiktoken.get_encoding("gpt2")
    ids = tok.encode("naïve café 🙂 done")
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == "naïve café 🙂 done" and "\ufffd" not in "".join(pieces)


def test_cli_generate_streams_the_prompt_then_the_tokens(tmp_path, capsys):
    tok = tiktoken.get_encoding("gpt2")
    model = _model(8, vocab_size=50257, context_length=32)
    checkpoint.save_model(model, str(tmp_path / "run" / "step-3"))
    prompt = "Every effort moves you"
    expected = generate(model, torch.tensor([tok.encode(prompt)]), 8, eos_id=tok.eot_token)
    for folder in ("run", "run/step-3"):  # a run folder means its latest step
        assert main(["generate", "--checkpoint", str(tmp_path / folder), "--prompt", prompt,
                     "--max-new-tokens", "8"]) == 0
        assert capsys.readouterr().out == tok.decode(expected[0].tolist()) + "\n"
    assert main(["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
