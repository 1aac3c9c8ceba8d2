"""Pretrained weights in and out: OpenAI's GPT-2 (Hugging Face's layout), the book's ``model.pth``,
gptfast's own folders and training runs.

:func:`from_pretrained` (also ``GPTModel.from_pretrained``) reads any of

* a **Hugging Face GPT-2 folder**: ``config.json`` (``n_embd``, ``n_layer``, ...) with
  ``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``;
* a **gptfast model folder** (:mod:`gptfast.checkpoint`), a **training run** (its newest ``step-N/``),
  or a fine-tuned classifier folder (``config.json`` has ``num_classes``);
* the book's **state dict**, ``model.pth`` (a file, or a folder holding one);
* a **name**: ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` (or the book's
  ``"gpt2-small (124M)"`` labels, or any ``owner/repo`` id), fetched with ``huggingface_hub``.

What the conversion does, in the book's terms (chapter 5, ``load_weights_into_gpt``): Hugging Face's
GPT-2 stores its linear layers as ``Conv1D`` with the weight as (in, out), so every weight is
transposed into ``nn.Linear``'s (out, in); the fused ``c_attn`` (E, 3E) is split into ``W_query``,
``W_key`` and ``W_value``; GPT-2's output layer is tied to the token embedding, so a missing
``lm_head`` means "copy ``wte`` into ``out_head``" (the book's model has its own ``out_head``);
the causal-mask buffers ``attn.bias``/``attn.masked_bias`` are dropped; ``qkv_bias=True``.

Safety: nothing is unpickled that could run code. Safetensors files are read directly; ``.bin`` and
``.pth`` files go through ``torch.load(weights_only=True)``, which refuses any pickle that names a
function or class outside plain tensors and containers -- such a file raises :class:`UnsafeCheckpointError`
and its code never runs.

Memory: the model is built on the meta device (no memory), and each tensor is read from a private
memory map of the file, copied once into its final layout, and its pages handed back to the kernel
before the next, so loading a safetensors checkpoint peaks at about the checkpoint's size
(gpt2-xl: 6.4 GB), never two copies of it.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import re
import zipfile

import torch

from . import checkpoint
from .config import GPT_CONFIG_124M, GPTConfig

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_BIN = "pytorch_model.bin"
BOOK_FILE = "model.pth"

# Hub repositories of OpenAI's four GPT-2 sizes; the book's labels ("gpt2-small (124M)") map here too.
HUB_REPOS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}

# emb_dim -> n_heads of GPT-2's sizes: the one thing a bare state dict does not tell.
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded into (or a model that cannot be saved as) GPT-2; says why."""


class UnsafeCheckpointError(WeightsError):
    """A pickled checkpoint that asks to run code or build arbitrary objects; it is refused unrun."""


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class MappedSafetensors:
    """A safetensors file's tensors as zero-copy views of a private (copy-on-write) memory map.

    ``safetensors.safe_open`` keeps every page it has read resident until the file is closed, so
    converting a whole checkpoint through it holds the file *and* the converted copy: twice the
    size. Here :meth:`get` returns a view, the caller copies it once into the model's layout, and
    :meth:`release` hands the view's pages back to the kernel. The format is the documented one: an
    8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, the data.
    """

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if n < 2 or 8 + n > size:
                raise WeightsError(f"{path} is not a safetensors file (its header length is invalid)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeightsError(f"{path} is not a safetensors file (its header is not JSON: {e})") from None
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = header
        for name, e in header.items():
            if not isinstance(e, dict) or e.get("dtype") not in _SAFETENSORS_DTYPES:
                raise WeightsError(f"{path}: tensor {name} has an unsupported dtype")
            begin, end = e["data_offsets"]
            if not 0 <= begin <= end <= size - self.data_start:
                raise WeightsError(f"{path}: tensor {name} lies outside the file (a truncated download?)")

    def keys(self):
        return list(self.entries)

    def get(self, name: str) -> torch.Tensor:
        """A view of tensor ``name`` into the map (no copy; copy it before :meth:`release`)."""
        e = self.entries[name]
        dtype = _SAFETENSORS_DTYPES[e["dtype"]]
        begin, end = e["data_offsets"]
        shape = tuple(e["shape"])
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count != torch.Size(shape).numel():
            raise WeightsError(f"{self.path}: tensor {name} has {count} values but shape {list(shape)}")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self.map, dtype=dtype, count=count, offset=self.data_start + begin)
        return flat.view(shape)

    def release(self, name: str) -> None:
        """Drop the pages that hold only tensor ``name`` from memory (re-read from the file if touched)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, end = self.entries[name]["data_offsets"]
        page = mmap.PAGESIZE
        lo = -(-(self.data_start + begin) // page) * page  # whole pages inside the tensor only
        hi = (self.data_start + end) // page * page
        if hi > lo:
            self.map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class _DictSource:
    """A state dict in memory (from ``torch.load`` or the book's params) behind MappedSafetensors's interface."""

    def __init__(self, state: dict, path: str):
        self.state, self.path = state, path

    def keys(self):
        return list(self.state)

    def get(self, name):
        return self.state[name]

    def release(self, name):
        pass


def torch_load_safely(path: str):
    """``torch.load(weights_only=True)``, memory-mapped when the file allows; code-running pickles refused."""
    kwargs = dict(map_location="cpu", weights_only=True)
    try:
        return torch.load(path, mmap=zipfile.is_zipfile(path), **kwargs)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} was refused: it is a pickle that asks to run code or build objects other than tensors, "
            f"and gptfast never unpickles code. If you trust it, convert it yourself to a plain state dict "
            f"of tensors (or to safetensors). Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"{path} could not be read as a PyTorch checkpoint: {e}") from None


def _state_dict_of(obj, path):
    """The tensor dict inside what ``torch.load`` returned (a state dict, or the book's checkpoint dict)."""
    if isinstance(obj, dict) and "model_state_dict" in obj:  # the book's model_and_optimizer.pth
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict (a dict of tensors); got {type(obj).__name__}")
    return obj


def _open_sources(folder):
    """The weight files of a Hugging Face folder, as sources (safetensors first)."""
    single = os.path.join(folder, HF_SAFETENSORS)
    index = os.path.join(folder, HF_SAFETENSORS_INDEX)
    if os.path.isfile(single):
        return [MappedSafetensors(single)]
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [MappedSafetensors(os.path.join(folder, s)) for s in shards]
    binary = os.path.join(folder, HF_BIN)
    if os.path.isfile(binary):
        return [_DictSource(_state_dict_of(torch_load_safely(binary), binary), binary)]
    raise WeightsError(f"{folder} has {HF_CONFIG} but no weights: expected {HF_SAFETENSORS}, "
                       f"{HF_SAFETENSORS_INDEX} or {HF_BIN}")


# --------------------------------------------------------------------------------------------------
# Hugging Face's GPT-2 <-> the book's names
# --------------------------------------------------------------------------------------------------

_BLOCK = re.compile(r"^h\.(\d+)\.(.+)$")
# Per-block tensors that map one to one; "T" marks a Conv1D weight (stored (in, out)) to transpose.
_BLOCK_MAP = {
    "ln_1.weight": ("norm1.scale", False), "ln_1.bias": ("norm1.shift", False),
    "ln_2.weight": ("norm2.scale", False), "ln_2.bias": ("norm2.shift", False),
    "attn.c_proj.weight": ("att.out_proj.weight", True), "attn.c_proj.bias": ("att.out_proj.bias", False),
    "mlp.c_fc.weight": ("ff.layers.0.weight", True), "mlp.c_fc.bias": ("ff.layers.0.bias", False),
    "mlp.c_proj.weight": ("ff.layers.2.weight", True), "mlp.c_proj.bias": ("ff.layers.2.bias", False),
}
_TOP_MAP = {
    "wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "final_norm.scale", "ln_f.bias": "final_norm.shift", "lm_head.weight": "out_head.weight",
}
_QKV = ("att.W_query", "att.W_key", "att.W_value")


def hf_to_book(name: str, tensor: torch.Tensor):
    """``[(book_key, view), ...]`` for one Hugging Face GPT-2 tensor (no copies); ``[]`` for dropped buffers.

    >>> [(k, tuple(v.shape)) for k, v in hf_to_book("transformer.h.0.attn.c_attn.weight", torch.zeros(4, 12))]
    [('trf_blocks.0.att.W_query.weight', (4, 4)), ('trf_blocks.0.att.W_key.weight', (4, 4)), ('trf_blocks.0.att.W_value.weight', (4, 4))]
    """
    key = name[len("transformer."):] if name.startswith("transformer.") else name
    if key in _TOP_MAP:
        return [(_TOP_MAP[key], tensor)]
    m = _BLOCK.match(key)
    if m is None:
        raise WeightsError(f"unexpected tensor {name}: not part of GPT-2's layout")
    i, rest = m.group(1), m.group(2)
    prefix = f"trf_blocks.{i}."
    if rest in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers, rebuilt by the model
        return []
    if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
        if tensor.shape[-1] % 3:
            raise WeightsError(f"{name} has shape {tuple(tensor.shape)}: its last dimension must be 3 x emb_dim "
                               f"(query, key and value side by side)")
        parts = tensor.split(tensor.shape[-1] // 3, dim=-1)  # q, k, v
        kind = rest.rsplit(".", 1)[1]
        return [(f"{prefix}{q}.{kind}", p.t() if kind == "weight" else p) for q, p in zip(_QKV, parts)]
    if rest in _BLOCK_MAP:
        target, transpose = _BLOCK_MAP[rest]
        if transpose and tensor.dim() != 2:
            raise WeightsError(f"{name} has shape {tuple(tensor.shape)}; a Conv1D weight must be 2-D (in, out)")
        return [(prefix + target, tensor.t() if transpose else tensor)]
    raise WeightsError(f"unexpected tensor {name}: not part of GPT-2's layout")


def _is_hf_layout(keys) -> bool:
    return any(k.endswith("wte.weight") for k in keys) and not any(k == "tok_emb.weight" for k in keys)


def config_from_hf(hf: dict, source: str = "config.json") -> dict:
    """GPTConfig fields from a Hugging Face ``GPT2Config`` dict; refuses variants the book's model cannot run."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise WeightsError(f"{source} describes a {hf.get('model_type')!r} model; only GPT-2 checkpoints load")
    try:
        e = int(hf["n_embd"])
        cfg = dict(vocab_size=int(hf["vocab_size"]), context_length=int(hf["n_positions"]), emb_dim=e,
                   n_heads=int(hf["n_head"]), n_layers=int(hf["n_layer"]))
    except KeyError as err:
        raise WeightsError(f"{source} lacks {err.args[0]!r}, which a GPT-2 config must have") from None
    unsupported = []
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported.append(f"activation_function={hf['activation_function']!r} (the book's GELU is the tanh one)")
    if hf.get("n_inner") not in (None, 4 * e):
        unsupported.append(f"n_inner={hf['n_inner']} (the feed-forward is 4 x n_embd = {4 * e})")
    if abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
        unsupported.append(f"layer_norm_epsilon={hf['layer_norm_epsilon']} (the book's LayerNorm uses 1e-5)")
    for flag, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                     ("reorder_and_upcast_attn", False)):
        if bool(hf.get(flag, ok)) != ok:
            unsupported.append(f"{flag}={hf[flag]}")
    if unsupported:
        raise WeightsError(f"{source} asks for a GPT-2 variant the book's model does not build: " + "; ".join(unsupported))
    cfg["drop_rate"] = float(hf.get("resid_pdrop", GPT_CONFIG_124M["drop_rate"]))
    cfg["qkv_bias"] = True
    return cfg


def config_to_hf(cfg: GPTConfig, tied: bool) -> dict:
    """A ``GPT2Config`` dict that transformers' ``GPT2LMHeadModel`` reads back as this model."""
    eot = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when the vocabulary has it
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "use_cache": True, "tie_word_embeddings": bool(tied),
        "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------------


def _own(tensor, device, dtype):
    """``tensor`` contiguous on ``device`` in ``dtype``, as a tensor of its own: a view (a transposed
    Conv1D weight, a third of ``c_attn``) is copied, a tensor that already owns its memory is kept."""
    dtype = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
    view = tensor._base is not None or not tensor.is_contiguous()
    return tensor.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=view)


def _empty_model(cfg, backend, num_classes=None):
    from .model import GPTModel

    with torch.device("meta"):
        model = GPTModel(cfg, backend=backend)
        if num_classes is not None:
            from .classify import replace_output_head

            replace_output_head(model, num_classes)
    return model


def _load_book_state(model, state: dict, source: str, device, dtype) -> None:
    """Load a state dict under the book's names onto the meta-device ``model`` (via gptfast.checkpoint)."""
    if dtype is not None or torch.device(device).type != "cpu":
        state = {k: _own(v, device, dtype) for k, v in state.items() if not k.endswith(".att.mask")}
    checkpoint.load_state_dict_checked(model, state, source=source)


def _load_sources(model, sources, source_name, device, dtype, tie_weights) -> None:
    """Convert Hugging Face GPT-2 tensors, one at a time, into ``model``."""
    state = {}
    for src in sources:
        for name in src.keys():
            for book_key, view in hf_to_book(name, src.get(name)):
                state[book_key] = _own(view, device, dtype)
            src.release(name)
    if "out_head.weight" not in state and not tie_weights:
        # GPT-2 ties its output layer to the token embedding; the book's model gets its own copy.
        if "tok_emb.weight" in state:
            state["out_head.weight"] = state["tok_emb.weight"].clone()
    elif tie_weights:
        state.pop("out_head.weight", None)
    checkpoint.load_state_dict_checked(model, state, source=source_name)


def _cfg_with(fields: dict, drop_rate, tie_weights, overrides) -> GPTConfig:
    fields = dict(fields)
    if drop_rate is not None:
        fields["drop_rate"] = drop_rate
    if tie_weights is not None:
        fields["tie_weights"] = tie_weights
    fields.update(overrides)
    try:
        return GPTConfig.coerce(fields)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"bad config: {e}") from None


def load_hf_folder(folder, backend=None, *, device="cpu", dtype=None, drop_rate=None, tie_weights=None, sources=None,
                   **overrides):
    """A Hugging Face GPT-2 folder (``config.json`` + weights) -> :class:`~gptfast.GPTModel`.

    ``sources`` replaces the folder's own weight files (a state dict file named otherwise)."""
    path = os.path.join(folder, HF_CONFIG)
    with open(path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise WeightsError(f"{path} is not valid JSON ({e})") from None
    cfg = _cfg_with(config_from_hf(hf, path), drop_rate, bool(tie_weights), overrides)
    model = _empty_model(cfg, backend)
    sources = _open_sources(folder) if sources is None else sources
    _load_sources(model, sources, folder, device, dtype, cfg.tie_weights)
    return model


def load_model_folder(folder, backend=None, *, device="cpu", dtype=None, drop_rate=None, tie_weights=None, **overrides):
    """A gptfast model folder (a trainer step, a fine-tuned model) -> :class:`~gptfast.GPTModel`.

    Like :func:`gptfast.checkpoint.load_model`, but memory-mapped, with ``drop_rate``/``dtype`` choices,
    and a classifier's head (``num_classes`` in ``config.json``) rebuilt.
    """
    cfg = checkpoint.read_config(folder)
    with open(os.path.join(folder, checkpoint.CONFIG_FILE)) as f:
        num_classes = json.load(f).get("num_classes")
    cfg = _cfg_with(cfg.to_dict(), drop_rate, tie_weights, overrides)
    model = _empty_model(cfg, backend, num_classes)
    src = MappedSafetensors(os.path.join(folder, checkpoint.MODEL_FILE))
    state = {}
    for name in src.keys():
        state[name] = _own(src.get(name), device, dtype)
        src.release(name)
    checkpoint.load_state_dict_checked(model, state, source=src.path)
    return model


def _infer_book_config(state: dict, source: str, n_heads=None) -> dict:
    """The book's config from a bare state dict's shapes (n_heads from GPT-2's sizes unless given)."""
    try:
        vocab, e = state["tok_emb.weight"].shape
        context = state["pos_emb.weight"].shape[0]
    except KeyError as err:
        raise WeightsError(f"{source} lacks {err.args[0]}, so it is not the book's GPTModel state dict") from None
    layers = {int(m.group(1)) for k in state if (m := re.match(r"trf_blocks\.(\d+)\.", k))}
    if n_heads is None and e not in _HEADS_BY_WIDTH:
        raise WeightsError(f"{source} has emb_dim {e}, which is not a GPT-2 size, so the number of heads is unknown: "
                           f"pass n_heads=... to from_pretrained")
    return dict(vocab_size=int(vocab), context_length=int(context), emb_dim=int(e),
                n_heads=n_heads or _HEADS_BY_WIDTH[e],
                n_layers=len(layers), drop_rate=GPT_CONFIG_124M["drop_rate"],
                qkv_bias="trf_blocks.0.att.W_query.bias" in state)


def load_torch_file(path, backend=None, *, device="cpu", dtype=None, drop_rate=None, tie_weights=None, **overrides):
    """The book's ``model.pth`` (or any state dict file: the book's names or Hugging Face's) -> model."""
    state = _state_dict_of(torch_load_safely(path), path)
    if _is_hf_layout(state):
        folder = os.path.dirname(path)
        if not os.path.isfile(os.path.join(folder, HF_CONFIG)):
            raise WeightsError(f"{path} holds Hugging Face GPT-2 tensors but {folder or '.'} has no {HF_CONFIG} "
                               f"to say the model's size")
        return load_hf_folder(folder, backend, device=device, dtype=dtype, drop_rate=drop_rate,
                              tie_weights=tie_weights, sources=[_DictSource(state, path)], **overrides)
    cfg = _cfg_with(_infer_book_config(state, path, overrides.get("n_heads")), drop_rate, tie_weights, overrides)
    if cfg.tie_weights:  # out_head shares tok_emb: the file's own copy is not loaded
        state = {k: v for k, v in state.items() if k != "out_head.weight"}
    model = _empty_model(cfg, backend)
    _load_book_state(model, state, path, device, dtype)
    return model


def load_weights_into_gpt(gpt, params) -> None:
    """The book's chapter-5 function: copy OpenAI's ``params`` dict into ``gpt`` (in place).

    ``params`` is what the book's ``download_and_load_gpt2`` returns: ``wte``, ``wpe``, ``g``, ``b`` and
    ``blocks[i]`` with ``attn``/``mlp``/``ln_1``/``ln_2`` entries of ``w``/``b``/``g`` arrays (NumPy or
    torch), Conv1D weights as (in, out). ``gpt`` needs ``qkv_bias=True``. A tensor whose shape does not
    fit is named in the error.
    """
    def t(x):
        return torch.as_tensor(x)

    flat = {"wte.weight": t(params["wte"]), "wpe.weight": t(params["wpe"]),
            "ln_f.weight": t(params["g"]), "ln_f.bias": t(params["b"])}
    for i, block in enumerate(params["blocks"]):
        for part, sub in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
            flat[f"h.{i}.{part}.{sub}.weight"] = t(block[part][sub]["w"])
            flat[f"h.{i}.{part}.{sub}.bias"] = t(block[part][sub]["b"])
        for ln in ("ln_1", "ln_2"):
            flat[f"h.{i}.{ln}.weight"] = t(block[ln]["g"])
            flat[f"h.{i}.{ln}.bias"] = t(block[ln]["b"])
    state = {}
    for name, value in flat.items():
        for book_key, view in hf_to_book(name, value):
            state[book_key] = view
    state.setdefault("out_head.weight", state["tok_emb.weight"])  # the book: out_head gets wte
    own = gpt.state_dict()
    problems = [f"{k} is missing from the model (build it with qkv_bias=True)" if k not in own else
                f"{k}: the model has shape {tuple(own[k].shape)}, the params {tuple(v.shape)}"
                for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if problems:
        raise WeightsError("the params do not fit this model: " + "; ".join(problems[:8]))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


# --------------------------------------------------------------------------------------------------
# Finding what a path or name means
# --------------------------------------------------------------------------------------------------


def _is_hf_folder(folder):
    path = os.path.join(folder, HF_CONFIG)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            return "n_embd" in json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def hub_repo(name: str):
    """The hub repository of a GPT-2 name (``gpt2-medium``, ``"gpt2-small (124M)"``) or None."""
    key = re.sub(r"\s*\(.*\)\s*$", "", name.strip()).lower().replace("_", "-")
    return HUB_REPOS.get(key)


def download(name: str, cache_dir=None) -> str:
    """Fetch a GPT-2 (config + safetensors) from the Hugging Face Hub; the local folder's path."""
    repo = hub_repo(name) or name
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError(
            f"loading {name!r} by name needs the huggingface_hub package (pip install huggingface_hub); "
            f"or download {repo} yourself and pass the folder's path"
        ) from None
    try:
        return snapshot_download(repo, allow_patterns=[HF_CONFIG, HF_SAFETENSORS], cache_dir=cache_dir)
    except Exception as e:  # offline, unknown repository, no permission: one line that says what to do
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"could not download {name!r} from the Hugging Face Hub ({type(e).__name__}: {reason}); "
            f"to load it without network, put {HF_CONFIG} and {HF_SAFETENSORS} from "
            f"https://huggingface.co/{repo} in one folder and pass that folder's path instead of the name"
        ) from None


def from_pretrained(path_or_name, backend=None, *, device="cpu", dtype=None, drop_rate=None, tie_weights=None,
                    cache_dir=None, **overrides):
    """Load a :class:`~gptfast.GPTModel` from a folder, a file or a GPT-2 name; returned in eval mode.

    ``path_or_name``: a Hugging Face GPT-2 folder, a gptfast model folder or training run folder, the
    book's ``model.pth`` (or a folder holding one), or ``gpt2``/``gpt2-medium``/``gpt2-large``/``gpt2-xl``
    (downloaded with ``huggingface_hub``, cached in ``cache_dir``).
    ``drop_rate``: ``None`` keeps the checkpoint's (GPT-2's 0.1; the book uses 0.0 to fine-tune).
    ``tie_weights``: share ``out_head.weight`` with ``tok_emb.weight`` (default: a separate copy, as the
    book does). ``dtype``: cast floating tensors (e.g. ``torch.bfloat16``); ``device``: where they go.
    Other keywords override config fields (``n_heads=`` for a bare state dict of an unusual width).

    >>> import gptfast
    >>> model = gptfast.GPTModel.from_pretrained("gpt2-medium", drop_rate=0.0)  # doctest: +SKIP
    """
    path = os.fspath(path_or_name)
    kw = dict(device=device, dtype=dtype, drop_rate=drop_rate, tie_weights=tie_weights, **overrides)
    if os.path.isdir(path):
        if checkpoint.is_model_folder(path):
            model = load_model_folder(path, backend, **kw)
        elif _is_hf_folder(path):
            model = load_hf_folder(path, backend, **kw)
        elif os.path.isfile(os.path.join(path, BOOK_FILE)):
            model = load_torch_file(os.path.join(path, BOOK_FILE), backend, **kw)
        elif (latest := checkpoint.latest_checkpoint(path)) is not None:
            model = load_model_folder(latest, backend, **kw)
        else:
            raise WeightsError(
                f"{path} is not a model folder: expected a Hugging Face GPT-2 folder ({HF_CONFIG} with n_embd and "
                f"{HF_SAFETENSORS} or {HF_BIN}), a gptfast folder ({checkpoint.CONFIG_FILE} + {checkpoint.MODEL_FILE}), "
                f"a training run with step-N folders, or the book's {BOOK_FILE}"
            )
    elif os.path.isfile(path):
        if path.endswith(".safetensors"):
            folder = os.path.dirname(path) or "."
            if os.path.basename(path) == HF_SAFETENSORS and (_is_hf_folder(folder) or checkpoint.is_model_folder(folder)):
                return from_pretrained(folder, backend, cache_dir=cache_dir, **kw)
            raise WeightsError(f"{path} needs a {HF_CONFIG} beside it (named {HF_SAFETENSORS}): pass the folder")
        model = load_torch_file(path, backend, **kw)
    elif hub_repo(path) is not None or re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        model = load_hf_folder(download(path, cache_dir), backend, **kw)
    else:
        raise WeightsError(f"{path!r} is neither an existing file or folder nor a GPT-2 name "
                           f"({', '.join(n for n in HUB_REPOS if n != 'gpt2-small')})")
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Writing Hugging Face's layout
# --------------------------------------------------------------------------------------------------


def hf_state_dict(model) -> dict:
    """The model's tensors under ``GPT2LMHeadModel``'s names and layouts (LoRA adapters folded in)."""
    from .model import linear_weight_and_bias

    cfg = model.cfg
    if cfg.pos_emb != "learned":
        raise WeightsError("GPT-2's layout has learned positions only; this model uses sinusoidal ones "
                           "(save it with gptfast.checkpoint.save_model instead)")
    if _head_rows(model) != cfg.vocab_size:
        raise WeightsError(f"the output head has {_head_rows(model)} outputs, not the vocabulary's {cfg.vocab_size}: "
                           f"a classifier is not a GPT2LMHeadModel; save it with gptfast.checkpoint.save_model")

    def conv1d(layer):  # nn.Linear (out, in) -> Conv1D (in, out), and the bias (zeros when absent)
        w, b = linear_weight_and_bias(layer)
        b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
        return w.detach().t().contiguous(), b.detach().contiguous()

    out = {"transformer.wte.weight": model.tok_emb.weight.detach().contiguous(),
           "transformer.wpe.weight": model.pos_emb.weight.detach().contiguous()}
    for i, block in enumerate(model.trf_blocks):
        p = f"transformer.h.{i}."
        qkv = [conv1d(getattr(block.att, n)) for n in ("W_query", "W_key", "W_value")]
        out[p + "attn.c_attn.weight"] = torch.cat([w for w, _ in qkv], dim=1)  # (E, 3E)
        out[p + "attn.c_attn.bias"] = torch.cat([b for _, b in qkv])
        for hf_name, layer in (("attn.c_proj", block.att.out_proj), ("mlp.c_fc", block.ff.layers[0]),
                               ("mlp.c_proj", block.ff.layers[2])):
            out[p + hf_name + ".weight"], out[p + hf_name + ".bias"] = conv1d(layer)
        for hf_name, norm in (("ln_1", block.norm1), ("ln_2", block.norm2)):
            out[p + hf_name + ".weight"] = norm.scale.detach().contiguous()
            out[p + hf_name + ".bias"] = norm.shift.detach().contiguous()
    out["transformer.ln_f.weight"] = model.final_norm.scale.detach().contiguous()
    out["transformer.ln_f.bias"] = model.final_norm.shift.detach().contiguous()
    if not cfg.tie_weights:
        out["lm_head.weight"] = linear_weight_and_bias(model.out_head)[0].detach().contiguous()
    return out


def _head_rows(model) -> int:
    from .model import linear_weight_and_bias

    return linear_weight_and_bias(model.out_head)[0].shape[0]


def save_pretrained(model, folder: str) -> None:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` in Hugging Face's GPT-2 layout.

    transformers' ``GPT2LMHeadModel.from_pretrained(folder)`` loads it (with its own ``lm_head`` unless
    the model ties weights), and so does :func:`from_pretrained`. Each file is written atomically.
    """
    from safetensors.torch import save_file

    state = {k: v.cpu() for k, v in hf_state_dict(model).items()}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, HF_SAFETENSORS)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(state, tmp, metadata={"format": "pt", "library": "gptfast"})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed write leaves the old file and no temporary one
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    hf = config_to_hf(model.cfg, model.cfg.tie_weights)
    hf["torch_dtype"] = str(model.tok_emb.weight.dtype).replace("torch.", "")
    checkpoint.atomic_write_json(os.path.join(folder, HF_CONFIG), hf)
