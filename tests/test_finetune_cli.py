"""``gptfast finetune``'s run controls: exact --resume, --max-steps, --dtype, the test split, --config,
JSONL instruction data and the template a run records. Tiny models, a few seconds each."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gptfast import GPTModel, checkpoint
from gptfast.classify import DatasetError
from gptfast.cli import main
from gptfast.instruct import load_instruction_data, template_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=50257, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)
SPAM = ["WINNER!! Claim your free prize now", "Free entry: win cash, text WIN now", "URGENT! You have won an award",
        "Congratulations, free ringtone, reply YES", "Win a brand new phone, call today"]
HAM = ["Are we still on for lunch tomorrow?", "I'll be home late, don't wait up", "Can you send me the notes",
       "Thanks for the birthday wishes", "See you at the station at six"]
WORDS = ("red", "green", "blue", "pink", "gold", "grey", "teal", "navy", "plum", "rose")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    checkpoint.save_model(GPTModel(TINY), str(folder))
    return folder


@pytest.fixture(scope="module")
def sms(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sms.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Label", "Text"])
        w.writerows([("spam", t) for t in SPAM] + [("ham", t) for t in HAM])
    return path


@pytest.fixture(scope="module")
def entries():
    return [{"instruction": f"Repeat the word {w}.", "input": "" if i % 2 else w, "output": w}
            for i, w in enumerate(WORDS * 2)]


@pytest.fixture(scope="module")
def alpaca_jsonl(tmp_path_factory, entries):
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def classify(base, data, out, *flags):
    return ["finetune", "classify", "--base", str(base), "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--lr", "5e-3", "--eval-every", "2", "--no-progress", "--device", "cpu", *flags]


def instruct(base, data, out, *flags):
    return ["finetune", "instruct", "--base", str(base), "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--lr", "5e-3", "--eval-every", "2", "--eval-iters", "1", "--samples", "1", "--max-new-tokens", "2", "--no-progress",
            "--device", "cpu", *flags]


def cli(*argv, cwd=None):
    """The command as a user runs it: a fresh interpreter, its stdout and stderr."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "gptfast", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def weights(run):
    (_, folder), = checkpoint.step_dirs(str(run))[-1:]
    return load_file(os.path.join(folder, checkpoint.MODEL_FILE))


def evals(run):
    return [r for r in map(json.loads, open(run / "metrics.jsonl")) if r.get("split") != "test"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _err(capsys):
    return capsys.readouterr().err


# ---- --resume and --max-steps --------------------------------------------------------------------


def test_an_interrupted_classifier_run_resumes_bitwise(base, sms, tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    # 10 rows: 7 train (4 steps an epoch with batch 2), 1 validation, 2 test
    assert main(classify(base, sms, whole, "--epochs", "2")) == 0
    assert main(classify(base, sms, parts, "--epochs", "2", "--max-steps", "3")) == 0  # stops mid-epoch 1
    assert [d for d, _ in checkpoint.step_dirs(str(parts))] == [3]
    state = torch.load(parts / "step-3" / "trainer_state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch"]) == (3, 1, 3) and state["optimizer"]["state"]
    capsys.readouterr()
    assert main(classify(base, sms, parts, "--resume", "--max-steps", "6")) == 0  # mid-epoch 2
    assert "resuming" in capsys.readouterr().out
    assert main(["finetune", "classify", "--out", str(parts), "--resume", "--no-progress"]) == 0  # to the end
    assert [d for d, _ in checkpoint.step_dirs(str(parts))] == [8]
    assert_same_weights(whole, parts)
    metrics = [json.loads(line) for line in open(whole / "metrics.jsonl")]
    assert metrics == [json.loads(line) for line in open(parts / "metrics.jsonl")]  # test record too
    assert [r["step"] for r in metrics] == [2, 4, 6, 8, 8]
    summary = json.loads((parts / "summary.json").read_text())
    assert summary["step"] == 8 and summary["finished"] and "test_accuracy" in summary


def test_a_lora_instruct_run_resumes_bitwise(base, alpaca_jsonl, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    lora = ("--lora-rank", "2", "--epochs", "1")  # 17 training entries: 9 steps
    assert main(instruct(base, alpaca_jsonl, whole, *lora)) == 0
    assert main(instruct(base, alpaca_jsonl, parts, *lora, "--max-steps", "5")) == 0
    assert os.path.isfile(parts / "step-5" / "lora" / "adapters.safetensors")
    state = torch.load(parts / "step-5" / "trainer_state.pt", weights_only=True)
    assert any(".lora." in name for name in state["trainable"])  # the adapters, unmerged
    assert main(instruct(base, alpaca_jsonl, parts, "--resume")) == 0
    assert_same_weights(whole, parts)
    assert evals(whole) == evals(parts)


def test_fp16_trains_with_a_gradient_scaler_and_resumes_bitwise(base, sms, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(classify(base, sms, whole, "--epochs", "1", "--dtype", "fp16")) == 0
    assert main(classify(base, sms, parts, "--epochs", "1", "--dtype", "fp16", "--max-steps", "2")) == 0
    state = torch.load(parts / "step-2" / "trainer_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the GradScaler's state travels with the checkpoint
    assert main(classify(base, sms, parts, "--resume")) == 0
    assert_same_weights(whole, parts)
    assert weights(whole)["out_head.weight"].dtype == torch.float32  # autocast: the weights stay fp32


def test_bf16_autocast_changes_the_numbers_and_auto_is_fp32_on_the_cpu(base, sms, tmp_path):
    from gptfast.finetune import autocast_dtype

    assert autocast_dtype("auto", "cpu") is None and autocast_dtype("fp16", "cpu") == torch.float16
    for name in ("auto", "fp32", "bf16"):
        assert main(classify(base, sms, tmp_path / name, "--max-steps", "2", "--dtype", name)) == 0
    assert_same_weights(tmp_path / "auto", tmp_path / "fp32")
    assert not torch.equal(weights(tmp_path / "fp32")["out_head.weight"], weights(tmp_path / "bf16")["out_head.weight"])


def test_resume_refuses_a_max_steps_below_the_runs_step_and_a_finished_run(base, sms, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(classify(base, sms, out, "--max-steps", "3")) == 0
    before = (out / "settings.json").read_text()
    capsys.readouterr()
    assert main(classify(base, sms, out, "--resume", "--max-steps", "2")) == 2
    assert "--max-steps 2 is below this run's step 3" in _err(capsys)
    assert main(classify(base, sms, out, "--resume", "--max-steps", "3")) == 2
    err = _err(capsys)
    assert "already at step 3, where --max-steps 3 ends; pass a larger --max-steps or more --epochs" in err
    assert (out / "settings.json").read_text() == before  # a refused resume leaves the run as it was
    assert main(classify(base, sms, out)) == 2  # without --resume: refused, and --resume is suggested
    assert "pass --resume to continue that run" in _err(capsys)
    (tmp_path / "empty").mkdir()
    assert main(classify(base, sms, tmp_path / "empty", "--resume")) == 2
    assert "holds no step-N checkpoint" in _err(capsys)
    assert main(["finetune", "classify", "--out", str(tmp_path / "nowhere"), "--resume"]) == 2
    assert "--resume: " + str(tmp_path / "nowhere") + " is not a run folder" in _err(capsys)


def test_max_steps_stops_mid_epoch_with_evaluations_where_eval_every_says(base, sms, tmp_path):
    out = tmp_path / "run"
    assert main(classify(base, sms, out, "--max-steps", "5", "--eval-every", "2")) == 0
    records = evals(out)
    assert [r["step"] for r in records] == [2, 4, 5]  # every 2 steps (4 is also epoch 1's end), and the stop
    assert [r.get("stop", False) for r in records] == [False, False, True]
    assert [d for d, _ in checkpoint.step_dirs(str(out))] == [5]


def test_save_every_keeps_the_newest(base, sms, tmp_path):
    out = tmp_path / "run"
    assert main(classify(base, sms, out, "--epochs", "1", "--save-every", "1", "--keep-last", "2")) == 0
    assert [d for d, _ in checkpoint.step_dirs(str(out))] == [3, 4]


# ---- the test split ------------------------------------------------------------------------------


def test_classify_scores_the_held_out_test_split_at_the_end(base, sms, tmp_path):
    out = tmp_path / "run"
    result = cli(*classify(base, sms, out, "--epochs", "1"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("done at step 4: train_loss ") and "classes 0 'ham', 1 'spam'" in lines[0]
    assert lines[1].startswith("test (2 examples): test_loss ") and ", test_accuracy " in lines[1]
    test, = [r for r in map(json.loads, open(out / "metrics.jsonl")) if r.get("split") == "test"]
    assert test["test_examples"] == 2 and test["step"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == test["test_accuracy"] and summary["val_loss"] == evals(out)[-1]["val_loss"]
    assert f"test_accuracy {test['test_accuracy']:.4f}" in lines[1]


def test_classify_test_data_file_and_no_test_split(base, sms, tmp_path, capsys):
    assert main(classify(base, sms, tmp_path / "a", "--epochs", "1", "--test-data", str(sms))) == 0
    out = capsys.readouterr().out
    assert "test (10 examples)" in out
    assert evals(tmp_path / "a")[-1]["step"] == 5  # nothing held out of --data: 9 train rows, 5 steps
    assert main(classify(base, sms, tmp_path / "b", "--epochs", "1", "--test-fraction", "0")) == 0
    assert "test: no test split" in capsys.readouterr().out
    assert "test_loss" not in json.loads((tmp_path / "b" / "summary.json").read_text())
    assert main(classify(base, sms, tmp_path / "c", "--test-fraction", "0.95")) == 2
    assert "--test-fraction must be in [0, 0.9)" in _err(capsys)


def test_instruct_scores_the_books_test_split_and_answers_val_and_test_entries(base, alpaca_jsonl, entries, tmp_path,
                                                                               capsys):
    from gptfast.instruct import split_instruction_data

    out = tmp_path / "run"
    assert main(instruct(base, alpaca_jsonl, out, "--epochs", "1")) == 0
    printed = capsys.readouterr().out
    train, test, val = split_instruction_data(entries)  # 20 entries: 17 train, 2 test, 1 validation
    assert (len(train), len(test), len(val)) == (17, 2, 1)
    assert f"test ({len(test)} examples): test_loss " in printed and "responses:" in printed
    responses = json.loads((out / "responses.json").read_text())
    assert [r["split"] for r in responses] == ["val", "test"]
    assert responses[0]["instruction"] == val[0]["instruction"] and responses[1]["output"] == test[0]["output"]
    assert all(isinstance(r["model_response"], str) for r in responses)
    assert "test_loss" in json.loads((out / "summary.json").read_text())


def test_an_instruct_run_stores_its_template(base, alpaca_jsonl, tmp_path):
    out = tmp_path / "run"
    assert main(instruct(base, alpaca_jsonl, out, "--max-steps", "1", "--samples", "0")) == 0
    config = json.loads(next(out.glob("step-*/config.json")).read_text())
    assert config["task"] == "instruct" and config["template"] == "alpaca" and template_of(config) == "alpaca"
    assert not (out / "responses.json").exists()


# ---- --config and missing flags ------------------------------------------------------------------


def test_a_config_file_supplies_the_flags_and_flags_override_it(base, sms, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'base = "{base}"\ndata = "{sms}"\nout = "{tmp_path / "run"}"\nbatch-size = 2\n'
                    f'max_steps = 2\nno-progress = true\ndevice = "cpu"\nlr = 1e-3\n')
    result = cli("finetune", "classify", "--config", toml, "--lr", "2e-3")
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert saved["command"] == "finetune classify"
    assert saved["settings"]["lr"] == 2e-3 and saved["settings"]["batch_size"] == 2
    assert saved["settings"]["base"] == str(base) and "config" not in saved["settings"]
    assert [d for d, _ in checkpoint.step_dirs(str(tmp_path / "run"))] == [2]


def test_settings_keep_paths_absolute_so_a_resume_works_from_another_folder(base, sms, tmp_path, monkeypatch):
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(sms, work / "sms.csv")
    monkeypatch.chdir(work)
    assert main(["finetune", "classify", "--base", str(base), "--data", "sms.csv", "--out", "run", "--batch-size", "2",
                 "--max-steps", "1", "--no-progress", "--device", "cpu"]) == 0
    saved = json.loads((work / "run" / "settings.json").read_text())["settings"]
    assert saved["data"] == str(work / "sms.csv")
    monkeypatch.chdir(tmp_path)  # elsewhere: the run still finds its data
    assert main(["finetune", "classify", "--out", str(work / "run"), "--resume", "--max-steps", "2",
                 "--no-progress", "--device", "cpu"]) == 0
    assert [d for d, _ in checkpoint.step_dirs(str(work / "run"))][-1] == 2


def test_resume_restores_the_runs_settings_and_names_overrides(base, sms, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(classify(base, sms, out, "--max-steps", "2", "--eval-every", "3")) == 0
    result = cli("finetune", "classify", "--out", out, "--resume", "--max-steps", "4", "--eval-every", "1",
                 "--no-progress")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"resuming {out / 'step-2'} at step 2"
    assert lines[1] == "  --eval-every 1 overrides this run's 3" and not lines[2].startswith("warning")
    assert [r["step"] for r in evals(out)] == [3, 4]  # batch size 2 restored; the new --eval-every from step 3
    assert main(["finetune", "classify", "--out", str(out), "--resume", "--max-steps", "5", "--batch-size", "3",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "--batch-size 3 overrides this run's 2" in printed
    assert "warning: --batch-size changed: the examples and their order from here on are not those" in printed


@pytest.mark.parametrize("text, message", [
    ("epochz = 3\n", "unknown setting 'epochz'; did you mean 'epochs'?"),
    ("epochs = 'two'\n", "--epochs must be an integer, not 'two'"),
    ("dtype = 'fp8'\n", "--dtype must be one of auto, bf16, fp16, fp32, not 'fp8'"),
])
def test_a_bad_config_file_is_one_line(text, message, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    assert main(["finetune", "instruct", "--config", str(toml)]) == 2
    err = _err(capsys)
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_base_data_or_out_is_named(base, sms, tmp_path):
    result = cli("finetune", "classify", "--data", sms, "--out", tmp_path / "o")
    assert result.returncode == 2
    assert result.stderr == ("gptfast finetune: error: --base is missing: pass --base DIR|NAME (the pretrained "
                             "model), or set base in a --config file\n")
    result = cli("finetune", "instruct", "--base", base, "--data", sms)
    assert result.returncode == 2 and "--out is missing" in result.stderr
    assert not (tmp_path / "o").exists()


def test_device_auto_is_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "classify", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default auto: cuda, then mps, then cpu)" in out and "--dtype {auto,bf16,fp16,fp32}" in out


# ---- JSONL instruction data ----------------------------------------------------------------------


def test_jsonl_is_read_by_extension_or_by_content(alpaca_jsonl, entries, tmp_path):
    assert load_instruction_data(alpaca_jsonl) == entries
    other = tmp_path / "alpaca.txt"
    other.write_text("\n" + alpaca_jsonl.read_text() + "\n\n")
    assert load_instruction_data(other) == entries
    misnamed = tmp_path / "alpaca.json"  # one object per line under the JSON extension
    misnamed.write_text(alpaca_jsonl.read_text())
    assert load_instruction_data(misnamed) == entries


@pytest.mark.parametrize("lines, message", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "c", "output": '],
     r"bad\.jsonl, line 2: not valid JSON \(Expecting value, column 32\); each line must be one"),
    (['{"instruction": "a", "output": "b"}', '', '{"instruction": "c"}'],
     r"bad\.jsonl, line 3: the entry lacks 'output'"),
    (['["a", "b"]'], r"bad\.jsonl, line 1: the entry is a list, not an object"),
    (['{"instruction": "a", "output": 1}'], r"line 1: the entry has a non-text 'output' \(int\)"),
    (['', '  '], r"bad\.jsonl has no entries"),
])
def test_a_bad_jsonl_line_is_named(lines, message, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_instruction_data(path)


def test_a_bad_jsonl_line_stops_the_command_before_training(base, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d",}\n')
    result = cli(*instruct(base, path, tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"{path}, line 2: not valid JSON" in result.stderr
    assert not (tmp_path / "o").exists()


def test_the_books_instruction_data_as_jsonl(shared_data, tmp_path):
    data = load_instruction_data(shared_data / "instruction-data.json")
    path = tmp_path / "book.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in data))
    assert load_instruction_data(path) == data and len(data) == 1100
