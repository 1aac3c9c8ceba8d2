"""The fused feed-forward kernel against fp64, the reference backend, LoRA, and the book's memory.

Outputs and gradients follow the tolerance rule of ``tests/tolerance.py``, with the magnitude of the
terms each result sums as its scale (:func:`_summed_terms`).
"""

import contextlib

import pytest
import torch

from gptfast import GPTModel, ops, reference
from tolerance import SummedTerms, assert_close, matmul_terms, row_sum_terms

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("x", "fc_weight", "fc_bias", "proj_weight", "proj_bias")


def _inputs(rows, width, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = 4 * width
    x = torch.randn(rows, width, generator=g, dtype=torch.float64)
    w1 = torch.randn(hidden, width, generator=g, dtype=torch.float64) / width ** 0.5
    b1 = torch.randn(hidden, generator=g, dtype=torch.float64) if bias else None
    w2 = torch.randn(width, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5
    b2 = torch.randn(width, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(rows, width, generator=g, dtype=torch.float64)
    return [x, w1, b1, w2, b2], dy


def _summed_terms(x, w1, b1, w2, b2, dy):
    """fp64 magnitudes of the terms that y and the five gradients sum, from the reference math.

    z = x W1^T + b1 sums |x| |W1|^T + |b1|; a = gelu(z) carries z's rounding through gelu'(z);
    y = a W2^T + b2 sums a's terms times |W2|^T, plus |b2|. Backward: da = dy W2 sums |dy| |W2|;
    dz = da gelu'(z) carries da's terms and z's rounding through gelu''(z); dW2 = dy^T a, db2 = sum_rows
    dy, dx = dz W1, dW1 = dz^T x and db1 = sum_rows dz sum the terms of what they multiply.
    """
    x, w1, w2, dy = (t.detach().double() for t in (x, w1, w2, dy))
    x, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (N, E): rows are independent
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    b1 = zero if b1 is None else b1.detach().double()
    b2 = zero if b2 is None else b2.detach().double()
    z = (x @ w1.T + b1).requires_grad_()  # (N, H)
    (d1,) = torch.autograd.grad(reference.gelu(z).sum(), z, create_graph=True)  # gelu'(z)
    (d2,) = torch.autograd.grad(d1.sum(), z)  # gelu''(z)
    z, d1 = z.detach(), d1.detach()
    z_terms = matmul_terms(x, w1.T) + b1.abs()
    a_terms = reference.gelu(z).abs() + d1.abs() * z_terms
    da, da_terms = dy @ w2, matmul_terms(dy, w2)  # (N, H)
    dz_terms = da_terms * d1.abs() + da.abs() * d2.abs() * z_terms
    return {"y": a_terms @ w2.abs().T + b2.abs(), "x": matmul_terms(dz_terms, w1),
            "fc_weight": matmul_terms(dz_terms.T, x), "fc_bias": row_sum_terms(dz_terms),
            "proj_weight": matmul_terms(dy.T, a_terms), "proj_bias": row_sum_terms(dy)}


def _run(fn, tensors, dy, dtype):
    leaves = [None if t is None else t.detach().clone().to(dtype).requires_grad_() for t in tensors]
    y = fn(*leaves)
    y.backward(dy.to(dtype))
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _check(rows, width, dtype, bias=True, device="cpu"):
    tensors, dy = _inputs(rows, width, dtype, bias)
    tensors = [None if t is None else t.to(device) for t in tensors]
    dy = dy.to(device)
    y64, g64 = _run(reference.feed_forward, tensors, dy, torch.float64)
    y_lp, g_lp = _run(reference.feed_forward, tensors, dy, dtype)  # PyTorch's own error in this dtype
    y, grads = _run(lambda *a: ops.feed_forward(*a, backend="triton"), tensors, dy, dtype)
    terms = _summed_terms(*[None if t is None else t.to(dtype) for t in tensors], dy.to(dtype))
    assert y.dtype == dtype
    assert_close("y", y, y64, y_lp, dtype, scale=terms["y"])
    for name, g, ref, base in zip(NAMES, grads, g64, g_lp):
        if ref is None:
            assert g is None
            continue
        assert_close(f"d{name}", g, ref, base, dtype, scale=terms[name])


@pytest.mark.parametrize("rows,width", [(1, 32), (7, 80), (37, 48)])
def test_fp32_output_and_all_five_gradients(rows, width):
    _check(rows, width, torch.float32)


@pytest.mark.parametrize("rows,width", [(7, 32), (37, 80)])
def test_fp16_output_and_all_five_gradients(rows, width):
    _check(rows, width, torch.float16)


def test_shapes_that_divide_the_tiles_take_the_unmasked_split_k_path():
    # 64 rows x width 32 divide the interpreter's 32 x 32 x 32 tiles: no masks anywhere, and the weight
    # gradients (4 output tiles each, K = 64 rows) are split in two along K
    from gptfast.kernels import feed_forward as K

    assert K.split_k(None, tiles=4, k=64, block_k=32) == 2
    _check(64, 32, torch.float32)
    _check(64, 32, torch.float16)


@pytest.mark.parametrize("arch, tiles, k, block_k, split", [
    (90, 144, 8192, 64, 2),   # dW1 / dW2 at GPT-2 124M: 144 tiles of 128 x 128 -> 288 programs, 2.2 waves on 132 SMs
    (80, 144, 8192, 32, 2),   # 288 programs on an A100's 108 SMs
    (90, 384, 3072, 64, 1),   # dx: 384 tiles already fill the GPU
    (86, 288, 8192, 32, 1),   # the consumer config's 128 x 64 tiles: 288 tiles
    (90, 1, 64, 64, 1),       # one BLOCK_K step: nothing to split
])
def test_split_k_fills_two_waves_of_the_gpu(arch, tiles, k, block_k, split):
    from gptfast.kernels import feed_forward as K

    assert K.split_k(arch, tiles, k, block_k) == split


def test_gradients_are_the_same_bits_on_every_run():
    tensors, dy = _inputs(37, 80, torch.float32)
    runs = [_run(lambda *a: ops.feed_forward(*a, backend="triton"), tensors, dy, torch.float32) for _ in range(2)]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


def test_without_biases():
    _check(9, 32, torch.float32, bias=False)


def test_strided_three_dimensional_input():
    tensors, _ = _inputs(1, 32, torch.float64)
    x = torch.randn(5, 3, 32, dtype=torch.float64).transpose(0, 1)  # (3, 5, 32), not contiguous
    args = [t.float() for t in tensors[1:]]
    y = ops.feed_forward(x.float(), *args, backend="triton")
    ref = reference.feed_forward(x, *tensors[1:])
    assert y.shape == (3, 5, 32)
    terms = _summed_terms(x, *tensors[1:], torch.zeros_like(x))["y"]
    assert_close("y", y, ref, reference.feed_forward(x.float(), *args), torch.float32, scale=terms)


def test_gradient_arriving_expanded():
    tensors, _ = _inputs(6, 32, torch.float32)
    x = tensors[0].float().requires_grad_()
    ops.feed_forward(x, *[t.float() for t in tensors[1:]], backend="triton").sum().backward()  # dy has stride 0
    x64 = tensors[0].clone().requires_grad_()
    reference.feed_forward(x64, *tensors[1:]).sum().backward()
    terms = _summed_terms(x64, *tensors[1:], torch.ones(6, 32, dtype=torch.float64))["x"]
    assert_close("dx", x.grad, x64.grad, x64.grad.float(), torch.float32, scale=terms)


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves during ``fn()``, parameters excluded."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_saves_at_most_half_of_the_books_feed_forward():
    from gptfast.model import FeedForward

    ff = FeedForward(dict(vocab_size=10, context_length=8, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0))
    x = torch.randn(4, 8, 32, requires_grad=True)
    book = _saved_bytes(lambda: ff.layers(x))  # the book's Sequential: Linear, composite GELU, Linear
    ff.backend = "triton"
    ours = _saved_bytes(lambda: ff(x))
    assert 0 < ours <= 0.5 * book, (ours, book)


def test_model_backends_agree_on_logits_and_gradients():
    # the kernel's model against an fp64 copy, within twice the error of the reference backend in fp32;
    # scales: each parameter gradient's summed terms from the fp64 pass (tests/tolerance.py's SummedTerms),
    # logits |x| |W_out|^T
    cfg = dict(vocab_size=64, context_length=12, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    torch.manual_seed(0)
    ref = GPTModel(cfg, backend="reference")
    fast = GPTModel(cfg, backend={"feed_forward": "triton", "layer_norm": "reference", "attention": "reference"})
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 64, (2, 12))
    model64 = GPTModel(cfg, backend="reference").double()
    model64.load_state_dict(ref.state_dict())
    terms = SummedTerms(model64)
    outs = []
    for model in (ref, fast, model64):
        with terms if model is model64 else contextlib.nullcontext():
            logits = model(idx)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
        outs.append(logits.detach())
    terms.check_complete(model64)
    assert_close("logits", outs[1], outs[2], outs[0], torch.float32, scale=terms.outputs["out_head.weight"])
    for (name, p), q, r in zip(ref.named_parameters(), fast.parameters(), model64.parameters()):
        assert_close(f"grad {name}", q.grad, r.grad, p.grad, torch.float32, scale=terms.grads[name])


def test_lora_gradients_reach_the_adapters():
    from gptfast.lora import LinearWithLoRA

    cfg = dict(vocab_size=64, context_length=8, emb_dim=32, n_heads=4, n_layers=1, drop_rate=0.0)
    torch.manual_seed(1)
    grads = []
    for backend in ("reference", "triton"):
        torch.manual_seed(1)
        model = GPTModel(cfg, backend={"feed_forward": backend, "layer_norm": "reference", "attention": "reference"})
        ff = model.trf_blocks[0].ff
        ff.layers[0] = LinearWithLoRA(ff.layers[0], rank=4, alpha=8)
        torch.nn.init.normal_(ff.layers[0].lora.B)  # a fresh LoRA is zero; make it count
        model(torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))).sum().backward()
        grads.append((ff.layers[0].lora.A.grad.clone(), ff.layers[0].lora.B.grad.clone()))
    for ref, fast in zip(grads[0], grads[1]):
        assert ref.abs().sum() > 0
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_every_config_has_a_resource_spec():
    from gptfast.kernels import feed_forward as K

    for arch in K.SUPPORTED_ARCHS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            labels = [s["label"] for s in K.resource_specs(arch, dtype)]
            for cfg in K.configs(arch, dtype):
                assert any(f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}" in label for label in labels)


@pytest.mark.gpu
@pytest.mark.parametrize("width", [768, 1024, 1280, 1600])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpt2_widths_on_gpu(width, dtype):
    _check(1023, width, dtype, device="cuda")


@pytest.mark.gpu
def test_torch_compile_keeps_the_op():
    tensors, _ = _inputs(64, 64, torch.float32)
    args = [t.float().cuda() for t in tensors]
    fn = torch.compile(lambda *a: ops.feed_forward(*a, backend="triton"), fullgraph=True)
    torch.testing.assert_close(fn(*args), reference.feed_forward(*args), atol=1e-4, rtol=1e-4)
