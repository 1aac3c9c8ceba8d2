"""`gptfast train` as the user sees it: the lines it prints at each evaluation, --log writers, --save-best,
Ctrl-C and the resume command it names, settings from --config and from the run's settings.json, fp16 with a
gradient scaler, and DATA given as folders, globs and JSONL."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import gptfast
from gptfast.cli import main
from gptfast.data import TokenShards, write_shards
from gptfast.train import STATE_FILE, TrainConfig, Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "4", "--context-length", "16", "--drop-rate", "0",
        "--batch-size", "4", "--eval-every", "5", "--eval-iters", "2", "--warmup", "2", "--lr", "2e-3",
        "--sample-tokens", "0", "--no-progress"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = [np.tile(rng.integers(0, 255, size=7), 60) for _ in range(4)]
    folder = tmp_path_factory.mktemp("data") / "shards"
    write_shards(docs, str(folder), "gpt2", 256, 255, shard_tokens=800)
    return folder


def _state(run, step):
    return torch.load(os.path.join(run, f"step-{step}", STATE_FILE), weights_only=True)


def _without(flags, *names):
    out, i = [], 0
    while i < len(flags):
        if flags[i] in names:
            i += 2
            continue
        out.append(flags[i])
        i += 1
    return out


def _lines(path):
    return [json.loads(x) for x in open(path)]


def _cli(*args, cwd=None, timeout=300, **kw):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "gptfast", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


# ---- what a run prints and writes --------------------------------------------------------------------


def test_every_evaluation_prints_validation_loss_and_perplexity_without_a_bar(shards, tmp_path):
    out = tmp_path / "run"
    r = _cli("train", str(shards), "--out", str(out), "--steps", "10", "--log", "csv", *TINY)
    assert r.returncode == 0, r.stderr
    evals = [line for line in r.stdout.splitlines() if line.startswith("step ") and "perplexity" in line]
    assert [line.split(":")[0] for line in evals] == ["step 5/10", "step 10/10"]
    metrics = [m for m in _lines(out / "metrics.jsonl") if "val_loss" in m]
    for line, m in zip(evals, metrics):
        assert f"validation loss {m['val_loss']:.4f}, perplexity {math.exp(m['val_loss']):.2f}" in line
        assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert float(rows[4]["val_loss"]) == metrics[0]["val_loss"] and rows[3]["val_loss"] == ""
    assert float(rows[9]["train_loss"]) == _lines(out / "metrics.jsonl")[9]["train_loss"]


def test_the_progress_bar_shows_validation_loss_and_perplexity(shards, tmp_path, capsys):
    flags = [f for f in TINY if f != "--no-progress"]
    assert main(["train", str(shards), "--out", str(tmp_path / "run"), "--steps", "5", *flags]) == 0
    err = capsys.readouterr().err
    assert "val=" in err and "ppl=" in err  # the bar's postfix, on stderr


@pytest.mark.parametrize("writer,package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_logger_package_is_one_line_before_any_work(writer, package, shards, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as when it is not installed
    out = tmp_path / "run"
    assert main(["train", str(shards), "--out", str(out), "--steps", "2", "--log", f"csv,{writer}", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"gptfast train: error: --log {writer} needs the {package} package: "
                   f"pip install 'gptfast-from-scratch[{package}]'")
    assert not out.exists()


def test_an_unknown_log_writer_is_refused(shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", str(shards), "--out", str(tmp_path / "r"), "--log", "csv,excel", *TINY])
    assert e.value.code == 2
    assert "'excel' is not a metrics writer: use csv, tensorboard, wandb" in capsys.readouterr().err


def test_tensorboard_writes_events_when_installed(shards, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    assert main(["train", str(shards), "--out", str(tmp_path / "run"), "--steps", "5", "--log", "tensorboard",
                 *TINY]) == 0
    assert any(n.startswith("events.") for n in os.listdir(tmp_path / "run" / "tensorboard"))


def test_wandb_gets_every_logged_step_and_a_resume_continues_the_same_run(shards, tmp_path, monkeypatch):
    import types

    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    fake = types.ModuleType("wandb")
    fake.init, fake.util = init, types.SimpleNamespace(generate_id=lambda: "abc123")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    assert main(["train", str(shards), "--out", str(out), "--steps", "5", "--log", "wandb", *TINY]) == 0
    init_kw = calls[0][1]
    assert init_kw["id"] == "abc123" and init_kw["resume"] == "allow" and init_kw["config"]["lr"] == 2e-3
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged] == [1, 2, 3, 4, 5] and "val_loss" in logged[-1][2] and "val_ppl" in logged[-1][2]
    assert calls[-1] == ("finish",)
    fake.util.generate_id = lambda: "another"
    calls.clear()
    assert main(["train", "--out", str(out), "--steps", "7", "--resume"]) == 0  # --log wandb is restored
    assert calls[0][1]["id"] == "abc123"
    assert [c[1] for c in calls if c[0] == "log"] == [6, 7]


def test_save_best_keeps_the_lowest_validation_loss_across_a_resume(shards, tmp_path, capsys):
    out = str(tmp_path / "run")
    flags = [*TINY, "--save-best", "--eval-every", "2", "--lr", "3e-2"]  # a high lr: the loss goes up and down
    assert main(["train", str(shards), "--out", out, "--steps", "10", *flags]) == 0
    state = _state(out, 10)
    evals = [m for m in _lines(os.path.join(out, "metrics.jsonl")) if "val_loss" in m]
    best = min(evals, key=lambda m: m["val_loss"])
    assert state["best"] == {"val_loss": best["val_loss"], "step": best["step"]}
    capsys.readouterr()
    assert main(["train", str(shards), "--out", out, "--steps", "20", "--resume", *flags]) == 0
    assert f"best validation loss {best['val_loss']:.4f} at step {best['step']}" in capsys.readouterr().out
    evals = [m for m in _lines(os.path.join(out, "metrics.jsonl")) if "val_loss" in m]
    best = min(evals, key=lambda m: m["val_loss"])
    assert json.load(open(os.path.join(out, "best", "best.json"))) == {"step": best["step"],
                                                                       "val_loss": best["val_loss"]}
    # the folder is a loadable model: the weights of that step (a checkpoint of it, when one was kept)
    model = gptfast.GPTModel.from_pretrained(os.path.join(out, "best"))
    if os.path.isdir(os.path.join(out, f"step-{best['step']}")):
        kept = load_file(os.path.join(out, f"step-{best['step']}", "model.safetensors"))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())


# ---- Ctrl-C and resuming -----------------------------------------------------------------------------


def test_ctrl_c_saves_the_step_names_the_resume_command_and_resumes_exactly(shards, tmp_path):
    flags = [*TINY, "--eval-every", "1000", "--save-every", "1000"]
    straight = tmp_path / "straight"
    assert _cli("train", str(shards), "--out", str(straight), "--steps", "400", *flags).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "gptfast", "train", str(shards), "--out", "run", "--steps", "400",
                             *flags], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    steps = [int(n.split("-")[1]) for n in os.listdir(tmp_path / "run") if n.startswith("step-")]
    assert len(steps) == 1 and 3 <= steps[0] < 400
    command = "python -m gptfast train --out run --resume --no-progress"  # --no-progress: this machine's, repeated
    assert f"gptfast train: saved step-{steps[0]}; resume with: {command}" in err
    assert err.strip().endswith("gptfast train: interrupted")
    r = _cli(*command.split()[3:], cwd=tmp_path)  # what the message says to type
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {steps[0]} (run/step-{steps[0]}, {steps[0] * 4 * 16:,} tokens seen)" in r.stdout
    a = load_file(str(straight / "step-400" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "step-400" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_restores_the_settings_and_a_flag_overrides_one(shards, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", str(shards), "--out", out, "--steps", "6", "--lr", "5e-3", "--batch-size", "2",
                 *_without(TINY, "--lr", "--batch-size")]) == 0
    saved = json.load(open(os.path.join(out, "settings.json")))
    assert saved["command"] == "train" and saved["settings"]["lr"] == 5e-3 and saved["settings"]["batch_size"] == 2
    capsys.readouterr()
    # nothing but --out and --resume: the data, the sizes, the lr and the batch come from settings.json
    assert main(["train", "--out", out, "--resume", "--steps", "8", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "resuming from step 6" in text
    assert [line for line in text.splitlines() if "overrides" in line] == ["--steps 8 overrides this run's 6"]
    state = _state(out, 8)
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == 5e-3
    assert state["data"]["batch_size"] == 2
    # a flag given on resume wins, and says so
    assert main(["train", "--out", out, "--resume", "--steps", "10", "--lr", "1e-3"]) == 0
    captured = capsys.readouterr()
    assert "--lr 0.001 overrides this run's 0.005" in captured.out
    assert "warning" not in captured.err
    assert _state(out, 10)["optimizer"]["param_groups"][0]["initial_lr"] == 1e-3
    assert json.load(open(os.path.join(out, "settings.json")))["settings"]["lr"] == 1e-3


def test_a_run_without_settings_json_resumes_from_its_checkpoint(shards, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", str(shards), "--out", out, "--steps", "5", *TINY, "--lr", "4e-3"]) == 0
    os.remove(os.path.join(out, "settings.json"))  # as a run made before settings.json existed
    assert main(["train", str(shards), "--out", out, "--steps", "7", "--resume", "--no-progress"]) == 0
    assert "resuming from step 5" in capsys.readouterr().out
    state = _state(out, 7)
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == 4e-3  # from trainer_state.pt's config
    assert checkpoint_cfg(out, 7)["emb_dim"] == 32


def checkpoint_cfg(out, step):
    return json.load(open(os.path.join(out, f"step-{step}", "config.json")))


def test_resume_with_steps_not_past_the_checkpoint_is_an_error(shards, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", str(shards), "--out", out, "--steps", "6", *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--out", out, "--resume", "--steps", "4"]) == 2
    assert "--steps 4 is not past this run's step 6" in capsys.readouterr().err
    assert main(["train", "--out", out, "--resume"]) == 2
    assert "has already trained its 6 steps" in capsys.readouterr().err


def test_a_config_file_supplies_data_and_flags(shards, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'data = ["{shards}"]\nout = "{tmp_path / "run"}"\nsteps = 4\nemb-dim = 32\nn_layers = 2\n'
                   f'n-heads = 4\ncontext-length = 16\nbatch-size = 4\neval-every = 2\neval-iters = 1\n'
                   f'sample-tokens = 0\nno-progress = true\nlr = 1e-3\n')
    assert main(["train", "--config", str(cfg), "--lr", "2e-3"]) == 0  # the flag wins over the file
    saved = json.load(open(tmp_path / "run" / "settings.json"))["settings"]
    assert saved["steps"] == 4 and saved["lr"] == 2e-3 and saved["data"] == [str(shards)]
    assert _state(tmp_path / "run", 4)["optimizer"]["param_groups"][0]["initial_lr"] == 2e-3
    # the settings.json a run wrote is a config file too
    assert main(["train", "--config", str(tmp_path / "run" / "settings.json"), "--out", str(tmp_path / "b")]) == 0
    assert _state(tmp_path / "b", 4)["optimizer"]["param_groups"][0]["initial_lr"] == 2e-3
    capsys.readouterr()
    cfg.write_text('stesp = 4\n')
    assert main(["train", str(shards), "--out", str(tmp_path / "c"), "--config", str(cfg)]) == 2
    assert "unknown setting 'stesp'; did you mean 'steps'?" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "c")]) == 2
    assert "no training data given" in capsys.readouterr().err
    assert main(["train", str(shards)]) == 2
    assert "no run folder given: pass --out DIR" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_device_auto_is_the_default(shards, tmp_path, capsys):
    assert main(["train", str(shards), "--out", str(tmp_path / "r"), "--steps", "1", *TINY]) == 0
    expected = gptfast.devices.resolve_device("auto")
    assert f"on {expected}" in capsys.readouterr().out
    assert "device" not in json.load(open(tmp_path / "r" / "settings.json"))["settings"]


# ---- fp16 and the gradient scaler ---------------------------------------------------------------------


def _trainer(shards, out, **kw):
    torch.manual_seed(0)
    model = gptfast.GPTModel(dict(vocab_size=256, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                                  drop_rate=0.0))
    train, val = TokenShards(str(shards)).split(0.1)
    cfg = dict(out_dir=str(out), steps=10, batch_size=4, warmup=2, lr=3e-3, eval_every=5, eval_iters=2,
               progress=False, sample_tokens=0)
    cfg.update(kw)
    return Trainer(model, train, val, TrainConfig(**cfg), device="cpu")


def test_fp16_trains_with_a_scaler_saved_and_restored_for_an_exact_resume(shards, tmp_path):
    straight = _trainer(shards, tmp_path / "a", dtype="fp16")
    assert straight.dtype_name == "fp16" and straight.scaler is not None
    history = straight.fit()
    assert all(math.isfinite(r["train_loss"]) for r in history)
    assert history[-1]["val_loss"] < history[0]["train_loss"]
    state = _state(tmp_path / "a", 10)
    assert state["scaler"]["scale"] == straight.scaler.get_scale()
    _trainer(shards, tmp_path / "b", dtype="fp16").fit(until=5)
    resumed = _trainer(shards, tmp_path / "b", dtype="fp16")
    resumed.fit(resume_from=str(tmp_path / "b" / "step-5"))
    a = load_file(str(tmp_path / "a" / "step-10" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "step-10" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()


def test_fp16_skips_a_step_whose_gradient_is_inf_and_halves_the_scale(shards, tmp_path):
    trainer = _trainer(shards, tmp_path / "a", dtype="fp16")
    trainer._setup(None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    scale = trainer.scaler.get_scale()
    hook = trainer.model.tok_emb.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    loss = trainer._train_step(0)
    hook.remove()
    assert math.isfinite(loss)  # the loss was fine; only the gradient overflowed
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.scaler.get_scale() == scale / 2
    assert not trainer.optimizer.state  # AdamW never stepped: no moments
    trainer._train_step(1)  # the next clean step updates the weights
    assert not torch.equal(before["tok_emb.weight"], trainer.model.tok_emb.weight)


def test_fp16_unscales_before_clipping(shards, tmp_path, monkeypatch):
    trainer = _trainer(shards, tmp_path / "a", dtype="fp16", clip=1.0)
    trainer._setup(None)
    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        params = list(params)
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
        return real(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    trainer._train_step(0)
    assert norms and norms[0] < 1000  # the true gradient norm, not 65536 times it


def test_fp16_on_the_command_line(shards, tmp_path, capsys):
    assert main(["train", str(shards), "--out", str(tmp_path / "r"), "--steps", "3", "--dtype", "fp16", "--device",
                 "cpu", *TINY]) == 0
    assert "cpu, fp16" in capsys.readouterr().out
    assert "scaler" in _state(tmp_path / "r", 3)


# ---- DATA: folders, globs, JSONL --------------------------------------------------------------------

TEXT_FLAGS = ["--emb-dim", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "8", "--batch-size", "2",
              "--eval-every", "2", "--eval-iters", "1", "--sample-tokens", "0", "--no-progress", "--val-fraction", "0.3"]


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    words = "every effort moves you toward a quiet room where the painter kept his last canvas".split()
    for i in range(3):
        (folder / f"part{i}.txt").write_text(" ".join(words[i:] + words[:i]) * 3, encoding="utf-8")
    (folder / "notes.md").write_text("not training data", encoding="utf-8")
    return folder


def test_a_folder_and_a_quoted_glob_train_on_the_text_files(corpus, tmp_path, capsys):
    assert main(["train", str(corpus), "--out", str(tmp_path / "a"), "--steps", "2", *TEXT_FLAGS]) == 0
    assert main(["train", str(corpus / "part*.txt"), "--out", str(tmp_path / "b"), "--steps", "2", *TEXT_FLAGS]) == 0
    sources = [_state(tmp_path / r, 2)["data"]["sources"] for r in "ab"]
    assert sources[0] == sources[1]
    assert [os.path.basename(s["path"]) for s in sources[0]] == ["part0.txt", "part1.txt", "part2.txt"]
    capsys.readouterr()
    # a file added to the folder is named when the run resumes
    (corpus / "part3.txt").write_text("more words for the painter " * 5, encoding="utf-8")
    assert main(["train", "--out", str(tmp_path / "a"), "--steps", "3", "--resume"]) == 0
    assert f"added: {corpus / 'part3.txt'}" in capsys.readouterr().err


def test_a_glob_that_matches_nothing_and_an_empty_folder_are_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for data, message in [(str(tmp_path / "nope" / "*.txt"), "matches no file"),
                          (str(tmp_path / "empty"), "is a folder with no .txt or .jsonl files and no meta.json")]:
        assert main(["train", data, "--out", str(tmp_path / "r"), *TEXT_FLAGS]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_jsonl_documents_and_a_bad_line_named(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"document {i} says every effort moves you somewhere new", "id": i})
             for i in range(8)]
    docs.write_text("\n".join(lines[:4]) + "\n\n" + "\n".join(lines[4:]) + "\n", encoding="utf-8")
    assert main(["train", str(docs), "--out", str(tmp_path / "r"), "--steps", "2", *TEXT_FLAGS]) == 0
    meta = json.load(open(tmp_path / "r" / "data" / "meta.json"))
    shards = TokenShards(str(tmp_path / "r" / "data"))
    ids = np.concatenate([np.asarray(a) for a in shards.arrays])
    assert int((ids == 50256).sum()) == 8  # one end-of-text token after each line's document
    assert meta["sources"][0]["path"] == str(docs)
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + '\n{"text": 3}\n', encoding="utf-8")
    assert main(["train", str(bad), "--out", str(tmp_path / "b"), *TEXT_FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f'gptfast train: error: {bad}, line 2: its "text" is not a string; each line must be one ' \
                  f'object such as {{"text": "..."}}'
    bad.write_text(lines[0] + "\n" + lines[1][:-3] + "\n", encoding="utf-8")
    assert main(["train", str(bad), "--out", str(tmp_path / "b"), *TEXT_FLAGS]) == 2
    assert f"{bad}, line 2: not valid JSON" in capsys.readouterr().err


def test_a_shard_folder_stays_a_shard_folder(shards, tmp_path):
    assert main(["train", str(shards), "--out", str(tmp_path / "r"), "--steps", "1", *TINY]) == 0
    assert not (tmp_path / "r" / "data").exists()  # read as it is, not re-tokenized
    assert _state(tmp_path / "r", 1)["data"]["sources"][0]["path"] == str(shards)
