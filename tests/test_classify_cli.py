"""``gptfast classify`` and ``gptfast.classify(run, texts)``: a fine-tuned run's labels, probabilities equal to
the softmax of the logits at each text's last real token, the same answer alone or in a batch, CSV input
like training's, one-line errors, and the module itself callable."""

import csv
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import gptfast
from gptfast import checkpoint
from gptfast.classify import Prediction, classify, classify_review, load_classifier, prepare_for_classification
from gptfast.cli import main
from gptfast.data import default_tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
SPAM = ["WINNER!! Claim your free prize now", "Free entry: win cash, text WIN now", "URGENT! You have won, call now"]
HAM = ["Are we still on for lunch tomorrow?", "I'll be home late, don't wait up", "Thanks for the birthday wishes"]
TEXTS = ["win a free prize now", "see you at lunch", "call now to claim your cash award today please"]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_csv(path, rows, header):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A classifier trained by `gptfast finetune classify` on text labels (so the run stores their names)."""
    root = tmp_path_factory.mktemp("classify")
    torch.manual_seed(0)
    checkpoint.save_model(gptfast.GPTModel(TINY), str(root / "base"))
    data = write_csv(root / "train.csv", [("spam", t) for t in SPAM] + [("ham", t) for t in HAM], ("Label", "Text"))
    code = main(["finetune", "classify", "--base", str(root / "base"), "--data", str(data), "--out", str(root / "run"),
                 "--epochs", "1", "--batch-size", "3", "--max-length", "12", "--lr", "1e-3", "--no-progress",
                 "--device", "cpu"])
    assert code == 0
    return root / "run"


def direct(model_folder, tok, texts):
    """(label index, probabilities) per text, computed here: each text alone, cut to the run's max_length,
    padded with 50256, the logits at its last real token."""
    config = json.loads(next(pathlib.Path(model_folder).glob("step-*/config.json")).read_text())
    model = gptfast.GPTModel.from_pretrained(str(model_folder)).eval()
    out = []
    for text in texts:
        ids = tok.encode(text)[:config["max_length"]]
        x = torch.tensor([ids + [50256] * (config["max_length"] - len(ids))])
        with torch.no_grad():
            logits = model(x)[0, len(ids) - 1]
        out.append(torch.softmax(logits, dim=-1))
    return config["labels"], out


def test_probabilities_are_the_softmax_of_the_models_logits(run, tok):
    labels, probs = direct(run, tok, TEXTS)
    preds = classify(run, TEXTS, device="cpu")
    assert [type(p) for p in preds] == [Prediction] * 3
    for pred, p in zip(preds, probs):
        k = int(p.argmax())
        assert pred.label == labels[k] and pred.label in ("ham", "spam")
        assert pred.probability == pytest.approx(float(p[k]), abs=1e-6)
    label, probability = preds[0]  # a tuple too
    assert (label, probability) == (preds[0].label, preds[0].probability)


def test_a_text_gets_the_same_answer_alone_or_in_a_batch(run):
    model = load_classifier(run)
    batched = classify(model, TEXTS, batch_size=3)
    alone = [classify(model, t) for t in TEXTS]  # a single string gives a single Prediction
    assert [p.label for p in batched] == [p.label for p in alone]
    assert [p.probability for p in batched] == pytest.approx([p.probability for p in alone], abs=1e-6)
    assert model.pool == "last_token" and model.max_length == 12 and model.labels == ["ham", "spam"]


def test_integer_labels_answer_with_class_ids(tmp_path, tok):
    torch.manual_seed(3)
    clf = prepare_for_classification(gptfast.GPTModel(TINY), 3)
    checkpoint.save_model(clf, str(tmp_path / "run" / "step-1"),
                          extra_config={"task": "classify", "num_classes": 3, "labels": None, "pad_token_id": 50256,
                                        "max_length": 10})
    preds = classify(str(tmp_path / "run"), ["one", "two words"], device="cpu")
    assert all(isinstance(p.label, int) and 0 <= p.label < 3 for p in preds)


def test_the_books_classify_review_is_unchanged(run, tok):
    model = load_classifier(run)
    for text in TEXTS:
        assert classify_review(text, model, tok, "cpu", max_length=12) == classify(model, text).label


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gptfast", "classify", *map(str, args)], cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)


def test_cli_prints_label_probability_and_text_per_line(run, tmp_path):
    r = _cli("--checkpoint", run, *TEXTS, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    expected = [f"{p.label}\t{p.probability:.4f}\t{t}" for p, t in zip(classify(run, TEXTS, device="cpu"), TEXTS)]
    assert r.stdout.splitlines() == expected and r.stderr == ""


def test_cli_reads_a_csv_column_like_training(run, tmp_path, capsys):
    write_csv(tmp_path / "lower.csv", [(t, "x") for t in TEXTS], ("text", "other"))  # Text, case-insensitive
    write_csv(tmp_path / "named.csv", [("x", t) for t in TEXTS], ("id", "message"))
    expected = [f"{p.label}\t{p.probability:.4f}\t{t}" for p, t in zip(classify(run, TEXTS, device="cpu"), TEXTS)]
    assert main(["classify", "--checkpoint", str(run), "--file", str(tmp_path / "lower.csv"), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    assert main(["classify", "--checkpoint", str(run), "--file", str(tmp_path / "named.csv"), "--text-column",
                 "message", "--batch-size", "2", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines() == expected


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("others")
    torch.manual_seed(0)
    model = gptfast.GPTModel(TINY)
    checkpoint.save_model(model, str(root / "plain" / "step-1"))
    checkpoint.save_model(model, str(root / "instruct" / "step-1"), extra_config={"task": "instruct"})
    write_csv(root / "blank.csv", [("a", "fine"), ("b", "  ")], ("id", "Text"))
    write_csv(root / "cols.csv", [("a", "fine")], ("id", "body"))
    write_csv(root / "header-only.csv", [], ("Text",))
    return root


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "OTHERS/plain", "hi"], "is not a classifier run (its config.json has task None)"),
    (["--checkpoint", "OTHERS/instruct", "hi"], "talk to it with `gptfast chat`"),
    (["--checkpoint", "OTHERS/nowhere", "hi"], "OTHERS/nowhere does not exist: pass a run folder"),
    (["--checkpoint", "RUN", "--file", "OTHERS/missing.csv"], "OTHERS/missing.csv does not exist"),
    (["--checkpoint", "RUN", "--file", "OTHERS/blank.csv"], "OTHERS/blank.csv: row 2 has an empty text"),
    (["--checkpoint", "RUN", "--file", "OTHERS/cols.csv"],
     "has no text column 'Text'; its columns are ['id', 'body']. Name the text column with --text-column"),
    (["--checkpoint", "RUN", "--file", "OTHERS/header-only.csv"], "has no rows"),
    (["--checkpoint", "RUN", "fine", "  "], "text 2 is empty"),
    (["--checkpoint", "RUN", "a <|endoftext|> b"], "text 1 cannot be encoded"),
    (["--checkpoint", "RUN"], "no text to classify: pass one or more TEXT arguments, or --file F.csv"),
    (["--checkpoint", "RUN", "hi", "--file", "OTHERS/blank.csv"], "not both"),
    (["--checkpoint", "RUN", "hi", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, run, other_runs, capsys):
    def fill(s):
        return s.replace("OTHERS", str(other_runs)).replace("RUN", str(run))

    assert main(["classify", *map(fill, args), "--device", "cpu"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "Traceback" not in out.err and len(out.err.strip().splitlines()) == 1
    assert out.err.startswith("gptfast classify: error: ") and fill(message) in out.err, out.err


def test_a_non_classifier_is_refused_before_its_weights_are_read(other_runs, tmp_path):
    import shutil

    shutil.copytree(other_runs / "plain", tmp_path / "plain")
    (tmp_path / "plain" / "step-1" / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="is not a classifier run"):
        load_classifier(tmp_path / "plain")


@pytest.mark.parametrize("code", [
    # the package attribute, before anything imported the submodule
    """
    import sys, gptfast
    assert "gptfast.classify" not in sys.modules
    got = gptfast.classify(RUN, TEXTS, device="cpu")
    from gptfast.classify import classify
    assert got == classify(RUN, TEXTS, device="cpu")
    """,
    # once the submodule is imported the package attribute is the module: still callable
    """
    import gptfast.classify
    import gptfast
    from gptfast.classify import classify, Prediction
    got = gptfast.classify(RUN, TEXTS, device="cpu")
    assert got == classify(RUN, TEXTS, device="cpu") and isinstance(got[0], Prediction)
    assert gptfast.classify.classify is classify and callable(gptfast.classify)
    """,
    """
    from gptfast.classify import classify
    got = classify(RUN, TEXTS, device="cpu")
    """,
])
def test_gptfast_classify_is_callable_in_a_fresh_interpreter(code, run, tmp_path):
    program = f"RUN = {str(run)!r}\nTEXTS = {TEXTS!r}\n" + textwrap.dedent(code) + \
        "\nprint([(p.label, round(p.probability, 6)) for p in got])\n"
    r = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str([(p.label, round(p.probability, 6)) for p in classify(run, TEXTS, device="cpu")])
