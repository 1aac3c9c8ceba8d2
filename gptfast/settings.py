"""Run settings for ``gptfast train`` and ``gptfast finetune``: flags over a config file over a saved run.

Every flag of those commands can also be set in a TOML file passed with ``--config run.toml`` (or a
JSON file, such as the ``settings.json`` a run folder holds). Keys are the flags' names without the
dashes, spelt with ``-`` or ``_``::

    # run.toml
    data = ["corpus/"]
    out = "runs/a"
    model = "gpt2"
    steps = 5000
    lr = 3e-4
    grad-accum = 4
    no-progress = true

Precedence, highest first: a flag given on the command line, the ``--config`` file, the settings a
run saved in its folder (when it is resumed), the command's defaults. To know which flags were
given, every flag's parser default is replaced by ``None``; the real defaults are kept aside::

    defaults = use_sentinels(parser)                 # once, after the flags are added
    settings = resolve(args, saved=read_saved(out))  # in run(): a Settings, values by flag name
    settings["lr"], settings.given, settings.overrides

A value from the file is checked as its flag would check it (its type, its choices), so a mistake in
the file is a one-line error naming the file and the key.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys

SETTINGS_FILE = "settings.json"

# Flags that say what this invocation does, never part of a run's saved settings.
NOT_SAVED = frozenset({"config", "resume"})

_DEFAULTS_ATTR = "_gptfast_defaults"


class SettingsError(ValueError):
    """A config file that cannot be used, or a setting with a wrong value; the message says which."""


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="read settings from a TOML (or JSON) file; flags given here override it")


def use_sentinels(parser: argparse.ArgumentParser) -> dict:
    """Record each flag's default and make it ``None`` in the parser, so ``None`` means "not given".

    Returns (and keeps on the parser) the defaults by destination name. Call after every flag is
    added; ``args._settings_parser`` then lets :func:`resolve` find them."""
    defaults = {}
    for action in parser._actions:
        if action.dest in (argparse.SUPPRESS, "help", "config") or action.dest.startswith("_"):
            continue
        if isinstance(action, argparse._SubParsersAction):
            continue
        defaults[action.dest] = action.default
        action.default = None
    setattr(parser, _DEFAULTS_ATTR, defaults)
    parser.set_defaults(_settings_parser=parser)
    return defaults


def _actions(parser) -> dict:
    return {a.dest: a for a in parser._actions if a.dest in getattr(parser, _DEFAULTS_ATTR)}


def _flag(action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return longs[0] if longs else action.dest


def read_config_file(path: str) -> dict:
    """The settings in a TOML or JSON file, keys as written. :class:`SettingsError` when it cannot be read."""
    if not os.path.isfile(path):
        raise SettingsError(f"--config {path}: no such file; pass a TOML file of settings (see docs/training.md)")
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SettingsError(f"--config {path} is not valid JSON ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("settings"), dict):
            data = data["settings"]  # a run folder's settings.json
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise SettingsError(f"--config {path} is not UTF-8 text ({e})") from None
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"--config {path} is not valid TOML: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path} must hold a table of settings, not a {type(data).__name__}")
    return data


def _check_value(action, value, where: str):
    """``value`` as ``action`` would have produced it from the command line, or :class:`SettingsError`."""
    flag = _flag(action)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise SettingsError(f"{where}: {flag} is a switch, so its value must be true or false, not {value!r}")
        return value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise SettingsError(f"{where}: {flag} needs at least one value")
        return [_check_scalar(action, v, flag, where) for v in items]
    return _check_scalar(action, value, flag, where)


def _check_scalar(action, value, flag, where):
    kind = action.type
    if isinstance(value, (dict, list)):
        raise SettingsError(f"{where}: {flag} takes one value, not a {'table' if isinstance(value, dict) else 'list'}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{where}: {flag} must be an integer, not {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{where}: {flag} must be a number, not {value!r}")
        value = float(value)
    elif kind is None or kind is str:
        if not isinstance(value, str):
            raise SettingsError(f"{where}: {flag} must be a string (in quotes), not {value!r}")
    else:  # a custom converter: it takes the text, as on the command line
        try:
            value = kind(value if isinstance(value, str) else str(value))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise SettingsError(f"{where}: {flag}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise SettingsError(f"{where}: {flag} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
    return value


def settings_from_file(path: str, parser) -> dict:
    """The file's settings checked against ``parser``'s flags, by destination name."""
    actions = _actions(parser)
    out = {}
    for key, value in read_config_file(path).items():
        if value is None:  # a JSON null: not set (the command's default applies)
            continue
        dest = str(key).replace("-", "_")
        if dest in NOT_SAVED or dest not in actions:
            known = sorted(d.replace("_", "-") for d in actions if d not in NOT_SAVED)
            close = difflib.get_close_matches(str(key).replace("_", "-"), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (settings: {', '.join(known)})"
            raise SettingsError(f"--config {path}: unknown setting {key!r}{hint}")
        out[dest] = _check_value(actions[dest], value, f"--config {path}")
    return out


class Settings(dict):
    """The effective settings by destination name, with where each came from.

    ``given``: set on the command line; ``from_file``: from ``--config``; ``from_run``: restored from
    the run being resumed; ``overrides``: ``(flag, run's value, new value)`` for each restored setting
    that this invocation changed."""

    def __init__(self, values, given=(), from_file=(), from_run=(), overrides=()):
        super().__init__(values)
        self.given = set(given)
        self.from_file = set(from_file)
        self.from_run = set(from_run)
        self.overrides = list(overrides)

    def chosen(self, key) -> bool:
        """True when ``key`` was set by the user (a flag, the file, or the resumed run), not defaulted."""
        return key in self.given or key in self.from_file or key in self.from_run

    def as_namespace(self, args) -> argparse.Namespace:
        """``args`` with every setting filled in (for code that reads ``args.name``)."""
        merged = argparse.Namespace(**vars(args))
        for key, value in self.items():
            setattr(merged, key, value)
        return merged

    def savable(self, exclude=()) -> dict:
        """The settings to keep with a run: all but this invocation's own flags, ``exclude`` and the
        unset ones (None), which a config file cannot hold (TOML has no null)."""
        return {k: v for k, v in self.items() if k not in NOT_SAVED and k not in exclude and v is not None}


def resolve(args, *, saved: dict | None = None, restore_exclude=()) -> Settings:
    """Merge the defaults, a resumed run's ``saved`` settings (all but ``restore_exclude``), the
    ``--config`` file and the flags given, in that order. :class:`SettingsError` on a bad file."""
    parser = args._settings_parser
    actions = _actions(parser)
    defaults = getattr(parser, _DEFAULTS_ATTR)
    from_file = settings_from_file(args.config, parser) if getattr(args, "config", None) else {}
    # an optional positional (nargs="*") left out arrives as [] rather than None
    given = {k: v for k, v in vars(args).items()
             if k in defaults and v is not None and not (v == [] and actions[k].nargs == "*")}
    restored = {}
    for key, value in (saved or {}).items():
        if key in defaults and key not in NOT_SAVED and key not in restore_exclude:
            restored[key] = value
    values = {**defaults, **restored, **from_file, **given}
    overrides = []
    for key in sorted(restored):
        if (key in given or key in from_file) and values[key] != restored[key]:
            overrides.append((_flag(actions[key]), restored[key], values[key]))
    return Settings(values, given, from_file, restored, overrides)


def describe_overrides(settings: Settings) -> list[str]:
    """One line per restored setting that this invocation changed, for the resume message."""
    return [f"{flag} {new!r} overrides this run's {old!r}" for flag, old, new in settings.overrides]


def save_settings(run_dir: str, command: str, settings: Settings, exclude=()) -> None:
    """Write ``run_dir/settings.json`` atomically: the effective settings, reusable as ``--config``."""
    from .files import atomic_write_json

    atomic_write_json(os.path.join(run_dir, SETTINGS_FILE),
                      {"command": command, "settings": settings.savable(exclude)})


def read_saved(run_dir: str) -> dict | None:
    """The settings a run saved, or None when it has none (runs made before settings were saved)."""
    path = os.path.join(run_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SettingsError(f"{path} cannot be read ({e}); restore it from a backup, or delete it to resume "
                            f"with the flags you give") from None
    settings = data.get("settings") if isinstance(data, dict) else None
    if not isinstance(settings, dict):
        raise SettingsError(f"{path} holds no settings table; delete it to resume with the flags you give")
    return settings
