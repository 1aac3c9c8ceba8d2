"""generate(): the book's semantics (greedy, top-k before temperature), top-p, and per-row eos."""

import pytest
import torch

from gptfast import GPTModel
from gptfast.generation import apply_top_k, apply_top_p, generate, generate_text_simple

TINY = dict(vocab_size=61, context_length=12, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


class ScriptedModel(torch.nn.Module):
    """Emits, for row b, the token script[b][t] at output position t (as a sharp logit peak)."""

    def __init__(self, script, vocab=10):
        super().__init__()
        self.script, self.vocab = script, vocab

    def forward(self, idx):
        b, t = idx.shape
        logits = torch.zeros(b, t, self.vocab)
        for row in range(b):
            logits[row, -1, self.script[row][t - 1]] = 10.0  # only the last position is read
        return logits


def test_greedy_generate_equals_the_books_loop():
    torch.manual_seed(1)
    model = GPTModel(TINY).eval()
    idx = torch.randint(0, 61, (3, 4))
    a = generate(model, idx, max_new_tokens=14, context_size=12)  # runs past the context length
    b = generate_text_simple(model, idx, max_new_tokens=14, context_size=12)
    assert a.shape == (3, 18) and torch.equal(a, b)


def test_top_k_one_is_greedy_even_when_sampling():
    torch.manual_seed(2)
    model = GPTModel(TINY).eval()
    idx = torch.randint(0, 61, (2, 3))
    greedy = generate(model, idx, 6)
    assert torch.equal(generate(model, idx, 6, temperature=1.5, top_k=1), greedy)


def test_sampling_is_reproducible_under_a_seed():
    model = GPTModel(TINY).eval()
    idx = torch.randint(0, 61, (2, 3))
    torch.manual_seed(7)
    a = generate(model, idx, 8, temperature=1.0, top_k=20, top_p=0.9)
    torch.manual_seed(7)
    b = generate(model, idx, 8, temperature=1.0, top_k=20, top_p=0.9)
    assert torch.equal(a, b)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, 3.0]])
    assert apply_top_k(logits, 2).isinf().tolist() == [[True, False, True, True, False]]
    probs = torch.tensor([[0.1, 0.5, 0.25, 0.15]])
    # sorted: 0.5, 0.25, 0.15, 0.1; cumulative mass before each: 0, 0.5, 0.75, 0.9 -> top_p=0.7 keeps 0.5 and 0.25
    kept = apply_top_p(probs, 0.7)
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.5 / 0.75, 0.25 / 0.75, 0.0]]))
    # the most likely token survives even a tiny top_p
    torch.testing.assert_close(apply_top_p(probs, 1e-6), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


def test_eos_at_batch_one_stops_without_appending_like_the_book():
    model = ScriptedModel([[4, 5, 9, 6, 6, 6, 6, 6]])
    out = generate(model, torch.tensor([[1, 2]]), max_new_tokens=6, context_size=8, eos_id=9)
    # outputs at positions 1, 2 are 5, 9 -> 5 is appended, then eos stops generation
    assert out.tolist() == [[1, 2, 5]]


def test_eos_per_row_pads_finished_rows():
    script = [[0, 3, 9, 3, 3, 3, 3, 3], [0, 4, 4, 4, 9, 4, 4, 4]]
    model = ScriptedModel(script)
    out = generate(model, torch.tensor([[1, 1], [2, 2]]), max_new_tokens=6, context_size=8, eos_id=9)
    # row 0 finishes at its 2nd new token, row 1 at its 4th: stop there, row 0 padded with eos
    assert out.tolist() == [[1, 1, 3, 9, 9], [2, 2, 4, 4, 4]]


def test_bad_sampling_arguments():
    model = GPTModel(TINY)
    idx = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, idx, 1, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, idx, 1, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, idx, 1, top_k=0)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, torch.zeros(1, 2), 1)
