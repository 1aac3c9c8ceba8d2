"""Training: the book's functions (a published loss), appendix D's schedule, and the trainer's checkpoints,
exact resume, metrics and failure handling."""

import json
import math
import os

import numpy as np
import pytest
import tiktoken
import torch
from safetensors.torch import load_file

import gptfast
from gptfast import checkpoint
from gptfast.cli import main
from gptfast.data import TokenShards, create_dataloader_v1, write_shards
from gptfast.train import (STATE_FILE, TrainConfig, Trainer, TrainingError, WarmupCosine, calc_loss_loader,
                           latest_checkpoint, plot_losses, train_model, train_model_simple)

TINY = dict(vocab_size=256, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rng = np.random.default_rng(0)
    # a learnable corpus: repeated short patterns, so the loss falls within a few steps
    docs = [np.tile(rng.integers(0, 255, size=7), 60) for _ in range(4)]
    folder = tmp_path_factory.mktemp("data") / "shards"
    write_shards(docs, str(folder), "gpt2", 256, 255, shard_tokens=800)
    return folder


def _trainer(shards, out, **kw):
    torch.manual_seed(0)
    model = gptfast.GPTModel(dict(TINY, drop_rate=kw.pop("drop_rate", 0.0)))
    train, val = TokenShards(str(shards)).split(0.1)
    cfg = dict(out_dir=str(out), steps=20, batch_size=4, warmup=5, lr=3e-3, eval_every=5, eval_iters=2,
               progress=False, sample_tokens=0)
    cfg.update(kw)
    return Trainer(model, train, val, TrainConfig(**cfg))


# ---- the book -------------------------------------------------------------------------------------


def test_initial_validation_loss_is_the_books(shared_data):
    """Chapter 5: the untrained 124M model (seed 123, context 256) has validation loss 10.98110580444336."""
    tok = tiktoken.get_encoding("gpt2")
    text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
    split_idx = int(0.90 * len(text))
    val_loader = create_dataloader_v1(text[split_idx:], batch_size=2, max_length=256, stride=256, drop_last=False,
                                      shuffle=False, tokenizer=tok)
    torch.manual_seed(123)
    model = gptfast.GPTModel(dict(gptfast.GPT_CONFIG_124M, context_length=256)).eval()
    with torch.no_grad():
        assert calc_loss_loader(val_loader, model, "cpu") == pytest.approx(10.98110580444336, abs=2e-5)
    assert math.isnan(calc_loss_loader([], model, "cpu"))


class ByteTokenizer:
    """Bytes as tokens (vocabulary 256): the book's loops need only encode and decode."""

    def encode(self, text, allowed_special=()):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def _tiny_loaders():
    tok = ByteTokenizer()
    text = "Every effort moves you forward, step by step. " * 3
    kw = dict(batch_size=2, max_length=8, stride=8, tokenizer=tok)
    return tok, create_dataloader_v1(text, shuffle=True, **kw), create_dataloader_v1(text[:200], shuffle=False,
                                                                                       drop_last=False, **kw)


def test_train_model_simple_returns_the_books_lists(capsys):
    tok, train_loader, val_loader = _tiny_loaders()
    torch.manual_seed(123)
    model = gptfast.GPTModel(dict(TINY, context_length=64))
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, opt, "cpu", num_epochs=2, eval_freq=3, eval_iter=1,
        start_context="Every effort moves you", tokenizer=tok)
    steps = 2 * len(train_loader)
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == len(range(0, steps, 3))
    assert tokens_seen[0] == 16 and tokens_seen[1] == 16 * 4
    out = capsys.readouterr().out
    assert out.startswith("Ep 1 (Step 000000): Train loss ") and "Ep 2 (Step 000015)" in out
    assert out.count("Every effort moves you") == 2  # a sample after each epoch


def test_train_model_schedule_and_clipping_follow_appendix_d(monkeypatch, capsys):
    tok, train_loader, val_loader = _tiny_loaders()
    torch.manual_seed(123)
    model = gptfast.GPTModel(dict(TINY, context_length=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    clipped = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, max_norm: clipped.append(max_norm) or
                        real_clip(p, max_norm))
    n_epochs, warmup = 2, 3
    *_, lrs = train_model(model, train_loader, val_loader, opt, "cpu", n_epochs=n_epochs, eval_freq=5, eval_iter=1,
                          start_context="Every", tokenizer=tok, warmup_steps=warmup, initial_lr=1e-5, min_lr=1e-6)
    total = len(train_loader) * n_epochs
    expected = [1e-5 + s * (1e-3 - 1e-5) / warmup if s < warmup else
                1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
                for s in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert clipped == [1.0] * (total - warmup)
    assert "Ep 1 (Iter 000000)" in capsys.readouterr().out


def test_plot_losses_draws_both_curves(tmp_path):
    fig = plot_losses([0, 1, 2], [10, 20, 30], [3.0, 2.0, 1.5], [3.1, 2.5, 2.2], path=tmp_path / "loss.pdf")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["Training loss", "Validation loss"]
    assert (tmp_path / "loss.pdf").stat().st_size > 0


def test_warmup_cosine_multiplier():
    f = WarmupCosine(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1) and f(99) == pytest.approx(0.1)


# ---- the trainer ----------------------------------------------------------------------------------


def test_resume_continues_exactly(shards, tmp_path):
    """20 straight steps == 10 steps, a stop, and a resume to 20 (CPU, dropout 0): same losses, same weights."""
    straight = _trainer(shards, tmp_path / "a").fit()
    _trainer(shards, tmp_path / "b").fit(until=10)
    assert latest_checkpoint(tmp_path / "b").endswith("step-10")
    resumed = _trainer(shards, tmp_path / "b").fit(resume_from=latest_checkpoint(tmp_path / "b"))
    assert straight[-1]["step"] == resumed[-1]["step"] == 20
    assert straight[-1]["train_loss"] == resumed[-1]["train_loss"]
    assert straight[-1]["val_loss"] == resumed[-1]["val_loss"]
    assert straight[-1]["val_loss"] < straight[0]["train_loss"] - 1.0  # it learned something
    a = load_file(tmp_path / "a" / "step-20" / "model.safetensors")
    b = load_file(tmp_path / "b" / "step-20" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl: one line per step, val_loss at evaluations, the resumed run's lines continue the first's
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 21))
    assert [r["step"] for r in lines if "val_loss" in r] == [5, 10, 15, 20]
    assert {"step", "train_loss", "lr", "tokens_per_s"} <= set(lines[0])
    assert (tmp_path / "b" / "loss.png").stat().st_size > 0


def test_checkpoint_layout_and_pruning(shards, tmp_path):
    _trainer(shards, tmp_path, steps=6, eval_every=2, keep_last=2).fit()
    assert sorted(os.listdir(tmp_path)) == ["loss.png", "metrics.jsonl", "step-4", "step-6"]
    step = tmp_path / "step-6"
    assert sorted(os.listdir(step)) == ["config.json", "model.safetensors", STATE_FILE]
    keys = load_file(step / "model.safetensors").keys()
    assert "tok_emb.weight" in keys and not any(k.endswith(".att.mask") for k in keys)
    state = torch.load(step / STATE_FILE, weights_only=True)
    assert state["step"] == 6 and isinstance(state["rng"]["cpu"][0], torch.Tensor)
    assert {"optimizer", "scheduler", "data"} <= set(state)
    model = checkpoint.load_model(latest_checkpoint(tmp_path))  # the layout GPTModel.from_pretrained reads
    assert model.cfg.emb_dim == 32


def test_a_crash_mid_write_keeps_the_previous_checkpoint(shards, tmp_path, monkeypatch):
    trainer = _trainer(shards, tmp_path, steps=10, eval_every=5)
    trainer.fit(until=5)
    import gptfast.train as train_mod

    def crash(obj, path):
        raise OSError("disk full")

    monkeypatch.setattr(train_mod, "_torch_save_atomic", crash)
    with pytest.raises(OSError, match="disk full"):
        _trainer(shards, tmp_path, steps=10, eval_every=5).fit(resume_from=str(tmp_path / "step-5"))
    assert latest_checkpoint(tmp_path).endswith("step-5")  # the half-written .step-10.tmp is not a checkpoint
    assert sorted(os.listdir(tmp_path / "step-5")) == ["config.json", "model.safetensors", STATE_FILE]


def test_nan_loss_stops_with_a_message_and_keeps_checkpoints(shards, tmp_path):
    _trainer(shards, tmp_path, steps=10, eval_every=5).fit(until=5)
    trainer = _trainer(shards, tmp_path, steps=10, eval_every=5)
    with torch.no_grad():
        trainer.model.tok_emb.weight[:, :] = float("nan")
    with pytest.raises(TrainingError, match="loss became nan at step 1.*step-5.*is kept"):
        trainer.fit()
    assert latest_checkpoint(tmp_path).endswith("step-5")


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout():
    cfg = dict(TINY, drop_rate=0.2)
    x = torch.randint(0, 256, (2, 16))
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = gptfast.GPTModel(cfg).train()
        model.gradient_checkpointing = flag
        torch.manual_seed(1)
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# ---- the command ----------------------------------------------------------------------------------

FLAGS = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "4", "--context-length", "16", "--drop-rate", "0",
         "--batch-size", "4", "--eval-every", "5", "--eval-iters", "2", "--warmup", "0", "--lr", "2e-3",
         "--min-lr", "2e-3", "--no-progress", "--sample-tokens", "3", "--sample-prompt", "a"]


def test_cli_trains_resumes_and_generates(shards, tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["train", str(shards), "--out", a, "--steps", "10", *FLAGS]) == 0
    assert main(["train", str(shards), "--out", b, "--steps", "5", *FLAGS]) == 0
    assert main(["train", str(shards), "--out", b, "--steps", "10", "--resume", *FLAGS]) == 0
    last = [json.loads(x) for x in open(os.path.join(a, "metrics.jsonl"))][-1]
    resumed = [json.loads(x) for x in open(os.path.join(b, "metrics.jsonl"))][-1]
    assert last["step"] == resumed["step"] == 10 and last["train_loss"] == resumed["train_loss"]
    out = capsys.readouterr().out
    assert "sample: a" in out and "step 10: training loss" in out
    # an existing run is never overwritten by accident
    assert main(["train", str(shards), "--out", a, "--steps", "30", *FLAGS]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    # resuming with another model size is refused, naming the difference
    assert main(["train", str(shards), "--out", a, "--steps", "30", "--resume", "--emb-dim", "64", *FLAGS[2:]]) == 2
    assert "emb_dim: checkpoint 32, flags 64" in capsys.readouterr().err


def test_cli_bad_input_exits_nonzero_with_a_message(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short to train on.", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [([str(tmp_path / "missing.txt")], "does not exist"), ([str(empty)], "is empty"),
             ([str(short)], "fewer than one window"), ]
    for data, message in cases:
        assert main(["train", *data, "--out", str(tmp_path / "run"), *FLAGS]) == 2
        assert message in capsys.readouterr().err
    assert main(["train", str(short), "--out", str(tmp_path / "run2"), "--resume", *FLAGS]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_ctrl_c_finishes_the_step_saves_it_and_the_resume_is_exact_with_dropout(shards, tmp_path, monkeypatch):
    """The first SIGINT lets the step under way finish and saves it; resuming from there gives the weights
    of an uninterrupted run bit for bit, dropout included (the RNG state saved is the step's end)."""
    import signal

    from gptfast.train import TrainingInterrupted

    straight = _trainer(shards, tmp_path / "a", drop_rate=0.1, save_every=100, steps=12)
    straight.fit()
    run = _trainer(shards, tmp_path / "b", drop_rate=0.1, save_every=100, steps=12)
    real = run._train_step

    def step(i):
        if i == 6:  # Ctrl-C in the middle of the 7th step
            os.kill(os.getpid(), signal.SIGINT)
        return real(i)

    monkeypatch.setattr(run, "_train_step", step)
    with pytest.raises(TrainingInterrupted) as stop:
        run.fit()
    assert stop.value.step == 7 and stop.value.checkpoint == str(tmp_path / "b" / "step-7")
    assert [s for s, _ in checkpoint.step_dirs(str(tmp_path / "b"))] == [7]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    resumed = _trainer(shards, tmp_path / "b", drop_rate=0.1, save_every=100, steps=12)
    resumed.fit(resume_from=str(tmp_path / "b" / "step-7"))
    a = load_file(str(tmp_path / "a" / "step-12" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "step-12" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_applies_the_configs_lr_and_schedule(shards, tmp_path):
    """A resumed Trainer follows its own config's lr (the CLI passes the run's saved one, or an override)."""
    _trainer(shards, tmp_path / "a").fit(until=5)
    trainer = _trainer(shards, tmp_path / "a", lr=1e-3, warmup=0)
    trainer.fit(resume_from=str(tmp_path / "a" / "step-5"), until=6)
    expected = 1e-3 * WarmupCosine(0, 20, 0.1)(6)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert trainer.scheduler.base_lrs == [1e-3, 1e-3]
