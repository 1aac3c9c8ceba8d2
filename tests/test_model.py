"""The reference model against the book: its published outputs, parameter counts, state_dict names."""

import math

import pytest
import torch

import gptfast
from gptfast import GPT_CONFIG_124M, GPTConfig, GPTModel, MultiHeadAttention

TINY = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=False)


def test_golden_tokens_from_the_book():
    # Chapter 4: torch.manual_seed(123), GPTModel(GPT_CONFIG_124M) in eval mode, greedy after "Hello, I am".
    torch.manual_seed(123)
    model = GPTModel(GPT_CONFIG_124M).eval()
    idx = torch.tensor([[15496, 11, 314, 716]])  # "Hello, I am" in GPT-2's BPE (the book's encoded_tensor)
    out = gptfast.generate_text_simple(model, idx, max_new_tokens=10, context_size=GPT_CONFIG_124M["context_length"])
    assert out.tolist() == [[15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267, 49706, 43231, 47062, 34657]]


def test_prompt_encoding_matches_tiktoken():
    tiktoken = pytest.importorskip("tiktoken")
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # no cache and no network
        pytest.skip(reason=f"tiktoken's gpt2 ranks are not available offline: {e}")
    assert gptfast.text_to_token_ids("Hello, I am", enc).tolist() == [[15496, 11, 314, 716]]
    assert gptfast.token_ids_to_text(torch.tensor([[15496, 11, 314, 716]]), enc) == "Hello, I am"


def test_chapter3_multihead_attention_example():
    # The book's "Your journey starts with one step" embeddings and its printed context vectors.
    inputs = torch.tensor([[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
                           [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]])
    batch = torch.stack((inputs, inputs), dim=0)
    torch.manual_seed(123)
    mha = MultiHeadAttention(3, 2, batch.shape[1], 0.0, num_heads=2)
    context_vecs = mha(batch)
    row = [[0.3190, 0.4858], [0.2943, 0.3897], [0.2856, 0.3593], [0.2693, 0.3873], [0.2639, 0.3928], [0.2575, 0.4028]]
    expected = torch.tensor([row, row])
    assert context_vecs.shape == (2, 6, 2)
    torch.testing.assert_close(context_vecs, expected, atol=6e-5, rtol=0)


def _expected_params(cfg: GPTConfig) -> int:
    """Parameter count from the architecture, written out independently of the modules."""
    e, v, c, n = cfg.emb_dim, cfg.vocab_size, cfg.context_length, cfg.n_layers
    attn = 3 * e * e + (3 * e if cfg.qkv_bias else 0) + e * e + e  # W_query/W_key/W_value (+bias), out_proj
    ff = e * 4 * e + 4 * e + 4 * e * e + e
    norms = 2 * 2 * e
    pos = c * e if cfg.pos_emb == "learned" else 0
    head = 0 if cfg.tie_weights else v * e
    return v * e + pos + n * (attn + ff + norms) + 2 * e + head


def test_parameter_counts():
    with torch.device("meta"):
        model = GPTModel(GPT_CONFIG_124M)
    assert model.num_parameters() == 163_009_536  # the book's count, untied
    assert model.num_parameters() - model.out_head.weight.numel() == 124_412_160  # the book's "with weight tying"
    # GPT-2's published sizes (qkv biases, tied head): 124M / 355M / 774M / 1558M
    published = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name, count in published.items():
        cfg = GPTConfig.from_name(name, qkv_bias=True, tie_weights=True)
        with torch.device("meta"):
            model = GPTModel(cfg)
        assert model.num_parameters() == count == _expected_params(cfg), name


@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal"])
@pytest.mark.parametrize("tie", [False, True])
def test_options_shapes_and_counts(pos_emb, tie):
    cfg = GPTConfig(**TINY, pos_emb=pos_emb, tie_weights=tie)
    model = GPTModel(cfg)
    assert model.num_parameters() == _expected_params(cfg)
    assert (model.out_head.weight is model.tok_emb.weight) == tie
    logits = model(torch.randint(0, 97, (3, 16)))
    assert logits.shape == (3, 16, 97)


def test_sinusoidal_table_matches_formula():
    cfg = GPTConfig(**dict(TINY, emb_dim=6, n_heads=2), pos_emb="sinusoidal")
    table = GPTModel(cfg).pos_emb.table
    for pos in (0, 1, 7, 15):
        for i in range(6):
            angle = pos / 10000 ** ((i - i % 2) / 6)
            expected = math.sin(angle) if i % 2 == 0 else math.cos(angle)
            assert abs(table[pos, i].item() - expected) < 1e-6


def test_state_dict_uses_the_books_names():
    model = GPTModel(dict(TINY, qkv_bias=True))
    keys = set(model.state_dict())
    for k in ["tok_emb.weight", "pos_emb.weight", "final_norm.scale", "final_norm.shift", "out_head.weight",
              "trf_blocks.1.att.W_query.weight", "trf_blocks.1.att.W_query.bias", "trf_blocks.1.att.W_key.weight",
              "trf_blocks.1.att.W_value.weight", "trf_blocks.1.att.out_proj.weight", "trf_blocks.1.att.out_proj.bias",
              "trf_blocks.1.att.mask", "trf_blocks.1.ff.layers.0.weight", "trf_blocks.1.ff.layers.0.bias",
              "trf_blocks.1.ff.layers.2.weight", "trf_blocks.1.ff.layers.2.bias", "trf_blocks.1.norm1.scale",
              "trf_blocks.1.norm1.shift", "trf_blocks.1.norm2.scale", "trf_blocks.1.norm2.shift"]:
        assert k in keys, k
    assert not any("out_head.bias" in k for k in keys)


def test_state_dict_round_trip_with_and_without_mask(tmp_path):
    torch.manual_seed(0)
    a = GPTModel(TINY).eval()
    path = tmp_path / "model.pth"
    torch.save(a.state_dict(), path)
    b = GPTModel(TINY).eval()
    b.load_state_dict(torch.load(path, weights_only=True))  # strict, as the book loads
    x = torch.randint(0, 97, (2, 9))
    assert torch.equal(a(x), b(x))
    no_mask = {k: v for k, v in a.state_dict().items() if not k.endswith(".att.mask")}
    c = GPTModel(TINY).eval()
    c.load_state_dict(no_mask)  # strict too: the derived mask may be left out
    assert torch.equal(a(x), c(x))


def test_reference_layer_norm_and_gelu_match_torch():
    x = torch.randn(5, 33, dtype=torch.float64)
    w, b = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    torch.testing.assert_close(gptfast.reference.layer_norm(x, w, b), torch.nn.functional.layer_norm(x, (33,), w, b))
    torch.testing.assert_close(gptfast.reference.gelu(x), torch.nn.functional.gelu(x, approximate="tanh"))


def test_attention_weights_are_causal_and_plot(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(TINY)
    idx = torch.randint(0, 97, (1, 7))
    weights = gptfast.attention_weights(model, idx)
    assert len(weights) == 2 and weights[0].shape == (1, 4, 7, 7)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(1, 4, 7))
    assert torch.all(weights[0][..., torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)] == 0)
    logits, _ = model.eval()(idx, return_attn_weights=True)
    torch.testing.assert_close(logits, model(idx))
    fig = gptfast.plot_attention(weights[0], tokens=list("abcdefg"), path=tmp_path / "att.png")
    assert (tmp_path / "att.png").stat().st_size > 1000 and len(fig.axes) >= 4


def test_sequence_longer_than_context_is_a_clear_error():
    model = GPTModel(TINY)
    with pytest.raises(ValueError, match="context_length is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_wrong_dtype_shape_and_device_are_named():
    model = GPTModel(TINY)
    with pytest.raises(TypeError, match="torch.float32"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(batch, tokens\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="meta"):
        model(torch.zeros(1, 4, dtype=torch.long, device="meta"))


def test_config_errors():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(**dict(TINY, emb_dim=30))
    with pytest.warns(UserWarning, match=r"\['n_head'\] are not used") as record:
        model = GPTModel(dict(TINY, n_head=4))  # ignored, as the book's GPTModel ignores it
    assert len(record) == 1 and model.cfg == GPTConfig(**TINY)
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPTConfig.from_name("gpt3")
    assert GPTConfig.from_name("gpt2-xl").emb_dim == 1600
