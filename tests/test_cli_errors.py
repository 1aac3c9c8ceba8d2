"""The command line's answer to bad input: one line that says what is wrong and what to do, exit code 2,
and nothing left behind; exit code 1 and one line for a failure nobody foresaw (GPTFAST_DEBUG=1 adds
the traceback)."""

import csv
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from gptfast import checkpoint
from gptfast.cli import main
from gptfast.data import write_shards

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--emb-dim", "32", "--n-layers", "1", "--n-heads", "2", "--context-length", "16", "--drop-rate", "0",
        "--batch-size", "2", "--eval-every", "2", "--eval-iters", "1", "--warmup", "0", "--no-progress",
        "--sample-tokens", "0"]


def _err(capsys) -> str:
    """stderr of the last command, checked to be one line per message and free of tracebacks."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = [np.tile(rng.integers(0, 255, size=7), 40) for _ in range(3)]
    folder = tmp_path_factory.mktemp("data") / "shards"
    write_shards(docs, str(folder), "gpt2", 256, 255, shard_tokens=500)
    return folder


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A run with checkpoints step-1 and step-2 (a 256-token vocabulary: small files)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", str(shards), "--out", str(out), "--steps", "2", "--save-every", "1", *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model with GPT-2's vocabulary, to fine-tune."""
    import gptfast

    torch.manual_seed(0)
    model = gptfast.GPTModel(dict(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=1,
                                  drop_rate=0.0))
    folder = tmp_path_factory.mktemp("base")
    checkpoint.save_model(model, str(folder))
    return folder


@pytest.fixture
def run_copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("Every effort moves you toward the light. " * 30, encoding="utf-8")
    return path


def _generate(checkpoint_path, *flags):
    return main(["generate", "--checkpoint", str(checkpoint_path), "--prompt", "a", "--max-new-tokens", "2", *flags])


# ---- devices and backends ------------------------------------------------------------------------


def _device_argv(command, device, trained, text, tmp_path):
    if command == "train":
        return ["train", str(text), "--out", str(tmp_path / "out"), "--steps", "1", "--device", device, *TINY]
    if command == "generate":
        return ["generate", "--checkpoint", str(trained), "--prompt", "a", "--device", device]
    return ["finetune", "classify", "--base", str(trained), "--data", str(text), "--out", str(tmp_path / "out"),
            "--no-progress", "--device", device]


@pytest.mark.parametrize("command", ["train", "generate", "finetune"])
@pytest.mark.parametrize("device, message", [
    # the reason after the colon differs between a CPU-only build and a CUDA build on a machine without a GPU
    ("cuda", "--device cuda: "),          # generate used to fail with a pin_memory traceback
    ("mps", "--device mps: "),
    ("banana", "--device 'banana' is not a device: use auto, cpu, cuda, cuda:N or mps"),
])
def test_a_device_this_machine_lacks_is_named_before_any_work(command, device, message, trained, text, tmp_path,
                                                               capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip(reason="this machine has CUDA")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip(reason="this machine has MPS")
    assert main(_device_argv(command, device, trained, text, tmp_path)) == 2
    err = _err(capsys)
    assert message in err and (device == "banana" or "use --device cpu" in err)
    assert not (tmp_path / "out").exists()


def test_device_helper_for_other_commands():
    from gptfast.devices import DeviceError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(DeviceError, match="--device 'meta': gptfast runs on cpu, cuda or mps"):
        resolve_device("meta")
    assert issubclass(DeviceError, ValueError)


@pytest.mark.parametrize("command", ["train", "generate", "finetune"])
def test_triton_on_a_cpu_without_the_interpreter_is_refused_up_front(command, trained, text, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = _device_argv(command, "cpu", trained, text, tmp_path) + ["--backend", "triton"]
    assert main(argv) == 2
    err = _err(capsys)
    assert "--backend triton: Triton kernels need a CUDA GPU" in err and "TRITON_INTERPRET=1" in err
    assert not (tmp_path / "out").exists()
    assert main(argv[:-1] + ["banana"]) == 2
    assert "unknown backend 'banana'" in _err(capsys)


def test_generate_checks_sampling_flags_before_printing(trained, capsys):
    assert _generate(trained, "--temperature", "1", "--top-k", "0") == 2
    out = capsys.readouterr()
    assert out.out == "" and "--top-k must be a positive number of tokens, got 0" in out.err


# ---- paths ---------------------------------------------------------------------------------------


def test_out_pointing_at_a_file_is_refused(shards, trained, text, tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    assert main(["train", str(shards), "--out", str(existing), "--steps", "1", *TINY]) == 2
    assert f"--out {existing} is a file" in _err(capsys)
    assert main(["tokenize", str(text), "--out", str(existing), "--no-progress"]) == 2
    assert f"--out {existing} is a file" in _err(capsys)
    assert main(["finetune", "classify", "--base", str(trained), "--data", str(text), "--out", str(existing),
                 "--no-progress", "--device", "cpu"]) == 2
    assert f"--out {existing} is a file" in _err(capsys)
    assert existing.read_text() == "keep me"


def test_generate_names_a_file_that_is_no_checkpoint(tmp_path, trained, capsys):
    other = tmp_path / "some-file.txt"
    other.write_text("hello")
    assert _generate(other) == 2
    err = _err(capsys)
    assert f"{other} is a file, not a loadable checkpoint" in err and "does not exist" not in err
    assert "a training run folder" in err and "model.safetensors inside one" in err
    assert _generate(trained / "step-2" / "model.safetensors") == 0  # the weights file of a step is accepted


# ---- damaged checkpoints -------------------------------------------------------------------------


def _truncate(path, keep=None):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 if keep is None else keep)


def test_generate_on_damaged_weights_says_which_file(run_copy, capsys):
    weights = run_copy / "step-2" / "model.safetensors"
    _truncate(weights)
    assert _generate(run_copy) == 2
    err = _err(capsys)
    assert f"{weights} is truncated or corrupt, not a readable safetensors file" in err
    assert f"older checkpoints of this run: {run_copy / 'step-1'}" in err
    weights.write_bytes(b"garbage\n")
    assert _generate(run_copy / "step-2") == 2
    assert "is truncated or corrupt" in _err(capsys)
    assert _generate(run_copy / "step-1") == 0


def test_a_missing_config_says_what_the_folder_lacks(run_copy, capsys):
    (run_copy / "step-2" / "config.json").unlink()
    assert _generate(run_copy / "step-2") == 2
    err = _err(capsys)
    assert f"{run_copy / 'step-2'} lacks config.json: a gptfast checkpoint folder holds config.json" in err


@pytest.mark.parametrize("damage", ["truncated weights", "garbage weights", "truncated state", "garbage state",
                                    "no config"])
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(damage, shards, run_copy, capsys):
    step2 = run_copy / "step-2"
    if damage == "truncated weights":
        _truncate(step2 / "model.safetensors")
    elif damage == "garbage weights":
        (step2 / "model.safetensors").write_bytes(b"\x00" * 100)
    elif damage == "truncated state":
        _truncate(step2 / "trainer_state.pt")
    elif damage == "garbage state":
        (step2 / "trainer_state.pt").write_bytes(b"not a checkpoint")
    else:
        (step2 / "config.json").unlink()
    assert main(["train", str(shards), "--out", str(run_copy), "--steps", "3", "--resume", *TINY]) == 0
    err = _err(capsys)
    assert f"warning: --resume skipped {step2}: " in err and f"resuming from {run_copy / 'step-1'} instead" in err
    assert ("truncated or corrupt" in err) != (damage == "no config")
    steps = [json.loads(line)["step"] for line in open(run_copy / "metrics.jsonl")]
    assert steps == [1, 2, 3]  # step 2 trained again, and its folder rewritten whole
    checkpoint.load_model(str(step2))


def test_resume_with_no_loadable_checkpoint_lists_why(shards, run_copy, capsys):
    _truncate(run_copy / "step-2" / "model.safetensors")
    (run_copy / "step-1" / "trainer_state.pt").unlink()
    assert main(["train", str(shards), "--out", str(run_copy), "--steps", "3", "--resume", *TINY]) == 2
    err = _err(capsys)
    assert f"--resume: no checkpoint in {run_copy} loads:" in err
    assert "step-2/model.safetensors is truncated or corrupt" in err and "lacks trainer_state.pt" in err
    assert len(err.strip().splitlines()) == 1
    assert (run_copy / "step-2").is_dir() and (run_copy / "step-1").is_dir()  # nothing deleted


def test_resume_warns_when_a_text_file_changed(text, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(text), "--out", str(out), "--steps", "1", *TINY]) == 0
    state = torch.load(out / "step-1" / "trainer_state.pt", weights_only=True)
    assert state["data"]["sources"][0]["path"] == str(text.resolve())
    assert main(["train", str(text), "--out", str(out), "--steps", "2", "--resume", *TINY]) == 0
    assert "training data changed" not in _err(capsys)
    text.write_text(text.read_text().replace("light", "LIGHT"), encoding="utf-8")  # same length
    assert main(["train", str(text), "--out", str(out), "--steps", "3", "--resume", *TINY]) == 0
    err = _err(capsys)
    assert f"warning: the training data changed since this run started (changed: {text.resolve()})" in err


# ---- data ----------------------------------------------------------------------------------------


def _labelled_csv(path, labels):
    texts = ["win cash now", "see you soon", "free prize inside", "lunch tomorrow?", "call to claim", "thanks!"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Label", "Text"])
        w.writerows(zip(labels, texts))
    return path


def test_integer_labels_must_be_class_ids(base, tmp_path, capsys):
    data = _labelled_csv(tmp_path / "d.csv", [0, 1, 5, 0, 1, 5])
    argv = ["finetune", "classify", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "o"),
            "--epochs", "1", "--batch-size", "3", "--no-progress", "--device", "cpu"]
    assert main(argv) == 2
    err = _err(capsys)
    assert "the labels found are 0, 1, 5" in err and "0..2 for 3 classes" in err and "--num-classes" in err
    assert not (tmp_path / "o").exists()


def test_text_labels_are_mapped_and_kept_with_the_run(base, tmp_path, capsys):
    from gptfast.classify import classify_review, load_classifier

    data = _labelled_csv(tmp_path / "d.csv", ["spam", "ham", "spam", "ham", "spam", "ham"])
    out = tmp_path / "o"
    assert main(["finetune", "classify", "--base", str(base), "--data", str(data), "--out", str(out),
                 "--epochs", "1", "--batch-size", "3", "--no-progress", "--device", "cpu"]) == 0
    assert "classes 0 'ham', 1 'spam'" in capsys.readouterr().out
    config = json.loads(next(out.glob("step-*/config.json")).read_text())
    assert config["labels"] == ["ham", "spam"] and config["num_classes"] == 2
    model = load_classifier(out)
    assert model.labels == ["ham", "spam"]
    assert classify_review("win cash now", model, gpt2_tokenizer(), "cpu") in ("ham", "spam")


def gpt2_tokenizer():
    from gptfast.data import default_tokenizer

    return default_tokenizer()


def test_a_base_model_with_another_vocabulary_is_refused(trained, tmp_path, capsys):
    data = _labelled_csv(tmp_path / "d.csv", [0, 1, 0, 1, 0, 1])
    assert main(["finetune", "classify", "--base", str(trained), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--no-progress", "--device", "cpu"]) == 2
    assert "has a vocabulary of 256 ids, but the tokenizer's ids go up to 50256" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_tokenize_refuses_an_empty_file(text, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["tokenize", str(text), str(empty), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert f"{empty} is empty: there is nothing to tokenize in it" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_a_file_that_is_not_utf8_is_named_and_nothing_is_left(text, tmp_path, capsys):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"first line\ncaf\xe9 au lait\n")
    assert main(["train", str(text), str(latin), "--out", str(tmp_path / "run"), "--steps", "1", *TINY]) == 2
    err = _err(capsys)
    assert f"{latin} is not UTF-8 text (byte 14, line 2: invalid continuation byte)" in err
    assert not (tmp_path / "run").exists()  # no run folder, no data.tmp-N
    out = tmp_path / "shards"
    assert main(["tokenize", str(text), str(latin), "--out", str(out), "--no-progress", "--chunk-bytes", "8"]) == 2
    assert f"{latin} is not UTF-8 text (byte 14, line 2: invalid continuation byte)" in _err(capsys)
    assert not out.exists()
    out.mkdir()
    assert main(["tokenize", str(text), str(latin), "--out", str(out), "--no-progress", "--shard-tokens", "10"]) == 2
    assert list(out.iterdir()) == []  # the shards of the first file were never moved in


@pytest.mark.parametrize("flags, message", [
    (["--model", "gpt3"], "--model: unknown model name 'gpt3'"),
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--n-heads", "3"], "--emb-dim (32) must be divisible by n_heads (3)"),
    (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_flags_are_checked_before_any_text_is_tokenized(flags, message, text, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(text), "--out", str(out), "--steps", "1", *TINY, *flags]) == 2
    assert message in _err(capsys)
    assert not out.exists()


def test_files_are_written_with_the_users_umask(text, shards, tmp_path):
    old = os.umask(0o027)
    try:
        assert main(["tokenize", str(text), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
        assert main(["train", str(shards), "--out", str(tmp_path / "r"), "--steps", "1", *TINY]) == 0
    finally:
        os.umask(old)
    files = [tmp_path / "s" / "shard-00000.npy", tmp_path / "s" / "meta.json", tmp_path / "r" / "metrics.jsonl",
             tmp_path / "r" / "loss.png", *(tmp_path / "r" / "step-1").iterdir()]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o640" for f in files}


# ---- failures nobody foresaw ---------------------------------------------------------------------


def test_an_unexpected_failure_is_one_line_with_exit_code_1(text, tmp_path, capsys, monkeypatch):
    import gptfast.commands.tokenize as tokenize

    def broken(*args):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(tokenize, "_encode", broken)
    monkeypatch.delenv("GPTFAST_DEBUG", raising=False)
    assert main(["tokenize", str(text), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = _err(capsys)
    assert err == ("gptfast tokenize: failed: RuntimeError: disk on fire (set GPTFAST_DEBUG=1 for the traceback)\n")
    assert not (tmp_path / "o").exists()
    monkeypatch.setenv("GPTFAST_DEBUG", "1")
    assert main(["tokenize", str(text), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "disk on fire" in err
    assert main(["tokenize", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "Traceback" in capsys.readouterr().err  # bad input keeps its exit code, with the traceback


# ---- the installed command -----------------------------------------------------------------------


def _cli(*argv, cwd):
    env = dict(os.environ)
    env.pop("GPTFAST_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "gptfast", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_python_m_gptfast_exit_codes_without_tracebacks(trained, tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "notes.txt").write_text("hello")
    cases = [
        (["train", "latin1.txt", "--out", "run", "--device", "banana"], "--device 'banana' is not a device"),
        (["generate", "--checkpoint", "notes.txt", "--prompt", "a"], "notes.txt is a file, not a loadable checkpoint"),
        (["tokenize", "latin1.txt", "--out", "shards", "--no-progress"], "latin1.txt is not UTF-8 text"),
    ]
    for argv, message in cases:
        done = _cli(*argv, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt", "notes.txt"]
