"""LoRA (appendix E): a fresh adapter changes nothing, merging changes nothing, only adapters train."""

import math

import pytest
import torch
import torch.nn as nn
from tolerance import assert_agree, logit_terms

import gptfast
from gptfast import GPTModel, LinearWithLoRA, LoRALayer, merge_lora, replace_linear_with_lora
from gptfast.lora import load_lora, save_lora

CFG = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPTModel(CFG).eval()


def tokens(seed=1):
    return torch.randint(0, CFG["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(seed))


def perturb_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_names_are_exported_and_the_books():
    assert gptfast.LoRALayer is LoRALayer and gptfast.replace_linear_with_lora is replace_linear_with_lora
    torch.manual_seed(123)
    layer = LoRALayer(6, 5, rank=3, alpha=2)
    assert layer.A.shape == (6, 3) and layer.B.shape == (3, 5) and not layer.B.any()
    # the book's init, recomputed: A ~ kaiming_uniform(a=sqrt(5)) drawn right after the seed
    torch.manual_seed(123)
    expected = torch.empty(6, 3)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5))
    torch.testing.assert_close(layer.A.detach(), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="LoRA rank must be a positive integer, got 0"):
        LoRALayer(4, 4, rank=0, alpha=1)


def test_fresh_lora_leaves_outputs_unchanged():
    model, idx = tiny(), tokens()
    with torch.no_grad():
        before = model(idx)
        replace_linear_with_lora(model, rank=4, alpha=8)
        after = model(idx)
    wrapped = [m for m in model.modules() if isinstance(m, LinearWithLoRA)]
    assert len(wrapped) == 2 * 6 + 1  # q, k, v, out_proj, two feed-forward layers per block, and out_head
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_forward_and_effective_weight_agree():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(12, 7), rank=3, alpha=1.5)
    perturb_adapters(layer)
    x = torch.randn(4, 5, 12)
    w, b = layer.effective_weight_and_bias()
    assert w.shape == (7, 12)
    expected = x @ layer.linear.weight.T + layer.linear.bias + 1.5 * (x @ layer.lora.A @ layer.lora.B)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(nn.functional.linear(x, w, b), expected, atol=1e-6, rtol=1e-6)


def test_replace_freezes_nothing_unless_asked():
    model = tiny()
    replace_linear_with_lora(model, rank=4, alpha=8)  # the book's function: freezing is the caller's job
    assert all(p.requires_grad for p in model.parameters())
    model = tiny()
    gptfast.lora.freeze_parameters(model)  # the book's loop, then the book's call
    replace_linear_with_lora(model, rank=4, alpha=8)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if n.endswith(("lora.A", "lora.B"))}


def test_merged_equals_unmerged():
    model, idx = tiny(), tokens()
    replace_linear_with_lora(model, rank=4, alpha=8)
    perturb_adapters(model)
    with torch.no_grad():
        unmerged = model(idx)
    merge_lora(model)
    assert not any(isinstance(m, LinearWithLoRA) for m in model.modules())
    assert type(model.trf_blocks[0].att.W_query) is nn.Linear
    with torch.no_grad():
        merged = model(idx)
    # both fp32: within twice the rounding floor of the logits' summed terms |x| |W_out|^T
    assert_agree("logits", merged, unmerged, torch.float32, scale=logit_terms(model, idx))
    assert set(model.state_dict()) == set(tiny().state_dict())  # the book's keys again


def test_only_lora_parameters_train():
    model, idx = tiny(), tokens()
    model.train()
    replace_linear_with_lora(model, rank=4, alpha=8, freeze_base=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora.A", "lora.B")) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(4):  # B moves first; A gets a gradient once B is not zero
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # LoRA fine-tuning alone lowers the loss
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in trainable), n
    # the feed-forward runs on effective_weight_and_bias(): its adapters got gradients through that path
    assert model.trf_blocks[0].ff.layers[0].lora.A.grad.abs().sum() > 0


def test_save_and_load_only_the_adapters(tmp_path):
    from safetensors.torch import load_file

    model, idx = tiny(), tokens()
    replace_linear_with_lora(model, rank=4, alpha=8, freeze_base=True)
    perturb_adapters(model)
    with torch.no_grad():
        expected = model(idx)
    save_lora(model, tmp_path)
    saved = load_file(tmp_path / "adapters.safetensors")
    assert saved and all(k.endswith(("lora.A", "lora.B")) for k in saved)
    fresh = load_lora(tiny(), tmp_path)  # the same base weights, adapters added from the folder
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), expected, atol=0, rtol=0)
    other = GPTModel(dict(CFG, emb_dim=16)).eval()
    with pytest.raises(ValueError, match=r"trf_blocks\.0\.att\.W_query\.lora\.A has shape \(32, 4\)"):
        load_lora(other, tmp_path)
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_lora(tiny(), tmp_path / "none")


def test_save_pretrained_folds_the_adapters_in(tmp_path):
    model, idx = tiny(), tokens()
    replace_linear_with_lora(model, rank=4, alpha=8)
    perturb_adapters(model)
    model.save_pretrained(tmp_path)
    loaded = GPTModel.from_pretrained(tmp_path, drop_rate=0.0)
    with torch.no_grad():
        assert_agree("logits", loaded(idx), model(idx), torch.float32, scale=logit_terms(loaded, idx))  # merged: as above
