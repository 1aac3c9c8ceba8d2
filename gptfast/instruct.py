"""Instruction fine-tuning, the book's chapter 7: the Alpaca prompt, its dataset, its collate function.

Each entry is ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` may be empty), read from
a JSON list (the book's file) or Alpaca-style JSONL, one entry per line. The
model is trained on the whole prompt + response with the ordinary next-token loss; padding is the
end-of-text token 50256, and only the first padding token of each row stays a target (so the model
learns to stop) -- the rest become ``ignore_index`` (-100), which cross-entropy skips. Training uses
the chapter-5 loop, :func:`gptfast.train.train_model_simple`, unchanged.
"""

from __future__ import annotations

import json
import os

import torch
from torch.utils.data import Dataset

from .classify import DatasetError
from .generation import generate, text_to_token_ids, token_ids_to_text

PAD_TOKEN_ID = 50256
IGNORE_INDEX = -100


def format_input(entry):
    """The Alpaca-style prompt of the book, byte for byte: the preamble, the instruction, the input if any."""
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


def format_response(entry):
    """The part the model learns to write: ``"\\n\\n### Response:\\n" + output``."""
    return f"\n\n### Response:\n{entry['output']}"


# The prompt templates an instruct run can be trained with, by the name its config.json stores under
# "template". Each maps an entry to the prompt the model continues with its response.
TEMPLATES = {"alpaca": format_input}
DEFAULT_TEMPLATE = "alpaca"


def template_of(config: dict) -> str | None:
    """The template a run's ``config.json`` says its model was trained with: its ``"template"``, or
    ``"alpaca"`` for an instruct run that predates that field (``task: instruct``); None otherwise."""
    name = config.get("template")
    if name is None and config.get("task") == "instruct":
        name = DEFAULT_TEMPLATE
    if name is not None and name not in TEMPLATES:
        raise DatasetError(f"the run's config.json names the prompt template {name!r}, which this gptfast does not "
                           f"know (known: {', '.join(sorted(TEMPLATES))}); upgrade gptfast, or pass --raw")
    return name


def apply_template(name: str, instruction: str, input_text: str = "") -> str:
    """The prompt for one request under template ``name``: ``apply_template("alpaca", "Name a color.")``."""
    return TEMPLATES[name]({"instruction": instruction, "input": input_text})


def _entry_problem(entry) -> str | None:
    """What is wrong with one entry, or None."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    missing = [k for k in ("instruction", "output") if k not in entry]
    if missing:
        return (f"lacks {', '.join(repr(k) for k in missing)} "
                f"(each entry needs 'instruction' and 'output', and may have 'input')")
    for k in ("instruction", "input", "output"):
        if k in entry and not isinstance(entry[k], str):
            return f"has a non-text {k!r} ({type(entry[k]).__name__})"
    return None


def check_entries(data, where="the data"):
    """Raise :class:`DatasetError` unless ``data`` is a non-empty list of entries with text fields."""
    if not isinstance(data, list):
        raise DatasetError(f"{where} must be a JSON list of entries, got {type(data).__name__}")
    if not data:
        raise DatasetError(f"{where} has no entries: instruction data needs at least one "
                           f'{{"instruction": ..., "input": ..., "output": ...}}')
    for i, entry in enumerate(data):
        problem = _entry_problem(entry)
        if problem:
            raise DatasetError(f"{where}: entry {i} {problem}")
    return data


def read_jsonl_entries(path):
    """The entries of an Alpaca-style JSONL file: one ``{"instruction", "input", "output"}`` object per
    line (blank lines are skipped). A bad line is a :class:`DatasetError` naming the file and line."""
    path = os.fspath(path)
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}, line {number}: not valid JSON ({e.msg}, column {e.colno}); each line "
                                   f'must be one {{"instruction": ..., "input": ..., "output": ...}} object') from None
            problem = _entry_problem(entry)
            if problem:
                raise DatasetError(f"{path}, line {number}: the entry {problem}")
            entries.append(entry)
    if not entries:
        raise DatasetError(f"{path} has no entries: instruction data needs at least one line "
                           f'{{"instruction": ..., "input": ..., "output": ...}}')
    return entries


def _first_char(path) -> str:
    with open(path, encoding="utf-8") as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip("\ufeff \t\r\n")
            if stripped:
                return stripped[0]


def load_instruction_data(path):
    """Read and check instruction data: a JSON file with a list of entries (the book's
    ``instruction-data.json``), or Alpaca-style JSONL with one entry per line -- a ``.jsonl`` file, or
    any other file whose entries are objects one per line rather than a list."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path} does not exist: pass a JSON file with a list of instruction entries, "
                           f"or a JSONL file with one entry per line")
    try:
        if path.lower().endswith(".jsonl"):
            return read_jsonl_entries(path)
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                if _first_char(path) == "{":  # objects one per line: JSONL under another name
                    return read_jsonl_entries(path)
                raise DatasetError(f"{path} is not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    return check_entries(data, path)


def split_instruction_data(data, train_fraction=0.85, test_fraction=0.10):
    """The book's split, in order: 85% train, 10% test, the remaining 5% validation."""
    train_portion = int(len(data) * train_fraction)
    test_portion = int(len(data) * test_fraction)
    train_data = data[:train_portion]
    test_data = data[train_portion:train_portion + test_portion]
    val_data = data[train_portion + test_portion:]
    return train_data, test_data, val_data


class InstructionDataset(Dataset):
    """Each entry's prompt + response, tokenized once; items are lists of token ids (the book's class)."""

    def __init__(self, data, tokenizer, template=DEFAULT_TEMPLATE):
        self.data = check_entries(list(data))
        prompt = TEMPLATES[template]
        self.encoded_texts = []
        for entry in self.data:
            full_text = prompt(entry) + format_response(entry)
            self.encoded_texts.append(tokenizer.encode(full_text))

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(batch, pad_token_id=PAD_TOKEN_ID, ignore_index=IGNORE_INDEX, allowed_max_length=None,
                      device="cpu"):
    """Pad a batch of token lists into (inputs, targets), both (B, T), the book's way.

    Each row gets one ``pad_token_id`` appended and is padded to the longest row + 1; targets are the
    inputs shifted by one; in each row's targets every padding token after the first becomes
    ``ignore_index``. ``allowed_max_length`` then cuts both to that many tokens.
    """
    if len(batch) == 0:
        raise ValueError("custom_collate_fn got an empty batch")
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = list(item) + [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])  # (T,)
        targets = torch.tensor(padded[1:])  # (T,)
        indices = torch.nonzero(targets == pad_token_id).squeeze(1)
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


def extract_response(generated_text, input_text):
    """The model's answer: what follows the prompt, without the ``### Response:`` header (the book's way)."""
    return generated_text[len(input_text):].replace("### Response:", "").strip()


def generate_response(model, tokenizer, entry, max_new_tokens=256, eos_id=PAD_TOKEN_ID, *, template=DEFAULT_TEMPLATE,
                      **sampling):
    """Prompt ``model`` with the ``template``'s prompt for ``entry`` (the book's ``format_input``) and
    return its response text (greedy by default)."""
    input_text = TEMPLATES[template](entry)
    device = next(model.parameters()).device
    idx = text_to_token_ids(input_text, tokenizer).to(device)
    context = model.cfg.context_length
    model.eval()
    token_ids = generate(model, idx[:, -context:], max_new_tokens=max_new_tokens, context_size=context,
                         eos_id=eos_id, **sampling)
    return extract_response(token_ids_to_text(token_ids, tokenizer), input_text)
