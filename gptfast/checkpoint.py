"""gptfast's own model folder: ``model.safetensors`` (the book's key names) + ``config.json``.

One layout for everything that saves a model -- the trainer's ``DIR/step-N/`` checkpoints, fine-tuning
runs -- and everything that reads one (``GPTModel.from_pretrained``, ``gptfast generate --checkpoint``).
The causal-mask buffers (``trf_blocks.N.att.mask``) are derived, so they are left out; a tied
``out_head.weight`` is left out too (``config.json`` says ``tie_weights``). Every file is written to a
temporary name and renamed, so a crash mid-write never leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
import os
import re

import torch

from .files import atomic_open, atomic_write_bytes, atomic_write_json  # noqa: F401  (this module's API too)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: a missing, truncated or corrupt file. The message names the
    file, what is wrong with it and what to pass instead."""


def publish_dir(tmp: str, final: str) -> None:
    """Move the finished folder ``tmp`` to ``final`` by renames, replacing a folder already there.

    A crash at any point leaves either the old ``final`` or the new one in place, never a mix.
    """
    import shutil

    if os.path.isdir(final):
        old = os.path.join(os.path.dirname(os.path.abspath(final)), f".{os.path.basename(final)}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def savable_state_dict(model, state_dict: dict | None = None) -> dict:
    """The model's tensors under the book's names, without mask buffers or a tied out_head, contiguous.

    ``state_dict`` replaces ``model.state_dict()`` (e.g. one gathered from a sharded or merged model).
    """
    tied = bool(getattr(getattr(model, "cfg", None), "tie_weights", False))
    out = {}
    for key, tensor in (model.state_dict() if state_dict is None else state_dict).items():
        if key.endswith(".att.mask") or (tied and key == "out_head.weight"):
            continue
        out[key] = tensor.detach().contiguous()
    return out


def save_model(model, folder: str, extra_config: dict | None = None, state_dict: dict | None = None) -> None:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` (each atomically).

    ``state_dict`` replaces ``model.state_dict()``, for weights gathered or merged elsewhere.
    """
    from safetensors.torch import save

    os.makedirs(folder, exist_ok=True)
    state = {k: v.cpu() for k, v in savable_state_dict(model, state_dict).items()}
    atomic_write_bytes(os.path.join(folder, MODEL_FILE), save(state, metadata={"format": "pt", "library": "gptfast"}))
    config = dict(model.cfg.to_dict())
    if extra_config:
        config.update(extra_config)
    atomic_write_json(os.path.join(folder, CONFIG_FILE), config)


def is_model_folder(folder: str) -> bool:
    """True for a folder in gptfast's layout (not Hugging Face's, whose config has ``n_embd``)."""
    path = os.path.join(folder, CONFIG_FILE)
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(folder, MODEL_FILE))):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True  # a damaged config: reading the folder as ours reports what is wrong with it
    return isinstance(raw, dict) and "emb_dim" in raw


def _lacks(folder: str, name: str) -> CheckpointError:
    return CheckpointError(f"{folder} lacks {name}: a gptfast checkpoint folder holds {CONFIG_FILE} (the model "
                           f"config) and {MODEL_FILE} (the weights); restore it, or pass another step-N folder")


def read_raw_config(folder: str) -> dict:
    """``folder/config.json`` as a dict; :class:`CheckpointError` when it is missing or not a JSON object."""
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise _lacks(folder, CONFIG_FILE) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON, so the checkpoint is corrupt ({e}); pass another "
                              f"step-N folder") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not the model config object")
    return raw


def read_config(folder: str):
    from .config import GPTConfig

    raw = read_raw_config(folder)
    fields = set(GPTConfig.__dataclass_fields__)
    try:
        return GPTConfig.coerce({k: v for k, v in raw.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(folder, CONFIG_FILE)} is not a usable model config: {e}") from None


def _safetensors_problem(e: Exception) -> str:
    return str(e).replace("Error while deserializing header: ", "").strip()


def check_weights_file(folder: str) -> None:
    """Raise :class:`CheckpointError` unless ``folder/model.safetensors`` exists and its header is whole
    (a truncated or overwritten file fails here, before any tensor is read)."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(folder, MODEL_FILE)
    if not os.path.isfile(path):
        raise _lacks(folder, MODEL_FILE)
    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt, not a readable safetensors file "
                              f"({_safetensors_problem(e)})") from None


def load_safetensors(path: str, device="cpu") -> dict:
    """``safetensors.torch.load_file`` with a :class:`CheckpointError` naming the file when it is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt, not a readable safetensors file "
                              f"({_safetensors_problem(e)})") from None


def load_model(folder: str, backend=None, device="cpu"):
    """Build a :class:`~gptfast.GPTModel` from a gptfast model folder (strict: every tensor must match)."""
    from .model import GPTModel

    cfg = read_config(folder)
    check_weights_file(folder)
    path = os.path.join(folder, MODEL_FILE)
    state = load_safetensors(path, device=device)
    with torch.device("meta"):
        model = GPTModel(cfg, backend=backend)
    load_state_dict_checked(model, state, source=path)
    return model


def load_state_dict_checked(model, state: dict, source: str) -> None:
    """Load ``state`` into ``model`` (possibly on the meta device), naming any missing, extra or misshaped tensor."""
    expected = savable_state_dict_shapes(model)
    missing = sorted(set(expected) - set(state))
    extra = sorted(k for k in set(state) - set(expected) if not k.endswith(".att.mask"))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
    for key, shape in expected.items():
        if key in state and tuple(state[key].shape) != shape:
            problems.append(f"{key} has shape {tuple(state[key].shape)} in the checkpoint but {shape} in the model")
    if problems:
        raise ValueError(f"{source} does not fit this model config: " + "; ".join(problems))
    state = {k: v for k, v in state.items() if not k.endswith(".att.mask")}
    model.load_state_dict(state, strict=False, assign=True)
    # Buffers and tied weights that were not in the file: rebuild them on the parameters' device.
    device = next(iter(state.values())).device if state else torch.device("cpu")
    _materialize_derived(model, device)


def savable_state_dict_shapes(model) -> dict:
    tied = bool(getattr(getattr(model, "cfg", None), "tie_weights", False))
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()
            if not k.endswith(".att.mask") and not (tied and k == "out_head.weight")}


def _materialize_derived(model, device) -> None:
    from .model import MultiHeadAttention, SinusoidalPositionalEmbedding
    from .reference import sinusoidal_positions

    for module in model.modules():
        if isinstance(module, MultiHeadAttention) and module.mask.is_meta:
            n = module.mask.shape[0]
            module.mask = torch.triu(torch.ones(n, n, device=device), diagonal=1)
        if isinstance(module, SinusoidalPositionalEmbedding) and module.table.is_meta:
            module.table = sinusoidal_positions(*module.table.shape, device=device)
    if model.cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight


def step_dirs(run_dir: str) -> list[tuple[int, str]]:
    """``(N, path)`` of every complete ``step-N`` folder of a run folder, oldest first.

    A half-written step (still under its temporary name, or without its weights file) is not listed.
    """
    if not os.path.isdir(run_dir):
        return []
    out = []
    for name in os.listdir(run_dir):
        m = _STEP_DIR.match(name)
        path = os.path.join(run_dir, name)
        if m and os.path.isfile(os.path.join(path, MODEL_FILE)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest ``step-N`` folder of a run folder, or None when it has none.

    >>> latest_checkpoint("/nonexistent") is None
    True
    """
    found = step_dirs(run_dir)
    return found[-1][1] if found else None
