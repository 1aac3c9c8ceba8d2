"""The fused output head + cross-entropy: the chunked reference and the blockwise kernel against fp64
``F.cross_entropy(F.linear(x, W, b))``, its semantics (ignore_index, reductions, label smoothing,
z-loss), what it keeps in memory, and the model and trainer wired through it.

Tolerances follow ``tests/tolerance.py``; each result's scale is the fp64 magnitude of what it sums
(:func:`_summed_terms`).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from gptfast import GPTModel, ops
from tolerance import assert_close, matmul_terms, row_sum_terms

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(rows, width, vocab, bias=True, ignored=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, width, generator=g, dtype=torch.float64) / width ** 0.5 * 2
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, vocab, (rows,), generator=g)
    if ignored:
        t[::ignored] = -100
    return x, w, b, t


def _book(x, w, t, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    """The plain PyTorch loss: every logit materialized, F.cross_entropy, the z-loss added."""
    z = F.linear(x, w, bias).to(torch.promote_types(x.dtype, torch.float32))  # (N, V)
    return _book_from_logits(z, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                             z_loss=z_loss)


def _book_from_logits(z, t, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    loss = F.cross_entropy(z, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    if z_loss:
        valid = t != ignore_index
        zl = z_loss * torch.where(valid, torch.logsumexp(z, -1).square(), 0.0)
        loss = loss + {"none": zl, "sum": zl.sum(), "mean": zl.sum() / valid.sum()}[reduction]
    return loss


def _run(fn, x, w, b, t, dtype, upstream, **kw):
    leaves = [None if a is None else a.detach().clone().to(dtype).requires_grad_() for a in (x, w, b)]
    loss = fn(leaves[0], leaves[1], t, bias=leaves[2], **kw)
    loss.backward(upstream.to(loss.dtype).expand(loss.shape))
    return loss.detach(), [None if a is None else a.grad for a in leaves]


def _summed_terms(x, w, b, t, upstream, **kw):
    """fp64 magnitudes of the terms behind the loss and each gradient.

    The logits z sum ``T = |x| |W|^T + |b|``; the loss sums lse and z's terms. dz = d loss / dz
    (from fp64 autograd), plus the rounding of z carried into the softmax: ``g p T`` per entry. dx
    sums ``|dz| |W|``, dW sums ``|dz|^T |x|`` -- the summed magnitudes, not the result, which
    cancels --, db sums ``|dz|`` over rows.
    """
    x, w = x.double(), w.double()
    terms = matmul_terms(x, w.T) + (0 if b is None else b.double().abs())  # (N, V)
    z = F.linear(x, w, None if b is None else b.double()).requires_grad_()
    loss = _book_from_logits(z, t, **kw)
    (dz,) = torch.autograd.grad(loss, z, upstream.double().expand(loss.shape))
    lse = torch.logsumexp(z.detach(), -1, keepdim=True)
    p = torch.exp(z.detach() - lse)
    row_scale = dz.abs().sum(-1, keepdim=True)  # |g| (up to a factor 2 of label smoothing and z-loss)
    dz_terms = dz.abs() + row_scale * p * terms.max(-1, keepdim=True).values
    loss_scale = (terms.max() + lse.abs().max()) * (1 + 2 * kw.get("z_loss", 0.0) * lse.abs().max())
    return {"loss": loss_scale * upstream.abs().max(), "x": matmul_terms(dz_terms, w),
            "weight": matmul_terms(dz_terms.T, x), "bias": row_sum_terms(dz_terms)}


def _check(backend, rows, width, vocab, dtype, bias=True, **kw):
    x, w, b, t = _inputs(rows, width, vocab, bias)
    upstream = torch.linspace(0.5, 1.5, rows) if kw.get("reduction") == "none" else torch.tensor(1.3)
    ref, g64 = _run(_book, x, w, b, t, torch.float64, upstream, **kw)
    base, g_lp = _run(_book, x, w, b, t, dtype, upstream, **kw)  # PyTorch's own error in this dtype
    fused = lambda *a, **k: ops.linear_cross_entropy(*a, **k, backend=backend)  # noqa: E731
    loss, grads = _run(fused, x, w, b, t, dtype, upstream, **kw)
    terms = _summed_terms(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), t, upstream, **kw)
    assert_close("loss", loss, ref, base, dtype, scale=terms["loss"])
    for name, g, r, lp in zip(("x", "weight", "bias"), grads, g64, g_lp):
        if r is None:
            assert g is None
            continue
        assert g.dtype == dtype
        assert_close(f"d{name}", g, r, lp, dtype, scale=terms[name])


# -------------------------------------------------------------------------------------------------
# Loss and gradients against fp64
# -------------------------------------------------------------------------------------------------

KERNEL_CASES = [
    # rows, width, vocab, options: vocabularies of one tile and a part, of several tiles, of one token;
    # widths that the interpreter's 32-wide K steps divide (the loop without column masks) and not
    (37, 48, 97, {}),
    (21, 64, 150, {"z_loss": 1e-3}),
    (70, 40, 300, {"label_smoothing": 0.1, "z_loss": 1e-2}),
    (5, 16, 1, {"reduction": "sum"}),
    (19, 24, 131, {"reduction": "none", "label_smoothing": 0.2}),
]


@pytest.mark.parametrize("rows,width,vocab,kw", KERNEL_CASES)
def test_kernel_fp32_loss_and_gradients(rows, width, vocab, kw):
    _check("triton", rows, width, vocab, torch.float32, **kw)


def test_kernel_fp16_loss_and_gradients():
    _check("triton", 33, 32, 150, torch.float16, z_loss=1e-3)


def test_kernel_without_bias():
    _check("triton", 9, 16, 70, torch.float32, bias=False, label_smoothing=0.05)


@pytest.mark.parametrize("rows,width,vocab,kw", KERNEL_CASES + [(64, 32, 50257, {"z_loss": 1e-4}),
                                                               (40, 24, 300, {"label_smoothing": 0.1,
                                                                              "reduction": "none"})])
def test_reference_fp32_loss_and_gradients(rows, width, vocab, kw):
    _check("reference", rows, width, vocab, torch.float32, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_reference_fp64_is_f_cross_entropy(reduction, label_smoothing):
    # same semantics as F.cross_entropy, with a non-default ignore_index, in small chunks
    x, w, b, t = _inputs(23, 8, 11, ignored=0)
    t[::3] = 4
    kw = dict(ignore_index=4, reduction=reduction, label_smoothing=label_smoothing)
    ref, g_ref = _run(_book, x, w, b, t, torch.float64, torch.tensor(0.7), **kw)
    from gptfast import reference

    out, g = _run(lambda *a, **k: reference.linear_cross_entropy(*a, **k, chunk=5), x, w, b, t, torch.float64,
                  torch.tensor(0.7), **kw)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_target_ignored(backend):
    # F.cross_entropy: the mean over no rows is NaN, the sum 0, and every gradient 0
    x, w, b, _ = _inputs(6, 16, 20)
    t = torch.full((6,), -100)
    for reduction, expect in (("mean", math.nan), ("sum", 0.0)):
        loss, grads = _run(lambda *a, **k: ops.linear_cross_entropy(*a, **k, backend=backend), x, w, b, t,
                           torch.float32, torch.tensor(1.0), reduction=reduction, z_loss=1e-2)
        assert (math.isnan(loss.item()) if math.isnan(expect) else loss.item() == expect), (reduction, loss)
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_leading_dims_and_a_strided_input(backend):
    x, w, b, t = _inputs(12, 16, 40)
    x3 = x.float().reshape(4, 3, 16).transpose(0, 1)  # (3, 4, 16), not contiguous
    t3 = t.reshape(4, 3).T
    out = ops.linear_cross_entropy(x3, w.float(), t3, bias=b.float(), reduction="none", backend=backend)
    assert out.shape == (3, 4)
    ref = _book(x3.reshape(-1, 16).double(), w, t3.reshape(-1), bias=b, reduction="none").reshape(3, 4)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_one_clear_error():
    x, w, b, t = (a.float() if a.is_floating_point() else a for a in _inputs(4, 8, 10))
    with pytest.raises(ValueError, match="outside 0..9"):
        ops.linear_cross_entropy(x, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="reduction"):
        ops.linear_cross_entropy(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="weight must be"):
        ops.linear_cross_entropy(x, w.T, t)
    with pytest.raises(ValueError, match="targets have shape"):
        ops.linear_cross_entropy(x, w, t[:3])
    with pytest.raises(TypeError, match="integer"):
        ops.linear_cross_entropy(x, w, t.float())


# -------------------------------------------------------------------------------------------------
# Memory: nothing of size rows x vocab is saved or allocated
# -------------------------------------------------------------------------------------------------


def _saved_elements(fn):
    """Elements of the distinct storages the autograd graph saves during ``fn()``, parameters included."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _peak_bytes(fn):
    """Peak of the bytes torch allocates while ``fn()`` runs, from the profiler's memory events (the
    running sum of allocations and frees, in time order)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("backend,rows,width,vocab", [("reference", 1024, 16, 50257), ("triton", 128, 4, 4099)])
def test_memory_is_bounded_by_the_inputs(backend, rows, width, vocab):
    # the bound: twice x and W (the inputs, then their gradients) and 64 floats a row; the book's
    # logits alone (rows x vocab) would be >= 10x that. Under the interpreter the kernel's tiles live
    # in numpy, so its figure is what torch allocates around them.
    bound = 2 * (rows * width + vocab * width) + rows * 64
    assert rows * vocab >= 10 * bound
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=g, requires_grad=True)
    w = (torch.randn(vocab, width, generator=g) / width ** 0.5).requires_grad_()
    t = torch.randint(0, vocab, (rows,), generator=g)
    saved, loss = _saved_elements(lambda: ops.linear_cross_entropy(x, w, t, backend=backend))
    assert saved <= bound, (saved, bound)
    peak = _peak_bytes(lambda: ops.linear_cross_entropy(x, w, t, backend=backend).backward())
    assert peak <= bound * x.element_size(), (peak, bound * x.element_size())
    assert torch.isfinite(loss)


# -------------------------------------------------------------------------------------------------
# The model and the trainer through it
# -------------------------------------------------------------------------------------------------

CFG = dict(vocab_size=97, context_length=12, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def _batch(cfg, seed=3):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]), generator=g)
    targets = torch.randint(0, cfg["vocab_size"], idx.shape, generator=g)
    targets[0, :3] = -100  # e.g. padding or a masked prompt
    return idx, targets


def _book_loss(model, idx, targets):
    logits = model(idx)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),
                           targets.flatten())


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("head", ["reference", "triton"])
def test_model_with_targets_is_the_books_training_step(head, tied):
    # the same step with the fused head and with the book's logits: loss and every parameter gradient,
    # against an fp64 copy, within twice the fp32 error of the book's step; scales from SummedTerms
    from tolerance import SummedTerms

    cfg = dict(CFG, tie_weights=tied)
    torch.manual_seed(0)
    book = GPTModel(cfg, backend="reference")
    fused = GPTModel(cfg, backend={"linear_cross_entropy": head}).float()
    fused.load_state_dict(book.state_dict())
    model64 = GPTModel(cfg, backend="reference").double()
    model64.load_state_dict(book.state_dict())
    idx, targets = _batch(cfg)
    terms = SummedTerms(model64)
    with terms:
        loss64 = _book_loss(model64, idx, targets)
        loss64.backward()
    loss_book = _book_loss(book, idx, targets)
    loss_book.backward()
    loss = fused(idx, targets=targets)
    loss.backward()
    assert loss.shape == () and loss.dtype == torch.float32
    head_name = "tok_emb.weight" if tied else "out_head.weight"
    assert_close("loss", loss, loss64, loss_book, torch.float32, scale=terms.outputs[head_name].max() * 2)
    for (name, p), q, r in zip(book.named_parameters(), fused.parameters(), model64.parameters()):
        assert_close(f"grad {name}", q.grad, r.grad, p.grad, torch.float32, scale=terms.grads[name])


def test_model_without_targets_still_returns_logits_and_refuses_mixed_calls():
    model = GPTModel(CFG)
    idx, targets = _batch(CFG)
    assert model(idx).shape == (2, 12, 97)
    with pytest.raises(ValueError, match="targets= returns the loss alone"):
        model(idx, True, targets=targets)
    with pytest.raises(ValueError, match="targets must be"):
        model(idx, targets=targets[:, :5])


@pytest.mark.parametrize("head", ["reference", "triton"])
def test_lora_head_gradients(head):
    # a LoRA-wrapped out_head: the fused loss takes its effective weight, and A, B get the book's gradients
    from gptfast.lora import replace_linear_with_lora

    grads = []
    idx, targets = _batch(CFG)
    for fused in (False, True):
        torch.manual_seed(1)
        model = GPTModel(CFG, backend={"linear_cross_entropy": head})
        replace_linear_with_lora(model, rank=4, alpha=8, freeze_base=True)
        torch.nn.init.normal_(model.out_head.lora.B, std=0.1)  # a fresh LoRA is zero; make it count
        loss = model(idx, targets=targets) if fused else _book_loss(model, idx, targets)
        loss.backward()
        grads.append([loss.detach(), model.out_head.lora.A.grad, model.out_head.lora.B.grad])
    for book, ours in zip(*grads):
        assert book.abs().sum() > 0
        torch.testing.assert_close(ours, book, atol=1e-5, rtol=1e-4)


def _book_model(cfg, backend):
    class BookLoss(GPTModel):
        """The book's loss: all the logits, then F.cross_entropy."""

        def forward(self, in_idx, *args, targets=None, **kwargs):
            logits = super().forward(in_idx, *args, **kwargs)
            return logits if targets is None else _book_loss_from(logits, targets)

    return BookLoss(cfg, backend=backend)


def _book_loss_from(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@pytest.mark.parametrize("head", ["reference", "triton"])
def test_trainer_metrics_keep_the_books_loss(head, tmp_path):
    import json

    import numpy as np

    from gptfast.data import TokenShards, write_shards
    from gptfast.train import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    docs = [np.tile(rng.integers(0, 255, size=7), 40) for _ in range(3)]
    write_shards(docs, str(tmp_path / "shards"), "gpt2", 256, 255, shard_tokens=400)
    tiny = dict(vocab_size=256, context_length=16, emb_dim=32, n_heads=4, n_layers=1, drop_rate=0.0)
    runs = []
    for name, make in (("fused", GPTModel), ("book", _book_model)):
        torch.manual_seed(0)
        model = make(tiny, backend={"linear_cross_entropy": head})
        train, val = TokenShards(str(tmp_path / "shards")).split(0.1)
        cfg = TrainConfig(out_dir=str(tmp_path / name), steps=3, batch_size=2, warmup=1, lr=3e-3, eval_every=3,
                          eval_iters=1, progress=False, sample_tokens=0)
        Trainer(model, train, val, cfg).fit()
        runs.append([json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    fused, book = runs
    assert [r["step"] for r in fused] == [1, 2, 3]
    for a, b in zip(fused, book):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert fused[-1]["val_loss"] == pytest.approx(book[-1]["val_loss"], rel=1e-5)


# -------------------------------------------------------------------------------------------------
# GPU only
# -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("width", [768, 1600])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpt2_head_on_gpu(width, dtype):
    x, w, b, t = _inputs(1023, width, 50257, bias=False)
    x, w = x.cuda(), w.cuda()
    t = t.cuda()
    upstream = torch.tensor(1.0, device="cuda")
    ref, g64 = _run(_book, x, w, None, t, torch.float64, upstream)
    base, g_lp = _run(_book, x, w, None, t, dtype, upstream)
    loss, grads = _run(lambda *a, **k: ops.linear_cross_entropy(*a, **k, backend="triton"), x, w, None, t, dtype,
                       upstream)
    terms = _summed_terms(x.to(dtype), w.to(dtype), None, t, upstream)
    assert_close("loss", loss, ref, base, dtype, scale=terms["loss"])
    for name, g, r, lp in zip(("x", "weight"), grads, g64, g_lp):
        assert_close(f"d{name}", g, r, lp, dtype, scale=terms[name])


@pytest.mark.gpu
def test_torch_compile_keeps_the_op():
    x, w, b, t = (a.cuda() for a in _inputs(256, 64, 1000))
    fn = torch.compile(lambda *a: ops.linear_cross_entropy(*a[:3], bias=a[3], backend="triton"), fullgraph=True)
    torch.testing.assert_close(fn(x.float(), w.float(), t, b.float()), _book(x, w, t, bias=b).float(),
                               atol=1e-4, rtol=1e-4)


def test_instruct_finetuning_loss_is_the_books():
    # chapter 7's batches: padding and the masked tail are -100; a LoRA-wrapped model, tied head
    from gptfast.finetune import instruct_loss_batch
    from gptfast.lora import replace_linear_with_lora
    from gptfast.train import calc_loss_batch

    torch.manual_seed(0)
    model = GPTModel(dict(CFG, tie_weights=True))
    replace_linear_with_lora(model, rank=2, alpha=4, freeze_base=True)
    idx, targets = _batch(CFG)
    targets[1, 7:] = -100
    losses = []
    for fn in (calc_loss_batch, instruct_loss_batch):
        model.zero_grad()
        loss = fn(idx, targets, model, torch.device("cpu"))
        loss.backward()
        losses.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (book, g_book), (ours, g_ours) = losses
    torch.testing.assert_close(ours, book, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_ours, g_book):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_every_config_has_a_resource_spec():
    from gptfast.kernels import linear_cross_entropy as K

    for arch in K.SUPPORTED_ARCHS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            specs = K.resource_specs(arch, dtype)
            labels = [s["label"] for s in specs]
            assert len(labels) == 6  # forward, dx, dW; with and without K steps that divide the width
            assert sorted(s["constexprs"]["EVEN_K"] for s in specs) == [False] * 3 + [True] * 3
            for cfg in K.configs(arch, dtype):
                assert all(f"{cfg['BLOCK_M']}x{cfg['BLOCK_V']}x{cfg['BLOCK_K']}" in label for label in labels)


def test_kernel_is_deterministic():
    x, w, b, t = (a.float() if a.is_floating_point() else a for a in _inputs(70, 24, 200))
    runs = [_run(lambda *a, **k: ops.linear_cross_entropy(*a, **k, backend="triton"), x, w, b, t, torch.float32,
                 torch.tensor(1.0)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1]))
