"""Fine-tuning (chapters 6 and 7): the book's data handling, padding-aware classification, loss going
down on tiny data, clear errors for bad data, and the ``gptfast finetune`` command."""

import csv
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader

from gptfast import GPTModel, checkpoint
from gptfast.classify import (ClassificationDataset, DatasetError, SpamDataset, calc_accuracy_loader, calc_loss_loader,
                              classification_logits, classify_review, prepare_for_classification,
                              train_classifier_simple)
from gptfast.instruct import (InstructionDataset, custom_collate_fn, extract_response, format_input,
                              load_instruction_data)

TINY = dict(vocab_size=50257, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)
SPAM = ["WINNER!! Claim your free prize now, call 0800", "Free entry: win cash, text WIN to 80086 now",
        "URGENT! You have won a 1000 pound award, call now", "Congratulations, free ringtone, reply YES"]
HAM = ["Are we still on for lunch tomorrow?", "I'll be home late, don't wait up",
       "Can you send me the notes from class", "Thanks for the birthday wishes, see you soon"]


@pytest.fixture(scope="module")
def tok():
    tiktoken = pytest.importorskip("tiktoken")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        pytest.skip(reason=f"tiktoken's gpt2 ranks are not available offline: {e}")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPTModel(TINY)


def write_csv(path, rows, header=("Label", "Text")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def spam_csv(tmp_path):
    return write_csv(tmp_path / "train.csv", [(1, t) for t in SPAM] + [(0, t) for t in HAM])


# ---- classification (chapter 6) ------------------------------------------------------------------


def test_dataset_pads_like_the_book(spam_csv, tok):
    ds = SpamDataset(spam_csv, tok)
    encoded = [tok.encode(t) for t in SPAM + HAM]
    longest = max(map(len, encoded))
    assert ds.max_length == longest and len(ds) == 8
    x, y = ds[4]
    assert x.tolist() == encoded[4] + [50256] * (longest - len(encoded[4])) and y.item() == 0
    assert SpamDataset(spam_csv, tok, max_length=5)[0][0].tolist() == encoded[0][:5]


def test_any_csv_columns_and_text_labels(tmp_path, tok):
    path = write_csv(tmp_path / "d.csv", [("spam", SPAM[0]), ("ham", HAM[0]), ("ham", HAM[1])],
                     header=("category", "message"))
    ds = ClassificationDataset(path, tok, text_column="message", label_column="CATEGORY")
    assert ds.labels == ["ham", "spam"] and [int(ds[i][1]) for i in range(3)] == [1, 0, 0]
    val = ClassificationDataset(path, tok, text_column="message", label_column="category", labels=["spam", "ham"])
    assert [int(val[i][1]) for i in range(3)] == [0, 1, 1]


def test_bad_classification_data_is_named(tmp_path, tok):
    with pytest.raises(DatasetError, match=r"no text column 'Text'; its columns are \['label', 'body'\]"):
        ClassificationDataset(write_csv(tmp_path / "a.csv", [(0, "hi")], header=("label", "body")), tok)
    with pytest.raises(DatasetError, match="has no rows"):
        ClassificationDataset(write_csv(tmp_path / "b.csv", []), tok)
    with pytest.raises(DatasetError, match=r"row 2 has label '3', out of range for 2 classes"):
        ClassificationDataset(write_csv(tmp_path / "c.csv", [(0, "a"), (3, "b")]), tok, num_classes=2)
    with pytest.raises(DatasetError, match=r"row 1 has label '-1', out of range"):
        ClassificationDataset(write_csv(tmp_path / "d.csv", [(-1, "a")]), tok)
    with pytest.raises(DatasetError, match="row 2 has an empty text"):
        ClassificationDataset(write_csv(tmp_path / "e.csv", [(0, "a"), (1, " ")]), tok)
    with pytest.raises(DatasetError, match="does not exist"):
        ClassificationDataset(tmp_path / "missing.csv", tok)


def test_integer_labels_are_class_ids_without_gaps(tmp_path, tok):
    path = write_csv(tmp_path / "gap.csv", [(0, "a"), (1, "b"), (5, "c")])
    with pytest.raises(DatasetError, match=r"the labels found are 0, 1, 5, .*\(0\.\.2 for 3 classes\)"):
        ClassificationDataset(path, tok)
    assert ClassificationDataset(path, tok, num_classes=6).num_classes == 6  # said outright: some are absent
    assert ClassificationDataset(write_csv(tmp_path / "ok.csv", [(2, "a"), (0, "b"), (1, "c")]), tok).num_classes == 3


def test_prepare_for_classification_trains_the_books_parts():
    model = prepare_for_classification(tiny_model(), num_classes=3)
    assert model.out_head.weight.shape == (3, 32) and model.out_head.bias is not None
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("trf") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"trf_blocks.1", "final_norm", "out_head"}
    two = prepare_for_classification(tiny_model(), 2, trainable_blocks=2, train_final_norm=False)
    assert not two.final_norm.scale.requires_grad and two.trf_blocks[0].att.W_query.weight.requires_grad
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        prepare_for_classification(tiny_model(), 1)


def test_classification_reads_the_last_real_token(tok):
    model = prepare_for_classification(tiny_model(), 2).eval()
    short, long = tok.encode(HAM[0]), tok.encode(SPAM[0])
    batch = torch.tensor([short + [50256] * (len(long) - len(short)), long])
    with torch.no_grad():
        got = classification_logits(model, batch, pool="last_token")
        alone = model(torch.tensor([short]))[:, -1]  # the short text by itself, no padding
        book = classification_logits(model, batch)  # the book's default: the last position
        assert torch.equal(classification_logits(model, batch, pad_token_id=None, pool="last_token"), book)
    torch.testing.assert_close(got[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(book, model(batch)[:, -1].detach())
    assert not torch.allclose(book[0], got[0])


def test_classifier_training_lowers_the_loss_and_accuracy_counts(spam_csv, tok, capsys):
    torch.manual_seed(123)
    ds = SpamDataset(spam_csv, tok)
    model = prepare_for_classification(tiny_model(), 2)
    loader = DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    eval_loader = DataLoader(ds, batch_size=4)
    model.eval()
    with torch.no_grad():
        before = calc_loss_loader(eval_loader, model, "cpu")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.1)
    train_losses, val_losses, train_accs, val_accs, seen = train_classifier_simple(
        model, loader, eval_loader, opt, "cpu", num_epochs=4, eval_freq=2, eval_iter=2)
    with torch.no_grad():
        after = calc_loss_loader(eval_loader, model, "cpu")
    assert after < before and seen == 32 and len(train_accs) == 4 and len(train_losses) == 4
    assert "Training accuracy:" in capsys.readouterr().out
    # accuracy, recomputed directly
    with torch.no_grad():
        preds = torch.cat([classification_logits(model, x).argmax(-1) for x, _ in eval_loader])
    labels = torch.tensor([1] * 4 + [0] * 4)
    assert calc_accuracy_loader(eval_loader, model, "cpu") == pytest.approx((preds == labels).float().mean().item())
    assert classify_review(SPAM[0], model, tok, "cpu", max_length=ds.max_length) == ("spam" if preds[0] else "not spam")
    assert classify_review(SPAM[0], model, tok, "cpu", max_length=ds.max_length, labels=None) == int(preds[0])
    with torch.no_grad():  # unpadded, or padded and read at the last real token: the same logits
        real = classification_logits(model, torch.tensor([tok.encode(SPAM[0])]))
        padded = torch.tensor([tok.encode(SPAM[0]) + [50256] * 5])
    assert classify_review(SPAM[0], model, tok, "cpu", labels=None) == int(real.argmax())
    assert classify_review(SPAM[0], model, tok, "cpu", max_length=padded.shape[1], labels=None,
                           pool="last_token") == int(real.argmax())
    assert classify_review(SPAM[0], model, tok, "cpu", max_length=padded.shape[1], pad_token_id=None,
                           labels=None) == int(real.argmax())


# ---- instruction tuning (chapter 7) --------------------------------------------------------------


def test_format_input_is_the_books():
    entry = {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
             "output": "The correct spelling is 'Occasion.'"}
    assert format_input(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIdentify the correct spelling of the following word.\n\n### Input:\nOcassion")
    assert format_input(dict(entry, input="")) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIdentify the correct spelling of the following word.")


def test_custom_collate_fn_matches_the_books_example():
    batch = ([0, 1, 2, 3, 4], [5, 6], [7, 8, 9])
    inputs, targets = custom_collate_fn(batch)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    inputs, targets = custom_collate_fn(batch, allowed_max_length=2)
    assert inputs.tolist() == [[0, 1], [5, 6], [7, 8]] and targets.tolist() == [[1, 2], [6, 50256], [8, 9]]


def test_the_books_instruction_data(shared_data, tok):
    data = load_instruction_data(shared_data / "instruction-data.json")
    assert len(data) == 1100
    ds = InstructionDataset(data[:60], tok)
    expected = format_input(data[50]) + f"\n\n### Response:\n{data[50]['output']}"
    assert tok.decode(ds[50]) == expected


def test_bad_instruction_data_is_named(tmp_path):
    def attempt(obj, match):
        (tmp_path / "d.json").write_text(json.dumps(obj))
        with pytest.raises(DatasetError, match=match):
            load_instruction_data(tmp_path / "d.json")

    attempt([], "has no entries")
    attempt({"instruction": "x"}, "must be a JSON list")
    attempt([{"instruction": "a", "output": "b"}, {"instruction": "c"}], r"entry 1 lacks 'output'")
    attempt([{"instruction": "a", "output": 3}], r"entry 0 has a non-text 'output'")
    (tmp_path / "d.json").write_text("[{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_instruction_data(tmp_path / "d.json")


def test_instruction_training_lowers_the_loss(tok):
    from gptfast.train import calc_loss_batch, calc_loss_loader as lm_loss_loader

    data = [{"instruction": "Say hello.", "input": "", "output": "Hello!"},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Name a color.", "input": "", "output": "Blue."}]
    loader = DataLoader(InstructionDataset(data, tok), batch_size=3, collate_fn=custom_collate_fn)
    model = tiny_model()
    model.eval()
    with torch.no_grad():
        before = lm_loss_loader(loader, model, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model.train()
    for _ in range(5):
        for x, y in loader:
            opt.zero_grad()
            calc_loss_batch(x, y, model, "cpu").backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        assert lm_loss_loader(loader, model, "cpu") < before


def test_extract_response():
    prompt = format_input({"instruction": "Say hi.", "input": ""})
    assert extract_response(prompt + "\n\n### Response:\nHi there. ", prompt) == "Hi there."


# ---- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    checkpoint.save_model(tiny_model(), str(folder))
    return folder


def test_cli_classify_with_lora(base_folder, spam_csv, tmp_path, tok, capsys):
    from gptfast.cli import main

    out = tmp_path / "run"
    code = main(["finetune", "classify", "--base", str(base_folder), "--data", str(spam_csv), "--out", str(out),
                 "--epochs", "2", "--batch-size", "4", "--eval-every", "1", "--lora-rank", "2", "--lr", "5e-3",
                 "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p for p in os.listdir(out) if not p.startswith(".")) == ["metrics.jsonl", "settings.json", "step-4",
                                                                          "summary.json"]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals, tests = [r for r in records if r.get("split") != "test"], [r for r in records if r.get("split") == "test"]
    assert [r["step"] for r in evals] == [1, 2, 3, 4] and all("val_accuracy" in r for r in evals)
    assert [r["step"] for r in tests] == [4] and 0.0 <= tests[0]["test_accuracy"] <= 1.0
    assert os.path.isfile(out / "step-4" / "lora" / "adapters.safetensors")
    model = GPTModel.from_pretrained(out)  # the newest step, with its 2-class head
    assert model.out_head.weight.shape == (2, 32)
    assert classify_review(SPAM[1], model, tok, "cpu") in ("spam", "not spam")
    config = json.load(open(out / "step-4" / "config.json"))
    assert config["task"] == "classify" and config["num_classes"] == 2
    # a second run into the same folder is refused: it would mix with (and prune) the first run's steps
    capsys.readouterr()
    assert main(["finetune", "classify", "--base", str(base_folder), "--data", str(spam_csv), "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 2
    assert "already holds a run's checkpoints" in capsys.readouterr().err
    assert os.path.isdir(out / "step-4")


def test_cli_instruct(base_folder, tmp_path, capsys):
    from gptfast.cli import main

    data = [{"instruction": f"Repeat {w}.", "input": "", "output": w} for w in ("red", "green", "blue", "pink")]
    (tmp_path / "d.json").write_text(json.dumps(data))
    out = tmp_path / "run"
    code = main(["finetune", "instruct", "--base", str(base_folder), "--data", str(tmp_path / "d.json"),
                 "--out", str(out), "--epochs", "1", "--batch-size", "2", "--samples", "1", "--max-new-tokens", "3",
                 "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    responses = json.load(open(out / "responses.json"))
    assert len(responses) == 1 and "model_response" in responses[0]
    assert GPTModel.from_pretrained(out).cfg.vocab_size == 50257


def test_cli_reports_bad_data(base_folder, tmp_path, capsys):
    from gptfast.cli import main

    bad = write_csv(tmp_path / "bad.csv", [(0, "a")], header=("y", "x"))
    code = main(["finetune", "classify", "--base", str(base_folder), "--data", str(bad), "--out", str(tmp_path / "o"),
                 "--no-progress", "--device", "cpu"])
    assert code == 2
    assert "no text column 'Text'" in capsys.readouterr().err
    (tmp_path / "ok.json").write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 2))
    code = main(["finetune", "instruct", "--base", str(tmp_path / "nowhere"), "--data", str(tmp_path / "ok.json"),
                 "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"])
    assert code == 2 and "neither an existing file or folder" in capsys.readouterr().err


def test_fit_stops_on_a_non_finite_loss_before_the_weights_change(tmp_path):
    from gptfast.finetune import FinetuneConfig, fit

    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.zeros(2, 4, dtype=torch.long)
    loader = [(x, x)]

    def nan_loss(inputs, targets, model, device):
        return model(inputs).sum() * float("nan")  # has gradients, so backward runs first

    cfg = FinetuneConfig(out_dir=str(tmp_path / "out"), progress=False)
    with pytest.raises(FloatingPointError, match="lower --lr"):
        fit(model, loader, loader, nan_loss, cfg, {})
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_classification_split_holds_out_validation_and_test_rows():
    from gptfast.finetune import _split

    train, val, test = _split(10, 0.1, 123, test_fraction=0.2)  # the book's 70/10/20
    assert (len(train), len(val), len(test)) == (7, 1, 2) and sorted(train + val + test) == list(range(10))
    assert _split(10, 0.1, 123, test_fraction=0.2) == (train, val, test)  # the seed decides
    assert _split(10, 0.1, 123)[2] == [] and len(_split(10, 0.1, 123)[0]) == 9  # no test split asked for
    train, val, test = _split(10, 0.0, 123, test_fraction=0.2)  # validation from its own file
    assert (len(train), val, len(test)) == (8, [], 2)
    assert _split(2, 0.1, 0, test_fraction=0.2)[2] == []  # too few rows to spare one for testing
    assert _split(1, 0.1, 0) == ([0], [0], [])  # one row: trained on and validated with
    with pytest.raises(ValueError, match="test_fraction"):
        _split(10, 0.5, 0, test_fraction=0.5)
