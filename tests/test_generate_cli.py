"""``gptfast generate``: every checkpoint ``from_pretrained`` reads, several prompts and samples, flags checked
before anything is loaded, classifier runs refused, instruct runs answered through their template."""

import os
import pathlib
import random
import re
import subprocess
import sys

import pytest
import torch

import gptfast
from gptfast import checkpoint
from gptfast.classify import prepare_for_classification
from gptfast.cli import main
from gptfast.commands.generate import ResponseStream
from gptfast.data import default_tokenizer
from gptfast.generation import generate
from gptfast.instruct import apply_template, extract_response

REPO = pathlib.Path(__file__).resolve().parent.parent
OFFLINE = REPO / "tests" / "offline"  # its sitecustomize refuses the network
TINY = dict(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
PROMPT = "Every effort moves you"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return gptfast.GPTModel(TINY).eval()


@pytest.fixture(scope="module")
def folders(model, tmp_path_factory):
    """The same weights as a Hugging Face folder, a training run, and instruct and classifier runs."""
    root = tmp_path_factory.mktemp("checkpoints")
    model.save_pretrained(str(root / "hf"))
    checkpoint.save_model(model, str(root / "run" / "step-5"))
    checkpoint.save_model(model, str(root / "instruct" / "step-2"), extra_config={"task": "instruct", "base": None})
    checkpoint.save_model(model, str(root / "alpaca" / "step-1"), extra_config={"template": "alpaca"})
    checkpoint.save_model(model, str(root / "unknown-template" / "step-1"),
                          extra_config={"task": "instruct", "template": "chatml-9"})
    torch.manual_seed(1)
    clf = prepare_for_classification(gptfast.GPTModel(TINY), 2)
    checkpoint.save_model(clf, str(root / "classifier" / "step-3"),
                          extra_config={"task": "classify", "num_classes": 2, "labels": ["ham", "spam"],
                                        "pad_token_id": 50256, "max_length": 12})
    return root


def continuation(model, tok, text, n=8, seed=123, **sampling):
    """What generate should print for ``text``: the prompt and its continuation, decoded together."""
    torch.manual_seed(seed)
    ids = torch.tensor([tok.encode(text)])
    out = generate(model, ids, n, eos_id=tok.eot_token, **sampling)
    return tok.decode(out[0].tolist())


def _cli(*args, env=None, cwd=None, input=None):
    env = env or dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "gptfast", *map(str, args)], env=env, cwd=cwd, input=input,
                          capture_output=True, text=True, timeout=300)


HEADER = re.compile(r"^==> prompt (\d+)/(\d+), sample (\d+)/(\d+), seed (-?\d+) <==$", re.M)


def outputs(stdout):
    """{(prompt, sample, seed): text} from generate's headed output."""
    parts = HEADER.split(stdout)
    assert parts[0] == "", stdout
    found = {}
    for i in range(1, len(parts), 6):
        p, _, s, _, seed, body = parts[i:i + 6]
        assert body.startswith("\n") and body.endswith("\n"), body
        body = body[1:-1]
        if i + 6 < len(parts):  # an empty line separates one output from the next
            assert body.endswith("\n"), body
            body = body[:-1]
        found[int(p), int(s), int(seed)] = body
    return found


# ---- what --checkpoint accepts -------------------------------------------------------------------


def test_a_hugging_face_folder_generates_what_from_pretrained_gives(folders, tok, tmp_path):
    independent = gptfast.GPTModel.from_pretrained(str(folders / "hf"))  # loaded here, not by the command
    expected = continuation(independent, tok, PROMPT)
    assert expected != PROMPT  # new tokens came
    r = _cli("generate", "--checkpoint", folders / "hf", "--prompt", PROMPT, "--max-new-tokens", 8,
             "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n" and r.stderr == ""


def test_every_layout_of_the_same_weights_gives_the_same_text(folders, model, tok, capsys):
    expected = continuation(model, tok, PROMPT) + "\n"
    for path in ("hf", "hf/model.safetensors", "run", "run/step-5", "run/step-5/model.safetensors"):
        assert main(["generate", "--checkpoint", str(folders / path), "--prompt", PROMPT, "--max-new-tokens", "8",
                     "--device", "cpu"]) == 0, path
        assert capsys.readouterr().out == expected, path


def test_the_books_model_pth(tmp_path, tok, capsys):
    # a GPT-2 width (768), so the heads are known from the state dict alone; a small vocabulary keeps it light
    torch.manual_seed(2)
    book = gptfast.GPTModel(dict(vocab_size=300, context_length=16, emb_dim=768, n_heads=12, n_layers=1,
                                 drop_rate=0.0, qkv_bias=True)).eval()
    torch.save(book.state_dict(), tmp_path / "model.pth")
    torch.manual_seed(123)
    expected = tok.decode(generate(book, torch.tensor([tok.encode("a")]), 5)[0].tolist()) + "\n"
    for path in (tmp_path / "model.pth", tmp_path):  # the file, or a folder holding it
        assert main(["generate", "--checkpoint", str(path), "--prompt", "a", "--max-new-tokens", "5",
                     "--device", "cpu", "--ignore-eos"]) == 0
        assert capsys.readouterr().out == expected


def test_a_gpt2_name_offline_fails_in_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIKTOKEN_", "HF_", "GPTFAST_BACKEND"))}
    env.update(PYTHONPATH=os.pathsep.join([str(OFFLINE), str(REPO)]), HOME=str(home),
               XDG_CACHE_HOME=str(home / ".cache"), TIKTOKEN_CACHE_DIR=str(tmp_path))
    r = _cli("generate", "--checkpoint", "gpt2-medium", "--prompt", "Hello", "--device", "cpu", env=env, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("gptfast generate: error: ") and "gpt2-medium" in r.stderr


def test_a_missing_path_lists_what_is_accepted(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere'} does not exist" in err and "Hugging Face GPT-2 folder" in err
    assert "model.pth" in err and "gpt2-xl" in err
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--checkpoint", str(tmp_path / "empty"), "--prompt", "x"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_a_prompt_outside_the_models_vocabulary_is_named(tmp_path, capsys):
    torch.manual_seed(0)
    checkpoint.save_model(gptfast.GPTModel(dict(TINY, vocab_size=97)), str(tmp_path / "small"))
    assert main(["generate", "--checkpoint", str(tmp_path / "small"), "--prompt", PROMPT]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "outside the model's vocabulary of 97 ids" in out.err


# ---- several prompts and samples -----------------------------------------------------------------


def test_two_prompts_give_two_outputs(folders, model, tok, tmp_path):
    r = _cli("generate", "--checkpoint", folders / "run", "--prompt", PROMPT, "--prompt", "Hello, I am",
             "--max-new-tokens", 6, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert outputs(r.stdout) == {(1, 1, 123): continuation(model, tok, PROMPT, n=6),
                                 (2, 1, 123): continuation(model, tok, "Hello, I am", n=6)}
    assert r.stdout.startswith("==> prompt 1/2, sample 1/1, seed 123 <==\nEvery effort moves you")


def test_a_prompt_file_gives_one_output_per_non_empty_line(folders, tmp_path, capsys, monkeypatch):
    lines = ["Every effort moves you", "", "   ", "The weather today", "Hello, I am"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = ["generate", "--checkpoint", str(folders / "run"), "--max-new-tokens", "5", "--device", "cpu"]
    assert main(argv + ["--prompt-file", str(tmp_path / "prompts.txt")]) == 0
    from_file = capsys.readouterr().out
    assert main(argv + ["--prompt", lines[0], "--prompt", lines[3], "--prompt", lines[4]]) == 0
    assert from_file == capsys.readouterr().out
    assert [k[0] for k in outputs(from_file)] == [1, 2, 3]
    # --prompt values come first, then the file's lines; - reads standard input
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("The weather today\nHello, I am\n"))
    assert main(argv + ["--prompt", lines[0], "--prompt-file", "-"]) == 0
    assert capsys.readouterr().out == from_file


def test_num_samples_draw_sample_i_under_seed_plus_i(folders, capsys):
    argv = ["generate", "--checkpoint", str(folders / "run"), "--prompt", PROMPT, "--max-new-tokens", "8",
            "--temperature", "1.5", "--top-k", "200", "--device", "cpu"]
    assert main(argv + ["--num-samples", "3", "--seed", "7"]) == 0
    samples = outputs(capsys.readouterr().out)
    assert list(samples) == [(1, 1, 7), (1, 2, 8), (1, 3, 9)]
    assert len(set(samples.values())) > 1  # sampling, not three copies of one text
    for (_, _, seed), text in samples.items():  # each is what that seed gives alone
        assert main(argv + ["--seed", str(seed)]) == 0
        assert capsys.readouterr().out == text + "\n"


def test_several_samples_at_temperature_zero_warn(folders, capsys):
    assert main(["generate", "--checkpoint", str(folders / "run"), "--prompt", "a", "--max-new-tokens", "2",
                 "--num-samples", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "--num-samples 2 at --temperature 0 gives 2 identical outputs" in out.err
    assert len(set(outputs(out.out).values())) == 1


# ---- flags before anything -----------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "a", "--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    (["--prompt", "a", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--prompt", "a", "--top-k", "0"], "--top-k must be a positive number of tokens, got 0"),
    (["--prompt", "a", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--prompt", "a", "--temperature", "nan"], "--temperature must be >= 0"),
    (["--prompt", "a", "--max-new-tokens", "-3"], "--max-new-tokens must be >= 0, got -3"),
    ([], "no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "a", "--prompt", ""], "--prompt number 2 is empty"),
    (["--prompt-file", "MISSING"], "--prompt-file MISSING does not exist"),
    (["--prompt-file", "BLANK"], "has no prompts: write one prompt per line"),
    (["--prompt", "a", "--device", "banana"], "--device 'banana' is not a device"),
])
def test_bad_flags_are_named_before_anything_is_loaded_or_printed(flags, message, tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    flags = [str(tmp_path / "missing.txt") if f == "MISSING" else str(tmp_path / "blank.txt") if f == "BLANK" else f
             for f in flags]
    message = message.replace("MISSING", str(tmp_path / "missing.txt"))
    # the checkpoint does not exist: reaching it would report that instead
    assert main(["generate", "--checkpoint", str(tmp_path / "nowhere"), *flags]) == 2
    out = capsys.readouterr()
    assert out.out == "" and message in out.err and "nowhere" not in out.err
    assert len(out.err.strip().splitlines()) == 1


# ---- the run's task ------------------------------------------------------------------------------


def test_a_classifier_run_points_to_classify(folders, tmp_path):
    r = _cli("generate", "--checkpoint", folders / "classifier", "--prompt", "win cash now", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "is a classifier" in r.stderr and f"gptfast classify --checkpoint {folders / 'classifier'} TEXT" in r.stderr


def test_an_instruct_run_answers_through_its_template(folders, model, tok, tmp_path):
    instruction = "Name a color."
    prompt = apply_template("alpaca", instruction)
    full = continuation(model, tok, prompt, n=10)
    r = _cli("generate", "--checkpoint", folders / "instruct", "--prompt", instruction, "--max-new-tokens", 10,
             "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == extract_response(full, prompt) + "\n"
    assert instruction not in r.stdout  # the template is not printed, only the response
    r = _cli("generate", "--checkpoint", folders / "instruct", "--prompt", instruction, "--max-new-tokens", 10,
             "--device", "cpu", "--raw", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == continuation(model, tok, instruction, n=10) + "\n"


def test_a_named_template_and_an_unknown_one(folders, model, tok, capsys):
    prompt = apply_template("alpaca", "Say hi.")
    assert main(["generate", "--checkpoint", str(folders / "alpaca"), "--prompt", "Say hi.", "--max-new-tokens", "6",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == extract_response(continuation(model, tok, prompt, n=6), prompt) + "\n"
    argv = ["generate", "--checkpoint", str(folders / "unknown-template"), "--prompt", "Say hi.", "--max-new-tokens",
            "3", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "names the prompt template 'chatml-9'" in err and "pass --raw" in err
    assert main(argv + ["--raw"]) == 0
    assert capsys.readouterr().out == continuation(model, tok, "Say hi.", n=3) + "\n"


@pytest.mark.parametrize("seed", range(40))
def test_response_stream_prints_what_extract_response_returns(seed):
    rng = random.Random(seed)
    pieces = ["### Response:", "###", " Response", ":", "\n", " ", "\n\n", "red", "#", "##", "Resp", "onse:", "a b"]
    generated = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
    stream, shown = ResponseStream(), []
    i = 0
    while i < len(generated):  # in chunks of random sizes, as tokens arrive
        n = rng.randint(1, 4)
        shown.append(stream.push(generated[i:i + n]))
        i += n
    shown.append(stream.flush())
    prompt = "Below is an instruction."
    assert "".join(shown) == extract_response(prompt + generated, prompt), repr(generated)
