"""``gptfast chat``: one instruction per line from standard input (a pipe here), each answered through the
run's prompt template and streamed; /quit, end of input and Ctrl-C end it cleanly."""

import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch

import gptfast
from gptfast import checkpoint
from gptfast.cli import main
from gptfast.data import default_tokenizer
from gptfast.generation import generate
from gptfast.instruct import apply_template, extract_response

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return gptfast.GPTModel(TINY).eval()


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    checkpoint.save_model(model, str(root / "instruct" / "step-2"), extra_config={"task": "instruct"})
    checkpoint.save_model(model, str(root / "plain" / "step-1"))
    return root


def response(model, tok, instruction, n, seed=123, **sampling):
    """The response chat should print for one line: the book's extract_response of the templated prompt."""
    prompt = apply_template("alpaca", instruction)
    torch.manual_seed(seed)
    out = generate(model, torch.tensor([tok.encode(prompt)]), n, eos_id=tok.eot_token, **sampling)
    return extract_response(tok.decode(out[0].tolist()), prompt)


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def _chat(*args, input, cwd):
    return subprocess.run([sys.executable, "-m", "gptfast", "chat", *map(str, args)], input=input, env=_env(),
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_each_line_is_answered_until_quit(runs, model, tok, tmp_path):
    lines = ["Name a color.", "", "Repeat the word red.", "/quit", "This line comes after /quit."]
    r = _chat("--checkpoint", runs / "instruct", "--max-new-tokens", 8, "--device", "cpu",
              input="\n".join(lines) + "\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    expected = [response(model, tok, "Name a color.", 8, seed=123),
                response(model, tok, "Repeat the word red.", 8, seed=124)]  # turn i: seed + i
    assert r.stdout == "".join(e + "\n\n" for e in expected)
    assert "template alpaca" in r.stderr and "Traceback" not in r.stderr


def test_end_of_input_ends_the_chat_and_turns_sample_under_seed_plus_i(runs, model, tok, tmp_path):
    sampling = dict(temperature=1.5, top_k=100)
    r = _chat("--checkpoint", runs / "instruct", "--max-new-tokens", 6, "--temperature", 1.5, "--top-k", 100,
              "--seed", 5, "--device", "cpu", input="Say hi.\nSay hi.", cwd=tmp_path)  # no final newline
    assert r.returncode == 0, r.stderr
    expected = [response(model, tok, "Say hi.", 6, seed=5, **sampling),
                response(model, tok, "Say hi.", 6, seed=6, **sampling)]
    assert r.stdout == "".join(e + "\n\n" for e in expected)


def test_chat_answers_as_generate_does(runs, capsys, monkeypatch):
    import io

    argv = ["--checkpoint", str(runs / "instruct"), "--max-new-tokens", "7", "--device", "cpu"]
    assert main(["generate", *argv, "--prompt", "List two animals."]) == 0
    generated = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("List two animals.\n"))
    assert main(["chat", *argv]) == 0
    assert capsys.readouterr().out == generated + "\n"


def test_a_checkpoint_without_a_template_is_refused_unless_one_is_named(runs, model, tok, tmp_path):
    r = _chat("--checkpoint", runs / "plain", input="Name a color.\n", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "is not an instruction-tuned run" in r.stderr and "--template alpaca" in r.stderr
    r = _chat("--checkpoint", runs / "plain", "--template", "alpaca", "--max-new-tokens", 5, "--device", "cpu",
              input="Name a color.\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == response(model, tok, "Name a color.", 5) + "\n\n"


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "0"], "--top-k must be a positive number of tokens, got 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
])
def test_sampling_flags_are_checked_before_loading(flags, message, tmp_path, capsys):
    assert main(["chat", "--checkpoint", str(tmp_path / "nowhere"), *flags]) == 2
    out = capsys.readouterr()
    assert out.out == "" and message in out.err and "nowhere" not in out.err


def test_a_classifier_run_points_to_classify(tmp_path, capsys):
    from gptfast.classify import prepare_for_classification

    torch.manual_seed(0)
    clf = prepare_for_classification(gptfast.GPTModel(TINY), 2)
    checkpoint.save_model(clf, str(tmp_path / "clf"), extra_config={"task": "classify", "num_classes": 2})
    assert main(["chat", "--checkpoint", str(tmp_path / "clf")]) == 2
    assert "gptfast classify --checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, which Windows does not deliver this way")
def test_ctrl_c_ends_the_chat_cleanly(runs, tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "gptfast", "chat", "--checkpoint", str(runs / "instruct"),
                          "--device", "cpu"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=_env(), cwd=tmp_path, text=True)
    try:
        greeting = p.stderr.readline()  # printed once the model is loaded and the loop waits for a line
        assert greeting.startswith("gptfast chat: "), greeting
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
