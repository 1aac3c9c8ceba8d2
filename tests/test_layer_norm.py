"""The Triton layer norm (``gptfast.kernels.layer_norm``) against an fp64 reference.

Every case checks the output and every gradient with the tolerance rule of ``tests/tolerance.py``:
the kernel's max-abs error against the reference op run in float64 may be at most twice the error of
``torch.nn.functional.layer_norm`` run in the same dtype (fp32 statistics inside, like ours), plus a
few epsilons of the magnitude of the terms each result sums (:func:`_summed_terms`: dweight and dbias
sum over rows, dx subtracts two row means). Without a GPU the kernels run in Triton's CPU interpreter
(fp32, fp16) on small awkward shapes; bf16, GPT-2-sized shapes and ``torch.compile`` need a GPU.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from tolerance import SummedTerms, assert_close, row_sum_terms

from gptfast import GPTModel, ops, reference
from gptfast.kernels import layer_norm as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# the model-level tests compare layer norms only: the other ops stay on the reference
OTHERS_REFERENCE = {"attention": "reference", "feed_forward": "reference"}

# (shape, seed): widths from 1 to the widest supported; rows that do not fill a tile of the forward
# (16 rows under the interpreter) or a round of the persistent backward (3 programs x 8 rows).
SHAPES = [(1, 50), (7, 1023), (2, 9, 768), (37, 1600), (130, 1024), (3, 8192), (5, 1)]
GPU_SHAPES = [(16384, 768), (8 * 1024, 1600), (7, 1280), (1, 8192), (4099, 1024), (2, 333, 50)]


def _inputs(shape, dtype, seed, device=DEVICE):
    """x with a non-zero mean (centring matters), weight near 1, bias, and the upstream gradient dy."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 0.7
    w = 1.0 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, w, b, dy)]


def _leaves(tensors, dtype=None):
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _same(t):
    return t


def _summed_terms(x, w, b, dy, x_terms=None):
    """fp64 magnitudes of the terms that y, dx, dweight and dbias sum, from the reference math.

    xhat = (x - mean) rstd subtracts the mean, which sums |x| / E: its terms are (|x| + mean |x|) rstd
    (``x_terms`` replaces |x| when x is itself a sum, x + branch). y = w xhat + b; with g = w dy,
    dx = rstd (g - mean(g) - xhat mean(g xhat)) sums rstd (|g| + mean |g| + |xhat| mean |g xhat|);
    dweight = sum_rows dy xhat and dbias = sum_rows dy sum their |terms| over the rows.
    """
    x, w, b, dy = (t.detach().double() for t in (x, w, b, dy))
    x_terms = x.abs() if x_terms is None else x_terms.double()
    rstd = (x.var(-1, keepdim=True, unbiased=False) + EPS).rsqrt()  # (..., 1)
    xhat = (x_terms + x_terms.mean(-1, keepdim=True)) * rstd  # (..., E), the terms of xhat
    g = (w * dy).abs()
    dx = rstd * (g + g.mean(-1, keepdim=True) + xhat * (g * xhat).mean(-1, keepdim=True))
    return {"y": w.abs() * xhat + b.abs(), "dx": dx, "dweight": row_sum_terms(dy * xhat), "dbias": row_sum_terms(dy)}


def _check_layer_norm(x, w, b, dy, dtype, view=_same):
    """Kernel vs fp64 reference vs F.layer_norm in ``dtype``: the output and dx, dweight, dbias.

    The ops see ``view(x)``; the gradient checked is that of x itself (zero outside the view).
    """
    xk, wk, bk = _leaves((x, w, b))
    y = ops.layer_norm(view(xk), wk, bk, EPS, backend="triton")
    y.backward(dy)
    x64, w64, b64 = _leaves((x, w, b), torch.float64)
    y64 = reference.layer_norm(view(x64), w64, b64, EPS)
    y64.backward(dy.double())
    xt, wt, bt = _leaves((x, w, b))
    yt = F.layer_norm(view(xt), (w.shape[-1],), wt, bt, EPS)
    yt.backward(dy)
    terms = _summed_terms(view(x), w, b, dy)
    assert y.dtype == dtype and y.shape == view(x).shape
    assert_close("y", y, y64, yt, dtype, scale=terms["y"])
    for name, k, r, t in (("dx", xk, x64, xt), ("dweight", wk, w64, wt), ("dbias", bk, b64, bt)):
        assert_close(name, k.grad, r.grad, t.grad, dtype, scale=terms[name])
    return wk.grad, bk.grad


def _check_add_layer_norm(x, branch, w, b, ds, dy, dtype, view=_same):
    """(s, y) = add_layer_norm(x, branch); both outputs and the gradients of x, branch, weight, bias."""
    xk, rk, wk, bk = _leaves((x, branch, w, b))
    s, y = ops.add_layer_norm(view(xk), view(rk), wk, bk, EPS, backend="triton")
    torch.autograd.backward((s, y), (ds, dy))
    x64, r64, w64, b64 = _leaves((x, branch, w, b), torch.float64)
    s64, y64 = reference.add_layer_norm(view(x64), view(r64), w64, b64, EPS)
    torch.autograd.backward((s64, y64), (ds.double(), dy.double()))
    xt, rt, wt, bt = _leaves((x, branch, w, b))
    st = view(xt) + view(rt)
    yt = F.layer_norm(st, (w.shape[-1],), wt, bt, EPS)
    torch.autograd.backward((st, yt), (ds, dy))
    s_terms = view(x).double().abs() + view(branch).double().abs()  # s = x + branch
    terms = _summed_terms(s64, w, b, dy, x_terms=s_terms)
    terms["dx"] = terms["dbranch"] = ds.double().abs() + terms["dx"]  # ds plus the norm's dx
    assert_close("s", s, s64, st, dtype, scale=s_terms)
    assert_close("y", y, y64, yt, dtype, scale=terms["y"])
    for name, k, r, t in (("dx", xk, x64, xt), ("dbranch", rk, r64, rt), ("dweight", wk, w64, wt),
                          ("dbias", bk, b64, bt)):
        assert_close(name, k.grad, r.grad, t.grad, dtype, scale=terms[name])


# --------------------------------------------------------------------------------------------------
# Interpreter (or GPU) tests, fp32 and fp16
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_matches_fp64(shape, dtype):
    x, w, b, dy = _inputs(shape, dtype, seed=sum(shape))
    _check_layer_norm(x, w, b, dy, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, 50), (7, 1023), (2, 9, 768), (130, 1024)], ids=lambda s: "x".join(map(str, s)))
def test_add_layer_norm_matches_fp64(shape, dtype):
    x, w, b, dy = _inputs(shape, dtype, seed=1 + sum(shape))
    branch, _, _, ds = _inputs(shape, dtype, seed=2 + sum(shape))
    _check_add_layer_norm(x, branch, w, b, ds, dy, dtype)


def test_non_contiguous_inputs_and_expanded_grads():
    # (B, T, E) views the model can hand over: transposed (last-dim stride != 1), rows strided
    # unevenly (every other token), a slice of wider rows (row stride > E).
    dtype = torch.float32
    x, w, b, _ = _inputs((2, 20, 1030), dtype, seed=5)
    branch, _, _, _ = _inputs((2, 20, 1030), dtype, seed=6)
    views = [
        lambda t: t[:, :, :33].transpose(1, 2),  # (2, 33, 20), columns 1030 elements apart: copied
        lambda t: t[:, ::2, :96],  # (2, 10, 96), rows unevenly spaced: copied
        lambda t: t[:, :, 1:1024],  # (2, 20, 1023), rows 1030 apart: read in place
    ]
    for view in views:
        assert not view(x).is_contiguous()
        n = view(x).shape[-1]
        dy = torch.randn(view(x).shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(DEVICE)
        _check_layer_norm(x, w[:n], b[:n], dy, dtype, view)
        _check_add_layer_norm(x, branch, w[:n], b[:n], dy, -dy, dtype, view)
    # y.sum().backward() hands the backward an expanded gradient (all strides 0)
    ones = torch.ones((), dtype=dtype, device=DEVICE).expand(2, 20, 1023)
    assert ones.stride() == (0, 0, 0)
    _check_layer_norm(x, w[:1023], b[:1023], ones, dtype, views[2])
    _check_add_layer_norm(x, branch, w[:1023], b[:1023], ones, dy, dtype, views[2])


def test_weight_and_bias_gradients_are_bitwise_reproducible():
    x, w, b, dy = _inputs((130, 1024), torch.float32, seed=11)
    runs = []
    for _ in range(2):
        xk, wk, bk = _leaves((x, w, b))
        ops.layer_norm(xk, wk, bk, EPS, backend="triton").backward(dy)
        runs.append((xk.grad, wk.grad, bk.grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_too_wide_or_wrong_dtype_raises_with_the_fix():
    x = torch.randn(2, K.MAX_WIDTH + 1, device=DEVICE)
    w, b = torch.ones(K.MAX_WIDTH + 1, device=DEVICE), torch.zeros(K.MAX_WIDTH + 1, device=DEVICE)
    with pytest.raises(ValueError, match=r"width 8193 are wider than the Triton kernel supports \(8192\).*reference"):
        ops.layer_norm(x, w, b, backend="triton")
    with pytest.raises(ValueError, match="wider than the Triton kernel supports"):
        ops.add_layer_norm(x, x, w, b, backend="triton")
    with pytest.raises(ValueError, match="wider than the Triton kernel supports"):
        K.layer_norm(x, w, b)  # the kernel module checks too, never a silent wrong answer
    x64 = torch.randn(2, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ops.layer_norm(x64, torch.ones_like(x64[0]), torch.zeros_like(x64[0]), backend="triton")
    assert K.unsupported_reason("layer_norm", x[:, :K.MAX_WIDTH], w, b) is None


def test_empty_batch():
    x, w, b, _ = _inputs((0, 64), torch.float32, seed=3)
    xk, wk, bk = _leaves((x, w, b))
    y = ops.layer_norm(xk, wk, bk, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 64) and torch.equal(wk.grad, torch.zeros_like(w)) and torch.equal(bk.grad, torch.zeros_like(b))


def test_registered_as_custom_ops():
    # The schema, and the fake-tensor outputs that torch.compile traces with against the real ones.
    checks = ("test_schema", "test_faketensor")
    arch = ops.cuda_arch(torch.device("cuda")) if torch.cuda.is_available() else None
    x, w, b, dy = _inputs((5, 96), torch.float32, seed=4)
    y, mean, rstd = torch.ops.gptfast.layer_norm_fwd(x, w, b, EPS, arch)
    for name, args in (
        ("layer_norm_fwd", (x, w, b, EPS, arch)),
        ("add_layer_norm_fwd", (x, dy, w, b, EPS, arch)),
        ("layer_norm_bwd", (dy, x, w, mean, rstd, None, arch)),
        ("layer_norm_bwd", (dy, x, w, mean, rstd, dy, arch)),
    ):
        torch.library.opcheck(getattr(torch.ops.gptfast, name), args, test_utils=checks)


def test_torch_compile_captures_one_graph():
    # fullgraph=True fails on any graph break; the "eager" backend runs the captured graph as is, so
    # this also runs under Triton's interpreter (inductor, which needs a GPU, is tested below).
    arch = ops.cuda_arch(torch.device("cuda")) if torch.cuda.is_available() else None

    def step(x, branch, w, b):
        s, h = K.add_layer_norm(x, branch, w, b, EPS, arch=arch)
        return K.layer_norm(s + h, w, b, EPS, arch=arch)

    x, w, b, dy = _inputs((2, 5, 96), torch.float32, seed=9)
    branch = x.flip(0)
    eager_in, compiled_in = _leaves((x, branch, w, b)), _leaves((x, branch, w, b))
    step(*eager_in).backward(dy)
    torch.compile(step, backend="eager", fullgraph=True)(*compiled_in).backward(dy)
    for e, c in zip(eager_in, compiled_in):
        assert torch.equal(c.grad, e.grad)


def test_configs_and_resource_specs_agree():
    assert len(K.configs(None, torch.float32)) == 1  # the interpreter's one fixed config
    for arch in (80, 86, 89, 90):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            cfgs = K.configs(arch, dtype)
            specs = K.resource_specs(arch, dtype)
            assert max(c["BLOCK_N"] for c in cfgs) >= K.MAX_WIDTH
            for c in cfgs:  # every config, forward and backward, with and without the residual
                for kernel, rows, warps in ((K._layer_norm_fwd_kernel, c["FWD_ROWS"], c["fwd_warps"]),
                                            (K._layer_norm_bwd_kernel, c["BWD_ROWS"], c["bwd_warps"])):
                    found = [s for s in specs if s["kernel"] is kernel and s["constexprs"]["BLOCK_N"] == c["BLOCK_N"]
                             and s["constexprs"]["ROWS"] == rows and s["num_warps"] == warps]
                    assert len(found) == 2, (arch, dtype, c)
            for n in (1, 50, 768, 1023, 1600, 8192):
                assert K._config(arch, n) in cfgs


# --------------------------------------------------------------------------------------------------
# The model: triton and reference backends agree
# --------------------------------------------------------------------------------------------------


def test_model_triton_matches_reference():
    # scales: each parameter gradient's summed terms from the fp64 pass (tests/tolerance.py's SummedTerms:
    # sum_rows |dy xhat| for a norm's scale, sum_rows |dy| for its shift, |dY|^T |X| for a linear weight);
    # logits: |x| |W_out|^T
    cfg = dict(vocab_size=97, context_length=16, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)
    torch.manual_seed(123)
    model = GPTModel(cfg).to(DEVICE)
    idx = torch.randint(0, cfg["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    target = torch.randint(0, cfg["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    with torch.no_grad():  # move the norms away from scale=1, shift=0 so their gradients carry weight
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))).to(DEVICE))

    def run(m, backend, terms=None):
        m.set_backend(backend)
        m.zero_grad()
        with terms or contextlib.nullcontext():
            logits = m(idx)
            F.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    logits_lowp, grads_lowp = run(model, dict(OTHERS_REFERENCE, layer_norm="reference"))
    logits_k, grads_k = run(model, dict(OTHERS_REFERENCE, layer_norm="triton"))
    model64 = GPTModel(cfg).to(DEVICE)
    model64.load_state_dict(model.state_dict())
    terms = SummedTerms(model64.double())
    logits64, grads64 = run(model64, "reference", terms)
    terms.check_complete(model64)
    assert_close("logits", logits_k, logits64, logits_lowp, torch.float32, scale=terms.outputs["out_head.weight"])
    assert grads_k.keys() == grads64.keys()
    for name in grads64:
        assert_close(f"grad of {name}", grads_k[name], grads64[name], grads_lowp[name], torch.float32,
                     scale=terms.grads[name])


# --------------------------------------------------------------------------------------------------
# GPU only: bf16, GPT-2 sizes, determinism at scale, torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_layer_norm_and_add_layer_norm(shape, dtype):
    x, w, b, dy = _inputs(shape, dtype, seed=sum(shape))
    _check_layer_norm(x, w, b, dy, dtype)
    branch, _, _, ds = _inputs(shape, dtype, seed=1 + sum(shape))
    _check_add_layer_norm(x, branch, w, b, ds, dy, dtype)


@pytest.mark.gpu
def test_gpu_gradients_are_bitwise_reproducible():
    x, w, b, dy = _inputs((16384, 768), torch.bfloat16, seed=12)
    branch = torch.randn_like(x)
    runs = []
    for _ in range(3):
        xk, rk, wk, bk = _leaves((x, branch, w, b))
        s, y = ops.add_layer_norm(xk, rk, wk, bk, EPS, backend="triton")
        torch.autograd.backward((s, y), (dy, dy))
        runs.append((xk.grad, wk.grad, bk.grad))
    for later in runs[1:]:
        for first, again in zip(runs[0], later):
            assert torch.equal(first, again)


@pytest.mark.gpu
def test_gpu_torch_compile_keeps_one_graph():
    arch = ops.cuda_arch(torch.device("cuda"))

    def step(x, branch, w, b):
        s, h = K.add_layer_norm(x, branch, w, b, EPS, arch=arch)
        return K.layer_norm(s + h, w, b, EPS, arch=arch)

    compiled = torch.compile(step, fullgraph=True)
    x, w, b, dy = _inputs((4, 256, 768), torch.bfloat16, seed=13)
    branch = torch.randn_like(x)
    eager_in, compiled_in = _leaves((x, branch, w, b)), _leaves((x, branch, w, b))
    step(*eager_in).backward(dy)
    compiled(*compiled_in).backward(dy)
    for e, c in zip(eager_in, compiled_in):
        torch.testing.assert_close(c.grad, e.grad, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_compiled_model_matches_fp64():
    cfg = dict(vocab_size=500, context_length=64, emb_dim=128, n_heads=4, n_layers=2, drop_rate=0.0)
    torch.manual_seed(0)
    model = GPTModel(cfg, backend=dict(OTHERS_REFERENCE, layer_norm="reference")).cuda()
    idx = torch.randint(0, 500, (2, 64), device="cuda")
    with torch.no_grad():
        eager_reference = model(idx)
        model.set_backend(dict(OTHERS_REFERENCE, layer_norm="triton"))
        compiled = torch.compile(model)(idx)
        model64 = GPTModel(cfg, backend=dict(OTHERS_REFERENCE, layer_norm="reference")).cuda()
        model64.load_state_dict(model.state_dict())
        terms = SummedTerms(model64.double())
        with terms:
            logits64 = model64(idx)
    assert_close("compiled logits", compiled, logits64, eager_reference, torch.float32,
                 scale=terms.outputs["out_head.weight"])  # |x| |W_out|^T
