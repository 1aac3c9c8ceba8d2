"""Run settings (gptfast.settings): flags over a --config file over a resumed run's saved settings,
and --device auto's choice. The command-level behaviour is in test_train_cli.py and test_finetune_cli.py."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from gptfast import devices, settings


def _parser():
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("data", nargs="*")
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true")
    settings.add_config_flag(p)
    defaults = settings.use_sentinels(p)
    return p, defaults


def test_defaults_are_kept_aside_and_the_parser_reports_what_was_given():
    p, defaults = _parser()
    assert defaults["steps"] == 1000 and defaults["lr"] == 6e-4 and defaults["no_progress"] is False
    args = p.parse_args(["--steps", "5"])
    assert args.steps == 5 and args.lr is None and args.no_progress is None
    s = settings.resolve(args)
    assert s["steps"] == 5 and s["lr"] == 6e-4 and s["no_progress"] is False and s["dtype"] == "auto"
    assert s.given == {"steps"} and not s.from_file and not s.overrides


def test_a_flag_overrides_the_file_which_overrides_the_defaults(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('data = ["a.txt", "b.txt"]\nsteps = 20\nlr = 1\nno-progress = true\ndtype = "fp32"\n')
    p, _ = _parser()
    s = settings.resolve(p.parse_args(["--config", str(cfg), "--steps", "7"]))
    assert s["steps"] == 7                      # the flag wins
    assert s["lr"] == 1.0 and isinstance(s["lr"], float)  # an integer is a number too
    assert s["data"] == ["a.txt", "b.txt"] and s["no_progress"] is True and s["dtype"] == "fp32"
    assert s.given == {"steps"} and s.from_file == {"data", "lr", "no_progress", "dtype", "steps"}


@pytest.mark.parametrize("text, message", [
    ("stepz = 3\n", "unknown setting 'stepz'; did you mean 'steps'?"),
    ("steps = '3'\n", "--steps must be an integer, not '3'"),
    ("steps = true\n", "--steps must be an integer, not True"),
    ("lr = 'fast'\n", "--lr must be a number, not 'fast'"),
    ("dtype = 'fp8'\n", "--dtype must be one of auto, bf16, fp16, fp32, not 'fp8'"),
    ("no_progress = 1\n", "--no-progress is a switch, so its value must be true or false, not 1"),
    ("out = ['a']\n", "--out takes one value, not a list"),
    ("resume = true\n", "unknown setting 'resume'"),
    ("steps = \n", "is not valid TOML"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(tmp_path, text, message):
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    p, _ = _parser()
    with pytest.raises(settings.SettingsError) as e:
        settings.resolve(p.parse_args(["--config", str(cfg)]))
    assert message in str(e.value) and str(cfg) in str(e.value)
    assert "\n" not in str(e.value).strip() or "TOML" in message


def test_a_missing_config_file_says_so(tmp_path):
    p, _ = _parser()
    with pytest.raises(settings.SettingsError, match="no such file"):
        settings.resolve(p.parse_args(["--config", str(tmp_path / "nope.toml")]))


def test_a_resumed_run_restores_its_settings_and_names_each_override(tmp_path):
    p, _ = _parser()
    first = settings.resolve(p.parse_args(["d.txt", "--out", "r", "--steps", "40", "--lr", "0.001", "--resume"]))
    settings.save_settings(str(tmp_path), "train", first)
    saved_file = json.loads((tmp_path / settings.SETTINGS_FILE).read_text())
    assert saved_file["command"] == "train" and "resume" not in saved_file["settings"]
    saved = settings.read_saved(str(tmp_path))
    again = settings.resolve(p.parse_args(["--steps", "60", "--resume"]), saved=saved)
    assert again["lr"] == 0.001 and again["data"] == ["d.txt"] and again["steps"] == 60
    assert again.overrides == [("--steps", 40, 60)]
    assert settings.describe_overrides(again) == ["--steps 60 overrides this run's 40"]
    # the same value given again is not an override
    assert not settings.resolve(p.parse_args(["--lr", "0.001"]), saved=saved).overrides
    # a run folder's settings.json is itself a --config file
    s = settings.resolve(p.parse_args(["--config", str(tmp_path / settings.SETTINGS_FILE)]))
    assert s["steps"] == 40 and s["data"] == ["d.txt"]


def test_unset_settings_are_not_saved_and_a_json_null_is_unset(tmp_path):
    p, _ = _parser()
    s = settings.resolve(p.parse_args(["--steps", "3"]))
    assert s["out"] is None
    settings.save_settings(str(tmp_path), "train", s)
    saved = json.loads((tmp_path / settings.SETTINGS_FILE).read_text())["settings"]
    assert "out" not in saved and saved["steps"] == 3
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"settings": {"out": None, "steps": 4}}))
    again = settings.resolve(p.parse_args(["--config", str(cfg)]))
    assert again["out"] is None and again["steps"] == 4


def test_restore_exclude_leaves_machine_settings_to_this_invocation(tmp_path):
    p, _ = _parser()
    s = settings.resolve(p.parse_args([]), saved={"dtype": "bf16", "steps": 3}, restore_exclude=("dtype",))
    assert s["dtype"] == "auto" and s["steps"] == 3 and s.from_run == {"steps"}


def test_a_damaged_settings_file_is_named(tmp_path):
    (tmp_path / settings.SETTINGS_FILE).write_text("{not json")
    with pytest.raises(settings.SettingsError, match="cannot be read"):
        settings.read_saved(str(tmp_path))
    assert settings.read_saved(str(tmp_path / "none")) is None


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda:1"), (False, True, "mps"), (False, False, "cpu")])
def test_device_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(devices, "_mps_available", lambda: mps)
    assert str(devices.resolve_device("auto", local_rank=1)) == expected
    assert str(devices.resolve_device(None, local_rank=1)) == expected
