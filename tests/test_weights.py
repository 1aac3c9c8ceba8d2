"""Pretrained weights in and out, checked against transformers' GPT2LMHeadModel on a small random GPT-2."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from tolerance import assert_agree, logit_terms

from gptfast import GPTModel, checkpoint, ops
from gptfast.weights import UnsafeCheckpointError, WeightsError, from_pretrained, load_weights_into_gpt

transformers = pytest.importorskip("transformers")

VOCAB, CTX = 300, 32


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=CTX,
                                  bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # transformers zero-initializes biases and sets LayerNorm to 1/0: make them count
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def hf_folder(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def ours(model, idx):
    with torch.no_grad():
        return model(idx)


# ours against transformers, both in fp32: within twice the rounding floor of the logits' summed terms,
# |x| |W_out|^T (tests/tolerance.py's assert_agree and logit_terms), which tied N(0, 1) embeddings make large


def test_hf_folder_logits_match_transformers(hf_model, hf_folder, tokens):
    model = GPTModel.from_pretrained(hf_folder)
    assert not model.training and model.cfg.qkv_bias and model.cfg.emb_dim == 64
    assert model.cfg.drop_rate == pytest.approx(0.1)  # GPT-2's resid_pdrop, left as configured
    assert_agree("logits", ours(model, tokens), hf_logits(hf_model, tokens), torch.float32,
                 scale=logit_terms(model, tokens))
    # tied: a separate out_head holding a copy of the embedding (the book's way)
    assert model.out_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    torch.testing.assert_close(model.out_head.weight, model.tok_emb.weight, atol=0, rtol=0)
    assert GPTModel.from_pretrained(hf_folder, drop_rate=0.0).cfg.drop_rate == 0.0
    tied = GPTModel.from_pretrained(hf_folder, tie_weights=True)
    assert tied.out_head.weight is tied.tok_emb.weight


def test_hub_style_keys_buffers_and_bin(hf_model, tmp_path, tokens):
    # The hub's gpt2 files: no "transformer." prefix, attn.bias/masked_bias buffers, no lm_head.
    from safetensors.torch import save_file

    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf_model.state_dict().items()
             if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, CTX, CTX))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(state, hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    expected = hf_logits(hf_model, tokens)
    from_hub = from_pretrained(hub)
    scale = logit_terms(from_hub, tokens)  # |x| |W_out|^T: the terms the logits sum
    assert_agree("logits", ours(from_hub, tokens), expected, torch.float32, scale=scale)
    # the same tensors as a pickled pytorch_model.bin, with the prefix
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(hf_model.state_dict(), binary / "pytorch_model.bin")
    (binary / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    assert_agree("logits", ours(from_pretrained(binary), tokens), expected, torch.float32, scale=scale)
    os.rename(binary / "pytorch_model.bin", binary / "weights.pth")  # a file named otherwise, beside config.json
    assert_agree("logits", ours(from_pretrained(binary / "weights.pth"), tokens), expected, torch.float32,
                 scale=scale)


def test_sharded_safetensors_and_dtype(hf_model, hf_folder, tmp_path, tokens):
    from safetensors.torch import load_file, save_file

    state = load_file(hf_folder / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    loaded = from_pretrained(tmp_path)
    assert_agree("logits", ours(loaded, tokens), hf_logits(hf_model, tokens), torch.float32,
                 scale=logit_terms(loaded, tokens))
    half = from_pretrained(hf_folder, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad for p in half.parameters())


def _have_all_kernels():
    missing = [op for op in ("attention", "layer_norm", "feed_forward") if ops.kernel_module(op)[0] is None]
    return missing


def test_triton_backend_matches_transformers(hf_model, hf_folder):
    missing = _have_all_kernels()
    if missing:
        pytest.skip(reason=f"no Triton kernel yet for {', '.join(missing)}: the triton-backend comparison needs all three")
    idx = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    model = GPTModel.from_pretrained(hf_folder, backend="triton")
    assert_agree("logits", ours(model, idx), hf_logits(hf_model, idx), torch.float32, scale=logit_terms(model, idx))


def test_save_pretrained_loads_in_transformers(hf_folder, tmp_path, tokens):
    model = GPTModel.from_pretrained(hf_folder)
    with torch.no_grad():  # make out_head differ from the embedding, so an untied lm_head must be written
        model.out_head.weight.mul_(1.5)
    model.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert_agree("logits", hf_logits(back, tokens), ours(model, tokens), torch.float32,
                 scale=logit_terms(model, tokens))
    again = GPTModel.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(ours(again, tokens), ours(model, tokens), atol=0, rtol=0)


def test_save_pretrained_without_qkv_bias_and_tied(tmp_path, tokens):
    torch.manual_seed(3)
    model = GPTModel(dict(vocab_size=VOCAB, context_length=CTX, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                          qkv_bias=False, tie_weights=True)).eval()
    model.save_pretrained(tmp_path)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert_agree("logits", hf_logits(back, tokens), ours(model, tokens), torch.float32,
                 scale=logit_terms(model, tokens))
    with pytest.raises(WeightsError, match="sinusoidal"):
        GPTModel(dict(vocab_size=VOCAB, context_length=CTX, emb_dim=32, n_heads=4, n_layers=1,
                      pos_emb="sinusoidal")).save_pretrained(tmp_path / "x")


def test_book_state_dict_round_trip(tmp_path, tokens):
    torch.manual_seed(123)
    cfg = dict(vocab_size=VOCAB, context_length=CTX, emb_dim=768, n_heads=12, n_layers=1, drop_rate=0.0, qkv_bias=True)
    book = GPTModel(cfg).eval()
    torch.save(book.state_dict(), tmp_path / "model.pth")  # the book's chapter-5 save
    loaded = from_pretrained(tmp_path / "model.pth", drop_rate=0.0)
    assert loaded.cfg.n_heads == 12 and loaded.cfg.qkv_bias and loaded.cfg.context_length == CTX
    torch.testing.assert_close(ours(loaded, tokens), ours(book, tokens), atol=0, rtol=0)
    # and back: our state dict loads strictly into the book's model (mask buffers included)
    fresh = GPTModel(cfg)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    # the book's model_and_optimizer.pth, and a folder holding model.pth
    torch.save({"model_state_dict": book.state_dict(), "optimizer_state_dict": {}}, tmp_path / "both.pth")
    torch.testing.assert_close(ours(from_pretrained(tmp_path / "both.pth"), tokens), ours(book, tokens))
    assert from_pretrained(tmp_path).cfg.emb_dim == 768
    # a width that is not one of GPT-2's: the number of heads must be given
    small = GPTModel(dict(cfg, emb_dim=48, n_heads=6)).eval()
    torch.save(small.state_dict(), tmp_path / "small.pth")
    with pytest.raises(WeightsError, match=r"emb_dim 48, which is not a GPT-2 size.*pass n_heads="):
        from_pretrained(tmp_path / "small.pth")
    torch.testing.assert_close(ours(from_pretrained(tmp_path / "small.pth", n_heads=6), tokens), ours(small, tokens))


def test_load_weights_into_gpt_from_the_books_params(hf_model, tokens):
    # The book's params dict (chapter 5's gpt_download): NumPy arrays, Conv1D weights as (in, out).
    sd = {k.removeprefix("transformer."): v.numpy() for k, v in hf_model.state_dict().items()}
    blocks = []
    for i in range(2):
        def lin(name):
            return {"w": sd[f"h.{i}.{name}.weight"], "b": sd[f"h.{i}.{name}.bias"]}

        blocks.append({"attn": {"c_attn": lin("attn.c_attn"), "c_proj": lin("attn.c_proj")},
                       "mlp": {"c_fc": lin("mlp.c_fc"), "c_proj": lin("mlp.c_proj")},
                       "ln_1": {"g": sd[f"h.{i}.ln_1.weight"], "b": sd[f"h.{i}.ln_1.bias"]},
                       "ln_2": {"g": sd[f"h.{i}.ln_2.weight"], "b": sd[f"h.{i}.ln_2.bias"]}})
    params = {"wte": sd["wte.weight"], "wpe": sd["wpe.weight"], "g": sd["ln_f.weight"], "b": sd["ln_f.bias"],
              "blocks": blocks}
    cfg = dict(vocab_size=VOCAB, context_length=CTX, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.1, qkv_bias=True)
    gpt = GPTModel(cfg)
    load_weights_into_gpt(gpt, params)
    gpt.eval()
    assert_agree("logits", ours(gpt, tokens), hf_logits(hf_model, tokens), torch.float32,
                 scale=logit_terms(gpt, tokens))
    with pytest.raises(WeightsError, match=r"trf_blocks\.0\.att\.W_query\.bias is missing"):
        load_weights_into_gpt(GPTModel(dict(cfg, qkv_bias=False)), params)
    with pytest.raises(WeightsError, match=r"tok_emb\.weight: the model has shape \(301, 64\)"):
        load_weights_into_gpt(GPTModel(dict(cfg, vocab_size=VOCAB + 1)), params)


def test_run_folder_loads_the_newest_step(tmp_path, tokens):
    cfg = dict(vocab_size=VOCAB, context_length=CTX, emb_dim=32, n_heads=4, n_layers=1, drop_rate=0.0)
    models = {}
    for step in (5, 10, 7):
        torch.manual_seed(step)
        models[step] = GPTModel(cfg).eval()
        checkpoint.save_model(models[step], str(tmp_path / f"step-{step}"))
    (tmp_path / "step-99").mkdir()  # an incomplete step folder is skipped
    loaded = GPTModel.from_pretrained(tmp_path)
    torch.testing.assert_close(ours(loaded, tokens), ours(models[10], tokens), atol=0, rtol=0)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_checkpoint_that_runs_code_is_refused(tmp_path, how):
    marker = str(tmp_path / "code-ran")
    payload = {"tok_emb.weight": torch.zeros(2, 2), "evil": _RunsCode(marker)}
    path = tmp_path / "model.pth"
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="refused.*never unpickles code"):
        from_pretrained(path)
    assert not os.path.exists(marker)


def test_mismatches_name_the_tensor(hf_model, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_model.config.to_dict()))

    def attempt(bad_state, match):
        save_file(bad_state, folder / "model.safetensors")
        with pytest.raises(WeightsError if "unexpected" in match else ValueError, match=match):
            from_pretrained(folder)

    attempt(dict(state, **{"transformer.h.1.mlp.c_fc.weight": torch.zeros(64, 100)}),
            r"trf_blocks\.1\.ff\.layers\.0\.weight has shape \(100, 64\) in the checkpoint but \(256, 64\)")
    attempt({k: v for k, v in state.items() if k != "transformer.ln_f.bias"}, r"missing tensors: final_norm\.shift")
    attempt(dict(state, **{"transformer.h.0.attn.rotary": torch.zeros(3)}), r"unexpected tensor transformer\.h\.0\.attn\.rotary")
    attempt(dict(state, **{"transformer.h.0.attn.c_attn.weight": torch.zeros(64, 100)}),
            r"transformer\.h\.0\.attn\.c_attn\.weight has shape \(64, 100\)")


def test_unsupported_hf_configs_are_refused(hf_model, hf_folder, tmp_path):
    import shutil

    shutil.copytree(hf_folder, tmp_path / "v")
    cfg = dict(hf_model.config.to_dict(), activation_function="relu", scale_attn_by_inverse_layer_idx=True)
    (tmp_path / "v" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="activation_function='relu'.*scale_attn_by_inverse_layer_idx"):
        from_pretrained(tmp_path / "v")


def test_names_paths_and_the_hub(monkeypatch, tmp_path):
    import builtins

    with pytest.raises(WeightsError, match="neither an existing file or folder nor a GPT-2 name"):
        from_pretrained("gpt3")
    with pytest.raises(WeightsError, match="not a model folder"):
        from_pretrained(tmp_path)
    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name.startswith("huggingface_hub"):
            raise ImportError("No module named 'huggingface_hub'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(WeightsError, match=r"needs the huggingface_hub package \(pip install huggingface_hub\)"):
        from_pretrained("gpt2-small (124M)")
    monkeypatch.setattr(builtins, "__import__", real_import)

    import huggingface_hub

    seen = {}

    def offline(repo, **kwargs):
        seen["repo"] = repo
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach huggingface.co")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(WeightsError, match=r"could not download 'gpt2-xl'.*cannot reach huggingface.co.*"
                       r"put config.json and model.safetensors from https://huggingface.co/openai-community/gpt2-xl"):
        GPTModel.from_pretrained("gpt2-xl")
    assert seen["repo"] == "openai-community/gpt2-xl"


def test_not_a_safetensors_file(tmp_path, hf_model):
    (tmp_path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match="not a safetensors file"):
        from_pretrained(tmp_path)


_MEASURE = textwrap.dedent("""
    import resource, sys, torch
    import gptfast.weights

    def peak_rss():  # bytes; VmHWM, whose high-water mark was reset below (ru_maxrss can carry the parent's)
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark to the current RSS
        measure = peak_rss
    except OSError:
        measure = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = measure()
    model = gptfast.weights.from_pretrained(sys.argv[1])
    total = sum(float(p.detach().double().sum()) for p in model.parameters())  # touch every byte
    print(measure() - base, total, model.trf_blocks[0].ff.layers[0].weight.shape[0])
""")


def test_a_1gb_checkpoint_loads_within_1_5x_its_size(tmp_path):
    from safetensors.torch import save_file

    e, layers, vocab, ctx = 1024, 22, 1000, 64  # 22 blocks x 12.6M floats + embeddings: just over 1 GiB
    state = {"wte.weight": torch.full((vocab, e), 0.5), "wpe.weight": torch.full((ctx, e), 0.25),
             "ln_f.weight": torch.ones(e), "ln_f.bias": torch.zeros(e)}
    for i in range(layers):
        for name, shape in (("attn.c_attn.weight", (e, 3 * e)), ("attn.c_attn.bias", (3 * e,)),
                            ("attn.c_proj.weight", (e, e)), ("attn.c_proj.bias", (e,)),
                            ("mlp.c_fc.weight", (e, 4 * e)), ("mlp.c_fc.bias", (4 * e,)),
                            ("mlp.c_proj.weight", (4 * e, e)), ("mlp.c_proj.bias", (e,)),
                            ("ln_1.weight", (e,)), ("ln_1.bias", (e,)), ("ln_2.weight", (e,)), ("ln_2.bias", (e,))):
            state[f"h.{i}.{name}"] = torch.ones(shape)
    save_file(state, tmp_path / "model.safetensors")
    expected_total = sum(float(t.sum()) for t in state.values()) + float(state["wte.weight"].sum())  # + out_head copy
    del state
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_embd": e, "n_layer": layers, "n_head": 16, "vocab_size": vocab, "n_positions": ctx}))
    size = os.path.getsize(tmp_path / "model.safetensors")
    assert size >= 2**30
    try:
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path)], capture_output=True, text=True,
                             timeout=300, check=True).stdout.split()
    finally:
        os.remove(tmp_path / "model.safetensors")
    peak, total, hidden = int(out[0]), float(out[1]), int(out[2])
    assert hidden == 4 * e and total == pytest.approx(expected_total)
    assert peak < 1.5 * size, f"peak RSS {peak / 2**30:.2f} GiB for a {size / 2**30:.2f} GiB checkpoint"
