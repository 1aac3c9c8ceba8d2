"""Offline by default: GPT-2's tokenizer, training, tokenizing and generating never touch the network.

The subprocess tests run with the network refused (``tests/offline/sitecustomize.py`` on ``PYTHONPATH``
makes every connection off this machine fail), an empty home folder and an empty tiktoken cache, as on
a fresh machine with no internet.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from gptfast import tokenizer as tokmod
from gptfast.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent

# "Hello, do you like tea?" in GPT-2's ids, as the book prints them (chapter 2) and tiktoken gives them.
HELLO = "Hello, do you like tea? <|endoftext|> In the sunlit terraces"
HELLO_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114]

OFFLINE = pathlib.Path(__file__).resolve().parent / "offline"  # its sitecustomize refuses the network


@pytest.fixture
def offline_env(tmp_path):
    """Environment of a fresh, offline machine: sockets refused, empty HOME and tiktoken cache."""
    home = tmp_path / "home"
    home.mkdir()
    cache = tmp_path / "empty-tiktoken-cache"
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIKTOKEN_", "HF_", "GPTFAST_BACKEND"))}
    env.update(PYTHONPATH=os.pathsep.join([str(OFFLINE), str(REPO)]), HOME=str(home),
               TIKTOKEN_CACHE_DIR=str(cache), XDG_CACHE_HOME=str(home / ".cache"), PYTHONUNBUFFERED="1")
    return env


def _run(args, env, cwd, timeout=300):
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_the_socket_block_works(offline_env, tmp_path):
    """The offline tests only mean something if the network really is refused in them."""
    r = _run(["-c", "import tiktoken; tiktoken.get_encoding('gpt2')"], offline_env, tmp_path)
    assert r.returncode != 0 and "network use in an offline run" in r.stderr, r.stderr[-2000:]


def test_gpt2_tokenizer_loads_offline(offline_env, tmp_path):
    code = textwrap.dedent(f"""
        import json
        from gptfast.tokenizer import Tokenizer, tiktoken_gpt2
        out = {{}}
        for impl in ("fast", "reference"):
            out[impl] = Tokenizer.gpt2(impl=impl).encode({HELLO!r}, allowed_special="all")
        out["tiktoken"] = tiktoken_gpt2().encode({HELLO!r}, allowed_special="all")
        print(json.dumps(out))
    """)
    r = _run(["-c", code], offline_env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = json.loads(r.stdout.strip().splitlines()[-1])
    assert ids == {"fast": HELLO_IDS, "reference": HELLO_IDS, "tiktoken": HELLO_IDS}
    assert not list(pathlib.Path(offline_env["TIKTOKEN_CACHE_DIR"]).iterdir()), "the tiktoken cache was written"


def test_shipped_ranks_are_r50k_base():
    data = tokmod.gpt2_ranks_bytes()
    assert hashlib.sha256(data).hexdigest() == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
    assert len(data.splitlines()) == 50256


def test_tiktoken_gpt2_is_tiktokens_encoding():
    """The offline oracle is tiktoken's own gpt2 encoding: compared field by field and on text."""
    tiktoken = pytest.importorskip("tiktoken")
    if os.environ.get("GPTFAST_TIKTOKEN_FROM_PACKAGE"):
        pytest.skip(reason="tiktoken's own gpt2 files are not cached here and there is no network: "
                           "set TIKTOKEN_CACHE_DIR to a cache holding them")
    try:
        theirs = tiktoken.get_encoding("gpt2")
    except Exception as e:  # no cache and no network
        pytest.skip(reason=f"tiktoken's own gpt2 encoding cannot load here ({type(e).__name__}); "
                           "set TIKTOKEN_CACHE_DIR to a cache holding it")
    ours = tokmod.tiktoken_gpt2()
    assert (ours.name, ours.n_vocab, ours.eot_token) == (theirs.name, theirs.n_vocab, theirs.eot_token)
    assert ours._pat_str == theirs._pat_str
    assert ours._mergeable_ranks == theirs._mergeable_ranks
    assert ours._special_tokens == theirs._special_tokens
    assert ours.encode(HELLO, allowed_special="all") == theirs.encode(HELLO, allowed_special="all") == HELLO_IDS


def test_damaged_ranks_file_is_a_clear_error(monkeypatch, tmp_path):
    pkg = tmp_path / "gptfast"
    (pkg / "assets").mkdir(parents=True)
    good = tokmod.gpt2_ranks_bytes()
    (pkg / "assets" / "r50k_base.tiktoken").write_bytes(good[:-10])

    import importlib.resources

    monkeypatch.setattr(importlib.resources, "files", lambda name: pkg)
    tokmod.gpt2_ranks_bytes.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"damaged \(sha256 .*reinstall the package"):
            tokmod.gpt2_ranks_bytes()
        (pkg / "assets" / "r50k_base.tiktoken").unlink()
        with pytest.raises(RuntimeError, match=r"missing from this install.*reinstall the package"):
            tokmod.gpt2_ranks_bytes()
    finally:
        monkeypatch.undo()
        tokmod.gpt2_ranks_bytes.cache_clear()
    assert tokmod.gpt2_ranks_bytes() == good


def test_cli_tokenize_train_generate_offline(offline_env, tmp_path):
    """The commands a new user runs first, end to end, with the network refused."""
    text = tmp_path / "corpus.txt"
    text.write_text("Every effort moves you toward the light, and the light moves you back.\n" * 40,
                    encoding="utf-8")
    r = _run(["-m", "gptfast", "tokenize", str(text), "--out", str(tmp_path / "shards"), "--no-progress"],
             offline_env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["num_tokens"] == len(Tokenizer.gpt2().encode_ordinary(text.read_text(encoding="utf-8"))) + 1

    run = tmp_path / "runs" / "a"
    r = _run(["-m", "gptfast", "train", str(text), "--out", str(run), "--emb-dim", "32", "--n-layers", "1",
              "--n-heads", "2", "--context-length", "16", "--batch-size", "2", "--steps", "2", "--warmup", "1",
              "--eval-every", "2", "--eval-iters", "1", "--sample-tokens", "3", "--no-progress", "--device", "cpu"],
             offline_env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(["-m", "gptfast", "generate", "--checkpoint", str(run), "--prompt", "Every effort",
              "--max-new-tokens", "3", "--device", "cpu"], offline_env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().startswith("Every effort"), r.stdout


def test_download_offline_fails_in_one_line(offline_env, tmp_path):
    """An explicit download, with no network: one line naming the files to place and where they come from."""
    pytest.importorskip("huggingface_hub")
    code = textwrap.dedent("""
        import gptfast
        from gptfast.weights import WeightsError
        try:
            gptfast.GPTModel.from_pretrained("gpt2-medium")
        except WeightsError as e:
            print("ERROR:" + str(e))
    """)
    r = _run(["-c", code], offline_env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.split("ERROR:", 1)[1].rstrip("\n")
    assert "\n" not in line, line
    assert "config.json and model.safetensors" in line and "huggingface.co/openai-community/gpt2-medium" in line
    assert "pass that folder's path" in line
