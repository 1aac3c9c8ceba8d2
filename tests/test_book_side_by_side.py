"""gptfast.book against the book's own code (``llms_from_scratch``), chapter by chapter, with the same
seeds: bitwise equal where the math is the same, within fp32 noise where gptfast runs an op its own way."""

from __future__ import annotations

import importlib
import io
import json
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("llms_from_scratch", reason="the book's package is not installed: "
                    "pip install --no-deps llms-from-scratch==1.0.19 (and pandas, psutil)")

import gptfast  # noqa: E402
from gptfast.book import appendix_a, appendix_d, appendix_e, ch02, ch03, ch04, ch05, ch06, ch07  # noqa: E402
from gptfast.book.kv_cache import generate as kv_generate, gpt2 as kv_gpt2  # noqa: E402


def B(name):
    return importlib.import_module(f"llms_from_scratch.{name}")


CFG = dict(vocab_size=50257, context_length=32, emb_dim=24, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=False)


def made(cls, *args, seed=123, **kwargs):
    torch.manual_seed(seed)
    return cls(*args, **kwargs)


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_every_book_name_is_exported_with_the_books_signature():
    import inspect

    for name in ["ch02", "ch03", "ch04", "ch05", "ch06", "ch07", "appendix_a", "appendix_d", "appendix_e",
                 "kv_cache.gpt2", "kv_cache.generate"]:
        theirs, ours = B(name), importlib.import_module(f"gptfast.book.{name}")
        public = [n for n, v in vars(theirs).items() if not n.startswith("_") and callable(v)
                  and getattr(v, "__module__", "").startswith("llms_from_scratch")]
        for n in public:
            assert hasattr(ours, n), f"gptfast.book.{name} lacks {n}"
            if inspect.isfunction(getattr(theirs, n)):
                book_params = list(inspect.signature(getattr(theirs, n)).parameters.values())
                our_params = [p for p in inspect.signature(getattr(ours, n)).parameters.values()
                              if p.kind is not p.KEYWORD_ONLY]
                assert [p.name for p in our_params[:len(book_params)]] == [p.name for p in book_params], n
                for bp, op in zip(book_params, our_params):  # the book's defaults (or a default where it has none)
                    if bp.default is not bp.empty:
                        assert op.default == bp.default, (name, n, bp.name)


def test_ch02_batches(shared_data):
    text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
    torch.manual_seed(123)
    theirs = list(B("ch02").create_dataloader_v1(text, batch_size=8, max_length=4, stride=4))
    torch.manual_seed(123)
    ours = list(ch02.create_dataloader_v1(text, batch_size=8, max_length=4, stride=4))
    assert len(ours) == len(theirs)
    for (x, y), (bx, by) in zip(ours, theirs):
        assert torch.equal(x, bx) and torch.equal(y, by)


@pytest.mark.parametrize("name,args", [
    ("SelfAttention_v1", (6, 5)), ("SelfAttention_v2", (6, 5)), ("CausalAttention", (6, 5, 8, 0.0)),
    ("MultiHeadAttentionWrapper", (6, 5, 8, 0.0, 2)), ("PyTorchMultiHeadAttention", (6, 8, 2)),
])
def test_ch03_teaching_classes_are_bitwise_the_books(name, args):
    ours, theirs = made(getattr(ch03, name), *args), made(getattr(B("ch03"), name), *args)
    same_state(ours, theirs)
    x = torch.rand(7, 6) if name.startswith("SelfAttention") else torch.rand(3, 7, 6)
    assert torch.equal(ours(x), theirs(x))


def test_ch03_multi_head_attention():
    ours = made(ch03.MultiHeadAttention, 6, 8, 16, 0.0, 2)
    theirs = made(B("ch03").MultiHeadAttention, 6, 8, 16, 0.0, 2)
    same_state(ours, theirs)
    x = torch.rand(3, 7, 6)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-5)


def test_ch04_models():
    ours, theirs = made(ch04.GPTModel, CFG).eval(), made(B("ch04").GPTModel, CFG).eval()
    same_state(ours, theirs)
    idx = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx), atol=1e-5, rtol=1e-5)
    assert torch.equal(ch04.generate_text_simple(ours, idx, 6, 32), B("ch04").generate_text_simple(theirs, idx, 6, 32))
    fast, book_fast = made(ch04.GPTModelFast, CFG).eval(), made(B("ch04").GPTModelFast, CFG).eval()
    same_state(fast, book_fast)
    with torch.no_grad():
        assert torch.equal(fast(idx), book_fast(idx))


@pytest.mark.parametrize("temperature,top_k,eos_id", [(0.0, None, None), (1.0, None, None), (1.4, 25, None),
                                                      (0.7, 5, 3)])
def test_ch05_generate_matches_the_books_loop_under_sampling(temperature, top_k, eos_id):
    """gptfast's generate keeps its KV cache on by default: its tokens must be the book's, bit for bit."""
    cfg = dict(CFG, vocab_size=64)
    model = made(gptfast.GPTModel, cfg).eval()
    for seed in range(4):
        idx = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        theirs = B("ch05").generate(model, idx, 36, 32, temperature, top_k, eos_id)  # runs past the context
        torch.manual_seed(seed)
        ours = ch05.generate(model, idx, 36, 32, temperature, top_k, eos_id)
        assert torch.equal(ours, theirs), seed


def test_ch05_losses_assign_and_plot(tmp_path, monkeypatch, shared_data):
    import matplotlib

    matplotlib.use("Agg")
    model = made(gptfast.GPTModel, CFG).eval()
    text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")[:4000]
    loader = ch02.create_dataloader_v1(text, batch_size=2, max_length=16, stride=16, shuffle=False)
    with torch.no_grad():
        assert ch05.calc_loss_loader(loader, model, "cpu", 3) == B("ch05").calc_loss_loader(loader, model, "cpu", 3)
    w = torch.zeros(2, 3)
    assert torch.equal(ch05.assign(w, torch.ones(2, 3)), B("ch05").assign(w, torch.ones(2, 3)))
    with pytest.raises(ValueError, match="Shape mismatch"):
        ch05.assign(w, torch.ones(3, 2))
    monkeypatch.chdir(tmp_path)
    ch05.plot_losses([0, 1], [10, 20], [3.0, 2.0], [3.5, 2.5])
    assert (tmp_path / "loss-plot.pdf").stat().st_size > 0


def test_ch05_tensorflow_is_imported_only_when_called():
    import sys

    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is not None:
        pytest.skip(reason="TensorFlow is installed here; the missing-TensorFlow message cannot be shown")
    with pytest.raises(ImportError, match="pip install tensorflow"):
        ch05.load_gpt2_params_from_tf_ckpt("model.ckpt", {"n_layer": 1})


def _spam_frame():
    import pandas as pd

    rows = [("ham" if i % 3 else "spam", f"message number {i} " + "word " * (i % 7)) for i in range(30)]
    return pd.DataFrame(rows, columns=["Label", "Text"])


def test_ch06_data_preparation_and_dataset(tmp_path):
    df = _spam_frame()
    ours, theirs = ch06.create_balanced_dataset(df), B("ch06").create_balanced_dataset(df)
    assert ours.equals(theirs)
    ours["Label"] = ours["Label"].map({"ham": 0, "spam": 1})
    for a, b in zip(ch06.random_split(ours, 0.7, 0.1), B("ch06").random_split(ours, 0.7, 0.1)):
        assert a.equals(b)
    ours.to_csv(tmp_path / "train.csv", index=None)
    tok = gptfast.Tokenizer.gpt2()
    a, b = ch06.SpamDataset(tmp_path / "train.csv", tok), B("ch06").SpamDataset(tmp_path / "train.csv", tok)
    assert a.max_length == b.max_length and len(a) == len(b)
    for i in range(len(a)):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])


def test_ch06_classification_on_the_books_own_model():
    theirs = made(B("ch04").GPTModel, CFG)
    theirs.out_head = torch.nn.Linear(CFG["emb_dim"], 2)
    tok = gptfast.Tokenizer.gpt2()
    rows = [tok.encode("win a prize now"), tok.encode("see you at home later")]
    x = torch.tensor([r + [50256] * (8 - len(r)) for r in rows])
    y = torch.tensor([1, 0])
    with torch.no_grad():
        assert ch06.calc_loss_batch(x, y, theirs, "cpu") == B("ch06").calc_loss_batch(x, y, theirs, "cpu")
    for text in ("win a prize now", "see you at home later tonight, ok?"):
        expected = B("ch06").classify_review(text, theirs, tok, "cpu", max_length=12)
        assert ch06.classify_review(text, theirs, tok, "cpu", max_length=12) == expected
        assert gptfast.classify_review(text, theirs, tok, "cpu", pad_token_id=None) in ("spam", "not spam")
        assert gptfast.classify_review(text, theirs, tok, "cpu", 12, pool="last_token") in ("spam", "not spam")


def test_ch06_plot_values(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    ch06.plot_values([0, 1], [8, 16], [0.9, 0.5], [0.8, 0.6], label="accuracy")
    assert (tmp_path / "accuracy-plot.pdf").stat().st_size > 0


def test_ch07_collate_and_dataset(shared_data):
    data = json.loads((shared_data / "instruction-data.json").read_text(encoding="utf-8"))[:6]
    tok = gptfast.Tokenizer.gpt2()
    for entry in data:
        assert ch07.format_input(entry) == B("ch07").format_input(entry)
    a, b = ch07.InstructionDataset(data, tok), B("ch07").InstructionDataset(data, tok)
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    batch = [a[i] for i in range(4)]
    assert torch.equal(ch07.custom_collate_draft_1(batch), B("ch07").custom_collate_draft_1(batch))
    for fn, kw in (("custom_collate_draft_2", {}), ("custom_collate_fn", {"allowed_max_length": 20})):
        for x, y in zip(getattr(ch07, fn)(batch, **kw), getattr(B("ch07"), fn)(batch, **kw)):
            assert torch.equal(x, y)


def test_ch07_ollama_is_local_only_and_says_when_none_runs(monkeypatch):
    with pytest.raises(ValueError, match="only to a model server on this machine"):
        ch07.query_model("hi", url="http://example.com:11434/api/chat")

    def refused(*args, **kwargs):
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(urllib.request, "urlopen", refused)
    with pytest.raises(RuntimeError, match=r"no Ollama server answers at http://localhost:11434/api/chat .*ollama serve"):
        ch07.query_model("hi")
    assert isinstance(ch07.check_if_running("surely-no-such-process-name"), bool)


def test_ch07_query_model_reads_ollamas_stream(monkeypatch):
    seen = {}

    def urlopen(request, *args, **kwargs):
        seen["body"] = json.loads(request.data)
        lines = [json.dumps({"message": {"content": part}}).encode() + b"\n" for part in ("8", "5")]
        return io.BytesIO(b"".join(lines))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert ch07.query_model("score it") == "85"
    assert seen["body"]["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    entry = {"instruction": "Say hi", "input": "", "output": "hi", "model_response": "hi"}
    assert ch07.generate_model_scores([entry], "model_response") == [85]


def test_downloads_take_local_files_and_fail_offline_in_one_line(tmp_path, monkeypatch, shared_data):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    target = tmp_path / "instruction-data.json"
    with pytest.raises(RuntimeError) as err:
        ch07.download_and_load_file(target, ch07.INSTRUCTION_DATA_URL)
    message = str(err.value)
    assert "\n" not in message and f"place the file at {target}" in message
    assert ch07.download_and_load_file(target, shared_data) == json.loads(
        (shared_data / "instruction-data.json").read_text(encoding="utf-8"))  # a folder holding the file
    with pytest.raises(RuntimeError, match="SMSSpamCollection|sms_spam_collection.zip"):
        ch06.download_and_unzip_spam_data(ch06.SPAM_URL, tmp_path / "sms_spam_collection.zip",
                                          tmp_path / "x", tmp_path / "x" / "SMSSpamCollection.tsv")


def test_appendix_a():
    same_state(made(appendix_a.NeuralNetwork, 2, 2), made(B("appendix_a").NeuralNetwork, 2, 2))
    X, y = torch.rand(5, 2), torch.tensor([0, 0, 1, 1, 1])
    a, b = appendix_a.ToyDataset(X, y), B("appendix_a").ToyDataset(X, y)
    assert len(a) == len(b) and all(torch.equal(a[i][0], b[i][0]) for i in range(5))


@pytest.mark.parametrize("orig_book_version", [False, True])
def test_appendix_d_train_model(orig_book_version, shared_data, capsys):
    text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")[:3000]
    tok = gptfast.Tokenizer.gpt2()
    runs = []
    for impl in (appendix_d, B("appendix_d")):
        torch.manual_seed(0)
        loader = ch02.create_dataloader_v1(text, batch_size=2, max_length=16, stride=16)
        model = made(ch04.GPTModel, CFG)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        out = impl.train_model(model, loader, loader, opt, "cpu", 2, 3, 2, "Every effort", tok, 2, 1e-5, 1e-5,
                               orig_book_version)
        runs.append((out, appendix_d.find_highest_gradient(model), B("appendix_d").find_highest_gradient(model)))
    (ours, g1, g2), (theirs, _, _) = runs
    assert torch.equal(g1, g2)
    assert ours[3] == theirs[3] and ours[2] == theirs[2]  # learning rates, tokens seen
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5) and ours[1] == pytest.approx(theirs[1], rel=1e-5)


def test_appendix_e_does_not_freeze_and_adds_the_books_parameters():
    ours, theirs = made(B("ch04").GPTModel, CFG), made(B("ch04").GPTModel, CFG)
    torch.manual_seed(1)
    appendix_e.replace_linear_with_lora(ours, rank=4, alpha=8)
    torch.manual_seed(1)
    B("appendix_e").replace_linear_with_lora(theirs, rank=4, alpha=8)
    same_state(ours, theirs)
    assert all(p.requires_grad for p in ours.parameters())
    idx = torch.randint(0, 50257, (1, 5))
    with torch.no_grad():
        assert torch.equal(ours(idx), theirs(idx))


def test_kv_cache_model_and_loop():
    ours, theirs = made(kv_gpt2.GPTModel, CFG).eval(), made(B("kv_cache.gpt2").GPTModel, CFG).eval()
    ps, bs = dict(ours.named_parameters()), dict(theirs.named_parameters())  # the book keeps its mask out
    assert list(ps) == list(bs) and all(torch.equal(ps[k], bs[k]) for k in ps)
    idx = torch.randint(0, 50257, (1, 6))
    a = kv_generate.generate_text_simple(ours, idx, 12)
    # the book's model (1.0.19) has no reset_kv_cache, so its loop runs it uncached
    assert torch.equal(a, B("kv_cache.generate").generate_text_simple(theirs, idx, 12, 32, use_cache=False))
    assert torch.equal(a, kv_generate.generate_text_simple(ours, idx, 12, use_cache=False))
    cache = kv_gpt2.KVCache(n_layers=CFG["n_layers"])  # the book's calling convention
    with torch.no_grad():
        full = ours(idx)
        step = torch.cat([ours(idx[:, :4], cache=cache), ours(idx[:, 4:5], cache=cache),
                          ours(idx[:, 5:], cache=cache)], dim=1)
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_config_with_extra_keys_warns_once_and_is_ignored():
    with pytest.warns(UserWarning, match=r"\['learning_rate'\]") as record:
        model = gptfast.GPTModel(dict(CFG, learning_rate=5e-4))
    assert len(record) == 1 and model.cfg["emb_dim"] == CFG["emb_dim"]
