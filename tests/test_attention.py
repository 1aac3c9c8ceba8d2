"""The Triton flash attention (``gptfast.kernels.attention``) against an fp64 reference.

Every numeric case checks the output and dq, dk, dv with the tolerance rule of ``tests/tolerance.py``:
the kernel's max-abs error against ``gptfast.reference.causal_attention`` run in float64 may be at
most twice the error of the same reference run by PyTorch in the kernel's dtype, plus a few epsilons
of the magnitude of the terms each result sums (:func:`_summed_terms`; at T = 1, dq and dk are
exactly 0 and only that magnitude is left).
q/k/v come in the model's layout (``view(B, T, H, D).transpose(1, 2)``, not contiguous) unless a
case says otherwise. Without a GPU the kernels run in Triton's CPU interpreter on small awkward
shapes (partial tiles, T = 1, padded head dims); bf16, GPT-2-sized shapes and ``torch.compile`` need
a GPU. Dropout is checked by reading the kernel's keep mask back (v = identity) and comparing the
kernel with an fp64 reference that applies exactly that mask.
"""

import contextlib
import math

import pytest
import torch
from tolerance import SummedTerms, assert_close

from gptfast import GPTConfig, GPTModel, ops, reference
from gptfast.kernels import attention as K
from gptfast.kv_cache import KVCache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ARCH = ops.cuda_arch(torch.device("cuda")) if DEVICE == "cuda" else None
TRITON = {"attention": "triton"}


def _model_layout(x):
    """(B, H, T, D) values stored as the projections produce them: (B, T, H, D) memory, viewed as (B, H, T, D)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _inputs(b, h, t, d, seed, t_k=None, dtype=torch.float32, layout=_model_layout):
    g = torch.Generator().manual_seed(seed)
    t_k = t if t_k is None else t_k
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, t_k, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, t_k, d, generator=g, dtype=torch.float64)
    do = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    return [layout(x).to(device=DEVICE, dtype=dtype) for x in (q, k, v)] + [do.to(device=DEVICE, dtype=dtype)]


def _leaves(tensors, dtype=None):
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _summed_terms(q, k, v, do=None, softmax_scale=None, cache_seqlens=None, drop=None):
    """fp64 magnitudes of the terms that out, dq, dk and dv sum, from the reference math.

    A score s = scale q.k sums the terms scale |q| |k|^T; exp turns its rounding into a relative error
    of the weight, so a weight P counts as P (1 + scale |q| |k|^T). With W = P * drop (drop = keep /
    (1 - p), or 1): out = W v sums W |v|; dv = W^T dO sums W^T |dO|; dS = P (dP - delta) subtracts
    delta = rowsum(dO o) from dP = (dO v^T) * drop, two sums of |dO| |v| and |dO| |o| that cancel
    exactly where a query sees one key (T = 1, or query 0); dq = scale dS k and dk = scale dS^T q carry
    those terms on. Without ``do``, only out's.
    """
    q, k, v = (t.detach().double() for t in (q, k, v))
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    _, p = reference.causal_attention(q, k, v, softmax_scale=softmax_scale, cache_seqlens=cache_seqlens,
                                      return_weights=True)  # (B, H, Tq, Tk)
    p_terms = p * (1 + scale * q.abs() @ k.abs().transpose(-2, -1))  # (B, H, Tq, Tk)
    drop = torch.ones_like(p) if drop is None else drop.double()
    w_terms = p_terms * drop
    if do is None:
        return {"out": w_terms @ v.abs()}
    do, out = do.detach().double(), (p * drop) @ v  # (B, H, Tq, D)
    ds = p_terms * ((do.abs() @ v.abs().transpose(-2, -1)) * drop + (do.abs() * out.abs()).sum(-1, keepdim=True))
    return {"out": w_terms @ v.abs(), "dq": scale * ds @ k.abs(), "dk": scale * ds.transpose(-2, -1) @ q.abs(),
            "dv": w_terms.transpose(-2, -1) @ do.abs()}


def _check(q, k, v, do, dtype, kernel=None, ref=None, drop=None, **kw):
    """Kernel vs fp64 reference vs PyTorch in ``dtype``: the output and the gradients of q, k, v.

    ``drop`` is the keep mask / (1 - p) that ``kernel`` and ``ref`` apply, for the summed terms.
    """
    kernel = kernel or (lambda *a, **k_: ops.causal_attention(*a, backend="triton", **k_))
    ref = ref or reference.causal_attention
    qk, kk, vk = _leaves((q, k, v))
    out = kernel(qk, kk, vk, **kw)
    out.backward(do)
    q64, k64, v64 = _leaves((q, k, v), torch.float64)
    out64 = ref(q64, k64, v64, **kw)
    out64.backward(do.double())
    qt, kt, vt = _leaves((q, k, v))
    outt = ref(qt, kt, vt, **kw)
    outt.backward(do)
    terms = _summed_terms(q, k, v, do, kw.get("softmax_scale"), kw.get("cache_seqlens"), drop)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close("out", out, out64, outt, dtype, scale=terms["out"])
    for name, a, r, t in (("dq", qk, q64, qt), ("dk", kk, k64, kt), ("dv", vk, v64, vt)):
        assert_close(name, a.grad, r.grad, t.grad, dtype, scale=terms[name])
    return out, (qk.grad, kk.grad, vk.grad)


# --------------------------------------------------------------------------------------------------
# Without dropout: the reference within tolerance
# --------------------------------------------------------------------------------------------------

# (B, H, T, D): T = 1, tiles that are partial (interpreter tiles are 64 queries x 32 keys forward,
# 32 x 64 in dK/dV), exactly full (128), one past full (129, 1025); D padded (20 -> 32, 48 -> 64).
SHAPES = [
    (1, 1, 1, 64),
    (2, 3, 7, 32),
    (1, 2, 97, 64),
    (2, 1, 129, 32),
    (1, 1, 128, 48),
    (1, 1, 33, 20),
    (1, 1, 129, 128),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_reference(shape):
    _check(*_inputs(*shape, seed=sum(shape)), torch.float32)


def test_long_sequence_forward():
    # 1025 = 16 full query tiles + 1: the forward over 33 key tiles; gradients are checked at 97-129
    q, k, v, _ = _inputs(1, 1, 1025, 64, seed=9)
    out = K.causal_attention(q, k, v, arch=ARCH)
    assert_close("out", out, reference.causal_attention(q.double(), k.double(), v.double()),
                 reference.causal_attention(q, k, v), torch.float32,
                 scale=_summed_terms(q, k, v)["out"])  # P |v|


def test_contiguous_inputs_and_custom_scale():
    q, k, v, do = _inputs(2, 2, 50, 32, seed=3, layout=lambda x: x.contiguous())
    _check(q, k, v, do, torch.float32, softmax_scale=0.3)


@pytest.mark.parametrize("scale", [-0.3, 0.0, float("inf"), float("nan")])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_scale_that_is_not_positive_is_refused(scale, backend):
    # masked scores are -inf: a scale of 0 or below would make them NaN or the largest score
    q, k, v, _ = _inputs(1, 1, 8, 16, seed=6)
    with pytest.raises(ValueError, match="softmax_scale must be a positive number"):
        ops.causal_attention(q, k, v, softmax_scale=scale, backend=backend)
    with pytest.raises(ValueError, match="softmax_scale must be a positive number"):
        K.causal_attention(q, k, v, softmax_scale=scale, arch=ARCH)


def test_expanded_output_gradient():
    # out.sum() sends back a gradient with stride 0 everywhere: the kernels read it through its strides
    q, k, v, _ = _inputs(1, 2, 40, 32, seed=4)
    do = torch.ones(1, 1, 1, 1, device=DEVICE).expand(1, 2, 40, 32)
    _check(q, k, v, do, torch.float32)


def test_fp16():
    q, k, v, do = _inputs(1, 2, 70, 64, seed=5, dtype=torch.float16)
    _check(q, k, v, do, torch.float16)


def test_output_keeps_the_projection_layout():
    # o comes back laid out like q, so the model's transpose(1, 2).contiguous() is free
    q, k, v, _ = _inputs(2, 3, 9, 16, seed=6)
    out = K.causal_attention(q, k, v, arch=ARCH)
    assert out.stride() == q.stride()
    assert out.transpose(1, 2).is_contiguous()


def test_backward_is_deterministic():
    q, k, v, do = _inputs(1, 1, 70, 32, seed=7)
    grads = []
    for _ in range(2):
        qk, kk, vk = _leaves((q, k, v))
        torch.manual_seed(0)
        K.causal_attention(qk, kk, vk, dropout_p=0.2, arch=ARCH).backward(do)
        grads.append((qk.grad, kk.grad, vk.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Memory: what the forward pass keeps for the backward
# --------------------------------------------------------------------------------------------------


def test_saved_for_backward_is_linear_in_t():
    t, d = 1024, 64
    q, k, v, _ = _inputs(1, 1, t, d, seed=8)
    q, k, v = _leaves((q, k, v))
    saved = []

    def pack(x):
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        K.causal_attention(q, k, v, arch=ARCH)
    one_tt_matrix = t * t * 4  # a single fp32 (T, T) attention matrix
    # q, k, v, o (4 T D) and the log-sum-exp (T): 25.1% -- nothing else of that size
    assert sum(saved) < 0.30 * one_tt_matrix, (saved, one_tt_matrix)


# --------------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------------


def _keep_mask(b, h, t, p, seed, t_k=None, d=None):
    """Read the kernel's keep mask for inputs of shape (b, h, t, d) back from its output.

    The mask depends only on the seed and each element's (batch*head, query, key) position, not on
    the values. With q = 0 every visible weight is 1/(i+1); with v = the identity (d = Tk), output row
    i is that row's weights, so keep_ij = out_ij * (i + 1) * (1 - p) is exactly 0 or 1.
    """
    t_k = t if t_k is None else t_k
    q = torch.zeros(b, h, t, t_k, device=DEVICE)
    k = torch.randn(b, h, t_k, t_k, device=DEVICE)
    v = torch.eye(t_k, device=DEVICE).expand(b, h, t_k, t_k)
    torch.manual_seed(seed)
    out = K.causal_attention(q, k, v, dropout_p=p, arch=ARCH)
    p = K.effective_dropout_p(p)  # survivors are scaled by the probability the kernel applies
    keep = out.double() * (torch.arange(t, device=DEVICE, dtype=torch.float64) + 1)[:, None] * (1 - p)
    assert (keep - keep.round()).abs().max() < 1e-4, "the weights of kept entries are not 1/((i+1)(1-p))"
    keep = keep.round()
    causal = torch.tril(torch.ones(t, t_k, dtype=torch.bool, device=DEVICE))
    assert keep[..., ~causal].abs().max() == 0, "a weight above the diagonal survived"
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    return keep, causal


@pytest.mark.parametrize("p, effective", [(0.1, 26 / 256), (0.3, 77 / 256), (0.5, 0.5), (1e-4, 1 / 256),
                                          (0.999, 255 / 256), (0.0, 0.0)])
def test_the_dropout_probability_is_the_nearest_multiple_of_1_256(p, effective):
    assert K.effective_dropout_p(p) == effective


def test_dropout_keep_rate_and_scaling():
    p = 0.3
    keep, causal = _keep_mask(2, 4, 128, p, seed=11)
    kept = keep[..., causal]  # 8 slices x 8256 visible weights
    rate = kept.mean().item()
    p = K.effective_dropout_p(p)  # 77 / 256
    sigma = math.sqrt(p * (1 - p) / kept.numel())
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # the sixteen keys that share one Philox call are not one decision repeated: within each group of
    # 16 neighbouring keys the kept count varies as independent draws would (binomial variance)
    counts = keep.reshape(2, 4, 128, 8, 16).sum(-1)  # (b, h, query, group of 16 keys)
    row = torch.arange(128, device=DEVICE)[:, None]
    last_key = 16 * torch.arange(8, device=DEVICE)[None, :] + 15
    full = counts[..., row >= last_key]  # groups whose 16 keys the query sees: 8 x 448 of them
    binomial = 16 * p * (1 - p)
    assert abs(full.var().item() - binomial) < 0.15 * binomial, (full.var().item(), binomial)
    # different heads and rows draw different masks
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


def test_dropout_is_reproducible_under_a_seed():
    q, k, v, _ = _inputs(1, 2, 45, 32, seed=12)
    torch.manual_seed(1)
    a = K.causal_attention(q, k, v, dropout_p=0.25, arch=ARCH)
    torch.manual_seed(1)
    b = K.causal_attention(q, k, v, dropout_p=0.25, arch=ARCH)
    c = K.causal_attention(q, k, v, dropout_p=0.25, arch=ARCH)  # the generator moved on: a new mask
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _masked_reference(keep, p):
    """The book's attention with dropout, applying the given keep mask instead of drawing one."""

    def ref(q, k, v, dropout_p, **kw):
        scores = (q @ k.transpose(-2, -1)).masked_fill(reference.causal_mask(q.shape[2], k.shape[2],
                                                                             device=q.device), -torch.inf)
        weights = torch.softmax(scores / q.shape[-1] ** 0.5, dim=-1)
        return (weights * keep.to(q.dtype) / (1 - K.effective_dropout_p(dropout_p))) @ v

    return ref


@pytest.mark.parametrize("b,h,t,d", [(1, 2, 48, 48), (1, 1, 100, 100)])
def test_dropout_gradients_match_the_mask_used(b, h, t, d):
    p = 0.2
    keep, _ = _keep_mask(b, h, t, p, seed=13)  # d = Tk: the same shape, so the same mask

    def kernel(q, k, v, dropout_p):
        torch.manual_seed(13)  # the seed the mask was read with
        return K.causal_attention(q, k, v, dropout_p=dropout_p, arch=ARCH)

    _check(*_inputs(b, h, t, d, seed=14), torch.float32, kernel=kernel, ref=_masked_reference(keep, p),
           drop=keep / (1 - K.effective_dropout_p(p)), dropout_p=p)


def test_dropout_replays_under_activation_checkpointing():
    # checkpoint restores torch's RNG state before recomputing: the seed, hence the mask, replays
    q, k, v, do = _inputs(1, 2, 40, 32, seed=15)
    fn = lambda a, b_, c: K.causal_attention(a, b_, c, dropout_p=0.3, arch=ARCH) * 2.0  # noqa: E731
    grads = []
    for checkpointed in (False, True):
        qk, kk, vk = _leaves((q, k, v))
        torch.manual_seed(2)
        if checkpointed:
            out = torch.utils.checkpoint.checkpoint(fn, qk, kk, vk, use_reentrant=False)
        else:
            out = fn(qk, kk, vk)
        out.backward(do)
        grads.append((out.detach(), qk.grad, kk.grad, vk.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# The decode path: queries against a KV cache
# --------------------------------------------------------------------------------------------------


# one query; a few; a chunked prefill past the decode configs (20 > 16 queries); a cache long enough
# to be split over programs and merged
@pytest.mark.parametrize("t_q,lengths,t_k", [(1, [5, 0, 17], 18), (3, [30, 2], 40), (20, [5, 13], 40),
                                             (1, [1100], 1101)])
def test_decode_matches_full_attention_on_the_prefix(t_q, lengths, t_k):
    b, h, d = len(lengths), 2, 32
    full_t = max(lengths) + t_q
    q, k, v, _ = _inputs(b, h, full_t, d, seed=16)
    full = reference.causal_attention(q.double(), k.double(), v.double())  # (B, H, T, D)
    # the cache: each row's keys at their positions, stale garbage beyond each row's valid length
    g = torch.Generator().manual_seed(17)
    k_cache = torch.randn(b, h, t_k, d, generator=g).to(DEVICE)
    v_cache = torch.randn(b, h, t_k, d, generator=g).to(DEVICE)
    q_new = torch.empty(b, h, t_q, d, device=DEVICE)
    expected = torch.empty(b, h, t_q, d, dtype=torch.float64, device=DEVICE)
    for row, n in enumerate(lengths):
        k_cache[row, :, : n + t_q] = k[row, :, : n + t_q]
        v_cache[row, :, : n + t_q] = v[row, :, : n + t_q]
        q_new[row] = q[row, :, n : n + t_q]
        expected[row] = full[row, :, n : n + t_q]
    seqlens = torch.tensor(lengths, device=DEVICE)
    out = ops.causal_attention(q_new, k_cache, v_cache, cache_seqlens=seqlens, backend="triton")
    ref32 = reference.causal_attention(q_new, k_cache, v_cache, cache_seqlens=seqlens)
    terms = _summed_terms(q_new, k_cache, v_cache, cache_seqlens=seqlens)["out"]  # P |v| over the cache
    assert_close("decode out", out, expected, ref32, torch.float32, scale=terms)


@pytest.mark.parametrize("b,t_k,lengths", [(2, 37, [20, 34]), (1, 1030, [1027])])
def test_decode_gradients(b, t_k, lengths):
    # inference needs no backward, but with grad enabled the cache path must still be right; a cache
    # of 1024 keys or more takes the split-and-merge forward, whose log-sum-exp the backward uses
    q, _, _, do = _inputs(b, 2, 3, 32, seed=18)
    _, k, v, _ = _inputs(b, 2, 3, 32, seed=19, t_k=t_k)
    _check(q, k, v, do, torch.float32, cache_seqlens=torch.tensor(lengths, device=DEVICE))


def test_decode_long_cache_is_split_over_programs():
    splits, split_len = K._kv_splits(programs=2, t_k=1101, block_n=32, device=torch.device("cpu"))
    assert splits > 1 and splits * split_len >= 1101 and split_len % 32 == 0


def test_growing_cache_does_not_recompile():
    # the lengths are runtime arguments (do_not_specialize): a decode step per length reuses one kernel
    _, k, v, _ = _inputs(1, 1, 1, 16, seed=20, t_k=80)
    q = torch.randn(1, 1, 1, 16, device=DEVICE)

    def compiled():  # the interpreter compiles nothing, so only a GPU can count compiled variants
        return len(K._attn_fwd_kernel.device_caches[torch.cuda.current_device()][0]) if DEVICE == "cuda" else 0

    before = None
    for n in range(40, 50):  # lengths that change divisibility and parity at every step
        out = K.causal_attention(q, k[:, :, : n + 1], v[:, :, : n + 1],
                                 cache_seqlens=torch.tensor([n], device=DEVICE), arch=ARCH)
        before = compiled() if before is None else before
    assert compiled() == before
    seqlens = torch.tensor([49], device=DEVICE)
    ref64 = reference.causal_attention(q.double(), k[:, :, :50].double(), v[:, :, :50].double(), cache_seqlens=seqlens)
    ref32 = reference.causal_attention(q, k[:, :, :50], v[:, :, :50], cache_seqlens=seqlens)
    terms = _summed_terms(q, k[:, :, :50], v[:, :, :50], cache_seqlens=seqlens)["out"]  # P |v|
    assert_close("last step", out, ref64, ref32, torch.float32, scale=terms)


# --------------------------------------------------------------------------------------------------
# The op, the dispatcher, the model
# --------------------------------------------------------------------------------------------------


def test_registered_as_custom_ops():
    q, k, v, do = _inputs(1, 2, 20, 16, seed=21, layout=lambda x: x.contiguous())
    q, k, v = _leaves((q, k, v))
    arch = -1 if ARCH is None else ARCH
    # schema, autograd registration and shape propagation on FakeTensors; the compile-time checks
    # (aot_dispatch) need a GPU, as torch.compile over a Triton op does not run in the interpreter
    torch.library.opcheck(torch.ops.gptfast.flash_attention_fwd.default, (q, k, v, None, None, 0.0, 0.25, arch),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_unsupported_inputs_say_what_to_do():
    q = torch.randn(1, 1, 4, 160, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 160"):
        ops.causal_attention(q, q, q, backend="triton")
    assert K.unsupported_reason("causal_attention", q[..., :64], q[..., :64], q[..., :64]) is None
    q64 = torch.randn(1, 1, 4, 16, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ValueError, match="cast q, k, v"):
        ops.causal_attention(q64, q64, q64, backend="triton")


def test_every_config_has_a_resource_spec():
    # bench.resources compiles resource_specs(); each config a launch can pick must be among them
    assert K.configs(75, torch.float16) == [] and 75 not in K.SUPPORTED_ARCHS  # 64 KB of shared memory
    for arch in (None,) + K.SUPPORTED_ARCHS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            cfgs = K.configs(arch, dtype)
            if arch is not None:
                specs = K.resource_specs(arch, dtype)
                assert len(specs) == len(cfgs)
                for c, s in zip(cfgs, specs):
                    assert s["constexprs"].get("BLOCK_M") == c["BLOCK_M"] and s["num_warps"] == c["num_warps"]
            for d in (1, 16, 33, 64, 100, 128):
                for t_q, t_k in ((None, None), (1, 10), (1, 5000), (64, 64)):
                    assert K._pick(arch, dtype, "fwd", d, t_q, t_k) in cfgs


TINY = dict(vocab_size=97, context_length=40, emb_dim=64, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)


def test_model_triton_attention_matches_reference():
    # scales: each parameter gradient's summed terms (|dY|^T |X| for a weight, sum_rows |dY| for a bias,
    # tests/tolerance.py's SummedTerms) from the fp64 pass; a key bias's gradient is exactly 0, as softmax
    # ignores a constant added to a row, and only those terms bound its rounding; logits: |x| |W_out|^T
    torch.manual_seed(22)
    ref = GPTModel(GPTConfig(**TINY)).to(DEVICE)
    idx = torch.randint(0, 97, (2, 37), device=DEVICE)
    models = {}
    for name, dtype, backend in (("triton", torch.float32, TRITON), ("torch", torch.float32, "reference"),
                                 ("fp64", torch.float64, "reference")):
        m = GPTModel(GPTConfig(**TINY), backend=backend).to(device=DEVICE, dtype=dtype)
        m.load_state_dict(ref.state_dict())
        terms = SummedTerms(m)
        with terms if dtype == torch.float64 else contextlib.nullcontext():
            logits = m(idx)
            logits.float().logsumexp(-1).sum().backward()
        models[name] = (m, logits)
    terms.check_complete(models["fp64"][0])  # the terms of the last pass, the fp64 one
    (tm, tl_), (pm, pl), (rm, rl) = models["triton"], models["torch"], models["fp64"]
    assert_close("logits", tl_, rl, pl, torch.float32, scale=terms.outputs["out_head.weight"])
    rparams, pparams = dict(rm.named_parameters()), dict(pm.named_parameters())
    for name, p in tm.named_parameters():
        assert_close(f"grad {name}", p.grad, rparams[name].grad, pparams[name].grad, torch.float32,
                     scale=terms.grads[name])


def test_model_kv_cache_generation_matches_reference():
    torch.manual_seed(23)
    cfg = GPTConfig(**TINY)
    models = [GPTModel(cfg, backend=b).to(DEVICE).eval() for b in (TRITON, "reference")]
    models[1].load_state_dict(models[0].state_dict())
    prompt = torch.randint(0, 97, (2, 9), device=DEVICE)
    steps = []
    for m in models:
        cache = KVCache.for_model(m, batch_size=2)
        with torch.no_grad():
            out = [m(prompt, cache=cache)[:, -1]]
            for token in (5, 17, 42):
                out.append(m(torch.full((2, 1), token, device=DEVICE), cache=cache)[:, -1])
        steps.append(torch.stack(out))
    m64 = GPTModel(cfg, backend="reference").to(DEVICE, torch.float64).eval()
    m64.load_state_dict(models[0].state_dict())
    full = torch.cat([prompt, torch.tensor([[5, 17, 42]] * 2, device=DEVICE)], 1)
    with torch.no_grad(), SummedTerms(m64) as terms:
        ref64 = m64(full)[:, [8, 9, 10, 11]].transpose(0, 1)
    head_terms = terms.outputs["out_head.weight"][:, [8, 9, 10, 11]]  # |x| |W_out|^T of those logits
    assert_close("cached logits", steps[0], ref64, steps[1], torch.float32, scale=head_terms)


# --------------------------------------------------------------------------------------------------
# GPU only: low precision, GPT-2 sizes, torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 12, 1024, 64), (2, 3, 1000, 128), (1, 4, 4099, 64), (3, 2, 77, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_low_precision(shape, dtype):
    _check(*_inputs(*shape, seed=30, dtype=dtype), dtype)


@pytest.mark.gpu
def test_gpu_fp32_is_exact_not_tf32():
    _check(*_inputs(2, 4, 700, 64, seed=31), torch.float32)


@pytest.mark.gpu
def test_gpu_dropout_keep_rate():
    keep, causal = _keep_mask(2, 4, 128, 0.1, seed=32)
    assert abs(keep[..., causal].mean().item() - (1 - K.effective_dropout_p(0.1))) < 0.01


@pytest.mark.gpu
def test_gpu_torch_compile_keeps_the_op_whole():
    q, k, v, do = _inputs(2, 4, 300, 64, seed=33, dtype=torch.bfloat16)
    compiled = torch.compile(lambda a, b, c: ops.causal_attention(a, b, c, backend="triton"), fullgraph=True)
    _check(q, k, v, do, torch.bfloat16, kernel=lambda a, b, c: compiled(a, b, c))


@pytest.mark.gpu
def test_gpu_decode_bf16_long_cache():
    q, _, _, _ = _inputs(4, 12, 1, 64, seed=34, dtype=torch.bfloat16)
    _, k, v, _ = _inputs(4, 12, 1, 64, seed=35, t_k=3000, dtype=torch.bfloat16)
    seqlens = torch.tensor([2999, 1500, 10, 2048], device=DEVICE)
    out = ops.causal_attention(q, k, v, cache_seqlens=seqlens, backend="triton")
    ref64 = reference.causal_attention(q.double(), k.double(), v.double(), cache_seqlens=seqlens)
    ref = reference.causal_attention(q, k, v, cache_seqlens=seqlens)
    terms = _summed_terms(q, k, v, cache_seqlens=seqlens)["out"]  # P |v|
    assert_close("decode out", out, ref64, ref, torch.bfloat16, scale=terms)
