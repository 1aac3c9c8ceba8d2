"""The backend switch: choice order, per-op choices, auto's rules, errors, autocast, describe()."""

import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import gptfast
from gptfast import GPTModel, ops

TINY = dict(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    return monkeypatch


def test_choice_order(clean_env):
    assert ops.resolve("attention") == ("auto", "the default")
    clean_env.setenv(ops.ENV_VAR, "reference")
    assert ops.resolve("attention")[0] == "reference"
    with gptfast.use_backend("triton"):
        assert ops.resolve("attention") == ("triton", "gptfast.use_backend")
        assert ops.resolve("attention", backend="reference") == ("reference", "the call's backend argument")
    assert ops.resolve("attention")[0] == "reference"


def test_per_op_choice_falls_through(clean_env):
    clean_env.setenv(ops.ENV_VAR, "attention=reference,feed_forward=triton")
    with gptfast.use_backend({"layer_norm": "triton"}):
        assert ops.resolve("layer_norm")[0] == "triton"
        assert ops.resolve("attention")[0] == "reference"
        assert ops.resolve("feed_forward", backend={"attention": "triton"})[0] == "triton"  # from the env
    assert ops.resolve("layer_norm")[0] == "auto"


def test_unknown_names_list_the_known_ones(clean_env):
    with pytest.raises(ValueError, match="known backends: auto, reference, triton"):
        ops.resolve("attention", backend="cuda")
    with pytest.raises(ValueError, match="ops with a backend choice: layer_norm, feed_forward, attention"):
        GPTModel(TINY, backend={"attn": "triton"})
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with gptfast.use_backend("fast"):
            pass
    clean_env.setenv(ops.ENV_VAR, "tritno")
    with pytest.raises(ValueError, match=r"\$GPTFAST_BACKEND"):
        ops.resolve("layer_norm")


def test_auto_on_cpu_is_the_reference(clean_env):
    c = ops.choose("attention", torch.device("cpu"))
    assert c.implementation == "reference" and "CPU" in c.why


def _fake_kernels(monkeypatch, archs=(80, 86)):
    fake = types.SimpleNamespace(SUPPORTED_ARCHS=archs, unsupported_reason=lambda *a: None)
    monkeypatch.setitem(ops._kernel_cache, "layer_norm", (fake, None))
    return fake


def test_auto_picks_the_kernel_only_on_proven_archs(clean_env):
    _fake_kernels(clean_env, archs=(86,))
    clean_env.setattr(ops, "cuda_arch", lambda device: 86)
    c = ops.choose("layer_norm", torch.device("cuda", 0))
    assert (c.implementation, c.arch) == ("triton", 86)
    clean_env.setattr(ops, "cuda_arch", lambda device: 75)
    c = ops.choose("layer_norm", torch.device("cuda", 0))
    assert c.implementation == "reference" and "sm_75" in c.why
    with pytest.raises(RuntimeError, match="not proven on this GPU"):
        ops.choose("layer_norm", torch.device("cuda", 0), backend="triton")


def test_auto_falls_back_on_unsupported_shapes_and_explicit_raises(clean_env):
    fake = _fake_kernels(clean_env)
    fake.unsupported_reason = lambda *a: "width 70000 is beyond the kernel's 65536"
    clean_env.setattr(ops, "cuda_arch", lambda device: 86)
    assert ops.choose("layer_norm", torch.device("cuda", 0), shape_check=lambda m: m.unsupported_reason()).implementation == "reference"
    with pytest.raises(ValueError, match="width 70000"):
        ops.choose("layer_norm", torch.device("cuda", 0), "triton", shape_check=lambda m: m.unsupported_reason())


def test_explicit_triton_without_a_kernel_is_not_implemented(clean_env):
    clean_env.setitem(ops._KERNEL_MODULES, "feed_forward", "gptfast.kernels._no_such_kernel")
    ops._kernel_cache.pop("feed_forward", None)
    try:
        x = torch.randn(2, 8)
        w1, b1, w2, b2 = torch.randn(32, 8), torch.randn(32), torch.randn(8, 32), torch.randn(8)
        with pytest.raises(NotImplementedError, match="feed_forward"):
            ops.feed_forward(x, w1, b1, w2, b2, backend="triton")
        # auto quietly takes the reference
        torch.testing.assert_close(ops.feed_forward(x, w1, b1, w2, b2),
                                   gptfast.reference.feed_forward(x, w1, b1, w2, b2))
    finally:
        ops._kernel_cache.pop("feed_forward", None)  # never leave the fake "no kernel" answer to later tests


def test_explicit_triton_on_cpu_without_interpreter_says_why(clean_env):
    _fake_kernels(clean_env)
    clean_env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.choose("layer_norm", torch.device("cpu"), backend="triton")


def test_return_weights_needs_the_reference(clean_env):
    q = torch.randn(1, 2, 5, 4)
    out, w = ops.causal_attention(q, q, q, return_weights=True)
    assert w.shape == (1, 2, 5, 5)
    with pytest.raises(ValueError, match="reference backend"):
        ops.causal_attention(q, q, q, return_weights=True, backend="triton")


def test_model_backend_propagates_and_never_touches_parameters(clean_env):
    model = GPTModel(TINY)
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    model.set_backend({"attention": "reference"})
    assert model.backend == {"attention": "reference"}
    assert model.trf_blocks[0].att.backend == {"attention": "reference"} == model.final_norm.backend
    model.set_backend("reference")
    for k, v in model.state_dict().items():
        assert v.data_ptr() == before[k][0] and torch.equal(v, before[k][1])
    assert GPTModel(TINY, backend="reference").trf_blocks[0].ff.backend == "reference"


def test_input_errors_name_dtype_and_device():
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="torch.float64"):
        ops.layer_norm(x, torch.ones(8, dtype=torch.float64), torch.zeros(8))
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        ops.layer_norm(x, torch.ones(7), torch.zeros(7))
    with pytest.raises(ValueError, match="meta"):
        ops.layer_norm(x, torch.ones(8, device="meta"), torch.zeros(8))
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="cache_seqlens"):
        ops.causal_attention(q, torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4))
    with pytest.raises(ValueError, match="dropout_p"):
        ops.causal_attention(q, q, q, dropout_p=1.5)


def test_cache_seqlens_reference_matches_full_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(3))
    full = ops.causal_attention(q, k, v)
    # the last 3 queries against a cache holding all 10 keys (row 0) or 10 keys + 2 padding slots (row 1)
    kc = torch.cat([k, torch.randn(2, 3, 2, 8, dtype=torch.float64)], dim=2)
    vc = torch.cat([v, torch.randn(2, 3, 2, 8, dtype=torch.float64)], dim=2)
    out = ops.causal_attention(q[:, :, 7:], kc, vc, cache_seqlens=torch.tensor([7, 7]))
    torch.testing.assert_close(out, full[:, :, 7:])


@pytest.mark.parametrize("device_type,dtype", [("cpu", torch.bfloat16)])
def test_autocast_casts_like_torch(device_type, dtype):
    x = torch.randn(2, 5, 16)
    w, b = torch.ones(16), torch.zeros(16)
    w1, b1, w2, b2 = torch.randn(64, 16), torch.randn(64), torch.randn(16, 64), torch.randn(16)
    q = torch.randn(2, 2, 5, 8)
    with torch.autocast(device_type, dtype=dtype):
        assert ops.layer_norm(x, w, b).dtype == F.layer_norm(x, (16,), w, b).dtype
        assert ops.add_layer_norm(x, x, w, b)[1].dtype == F.layer_norm(x, (16,), w, b).dtype
        assert ops.feed_forward(x, w1, b1, w2, b2).dtype == F.linear(x, w1, b1).dtype == dtype
        assert ops.causal_attention(q, q, q).dtype == F.scaled_dot_product_attention(q, q, q, is_causal=True).dtype


def test_describe_names_every_op(clean_env):
    text = gptfast.describe("cpu")
    for op in ops.OPS:
        assert op in text
    assert "reference" in text


def test_import_does_not_import_triton():
    code = "import sys, gptfast; gptfast.GPTModel; gptfast.describe('cpu'); print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dispatch_does_not_break_a_compiled_graph(clean_env):
    import torch._dynamo as dynamo

    model = GPTModel(TINY).eval()
    explained = dynamo.explain(model)(torch.randint(0, 50, (2, 8)))
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    with gptfast.use_backend("reference"):  # the context's choice is readable while tracing too
        assert dynamo.explain(model)(torch.randint(0, 50, (2, 8))).graph_break_count == 0
