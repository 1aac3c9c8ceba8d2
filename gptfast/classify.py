"""Fine-tuning for classification, the book's chapter 6, for any CSV of texts and labels.

The recipe: take a pretrained GPT, swap its output head (emb_dim -> vocab_size) for a small one
(emb_dim -> num_classes), freeze everything except the last transformer block, the final LayerNorm and
the new head, and train on the output at the last token -- under causal attention it is the only
position that has seen the whole text.

By default the output is read at the *last position*, as the book does. The book pads every text to
the longest with token 50256, so for a short text that position is a padding token and the prediction
depends on how much padding the batch needed. ``pool="last_token"`` (keyword-only, everywhere here;
``gptfast finetune classify`` trains and answers with it) reads each row's **last real token** (the last
one that is not ``pad_token_id``) instead, so padding changes nothing and a text is classified the same
alone or in a batch. Texts are encoded with ``tokenizer.encode(text)``, which refuses the
``<|endoftext|>`` text, so id 50256 inside a text can only be padding.

The book's names: :class:`SpamDataset` (here :class:`ClassificationDataset`), :func:`calc_loss_batch`,
:func:`calc_loss_loader`, :func:`calc_accuracy_loader`, :func:`evaluate_model`,
:func:`train_classifier_simple`, :func:`classify_review`.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import types
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

PAD_TOKEN_ID = 50256
POOLS = ("last", "last_token")  # the book's last position; each row's last token that is not padding


class DatasetError(ValueError):
    """Fine-tuning data that cannot be used; the message names the file, row or column and the fix."""


def _rows_of(source, where):
    """Rows (dicts) from a CSV path, a list of dicts, or a pandas DataFrame."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise DatasetError(f"{path} does not exist: pass a CSV file with a text and a label column")
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if hasattr(source, "to_dict"):  # a pandas DataFrame, as the book uses
        return source.to_dict("records")
    rows = list(source)
    if rows and not all(isinstance(r, dict) for r in rows):
        raise DatasetError(f"{where}: expected a CSV path or a list of dicts (one per row)")
    return rows


_COLUMN_HINT = "Name the column with text_column=/label_column= (--text-column/--label-column)"


def _column(rows, wanted, where, role, hint=_COLUMN_HINT):
    """The actual column name for ``wanted`` (exact, else case-insensitive)."""
    columns = list(rows[0].keys())
    if wanted in columns:
        return wanted
    folded = [c for c in columns if c is not None and c.strip().lower() == wanted.lower()]
    if folded:
        return folded[0]
    raise DatasetError(f"{where} has no {role} column {wanted!r}; its columns are {columns}. {hint}")


def _label_ids(values, labels, num_classes, where):
    """Map raw labels to class ids; returns (ids, label names or None)."""
    def as_int(v):
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        return int(f) if f == int(f) else None

    ints = [as_int(v) for v in values]
    if labels is not None:
        names = [str(x) for x in labels]
        index = {n: i for i, n in enumerate(names)}
        ids = []
        for row, v in enumerate(values):
            key = str(v).strip()
            if key in index:
                ids.append(index[key])
            elif as_int(v) is not None and 0 <= as_int(v) < len(names):
                ids.append(as_int(v))
            else:
                raise DatasetError(f"{where}: row {row + 1} has label {v!r}, which is not one of {names}")
        return ids, names
    if all(i is not None for i in ints):
        ids, names = ints, None
        found = sorted(set(ids))
        if num_classes is None and found != list(range(len(found))) and min(found) >= 0:
            shown = ", ".join(map(str, found[:20])) + (", ..." if len(found) > 20 else "")
            raise DatasetError(
                f"{where}: the labels found are {shown}, but integer labels are class ids and must run "
                f"0..n-1 with none missing (0..{len(found) - 1} for {len(found)} classes); renumber them, write "
                f"them as names (text labels are mapped to ids and stored with the run), or pass "
                f"num_classes (--num-classes) if some classes are absent from this file")
    else:  # text labels ("spam", "ham"): classes in sorted order
        names = sorted({str(v).strip() for v in values})
        index = {n: i for i, n in enumerate(names)}
        ids = [index[str(v).strip()] for v in values]
    limit = num_classes if num_classes is not None else None
    for row, i in enumerate(ids):
        if i < 0 or (limit is not None and i >= limit):
            raise DatasetError(f"{where}: row {row + 1} has label {values[row]!r}, out of range for "
                               f"{limit if limit is not None else 'non-negative'} classes (labels must be 0..num_classes-1)")
    return ids, names


class ClassificationDataset(Dataset):
    """Texts and labels from a CSV (the book's ``SpamDataset``, for any columns and classes).

    Items are ``(input_ids, label)``: a (max_length,) long tensor padded with ``pad_token_id`` and a
    scalar long tensor. ``max_length=None`` pads to the longest text (the book); a number truncates
    longer texts to it. Labels may be integers ``0..num_classes-1`` or strings (classes then in sorted
    order, or in the order ``labels`` gives); :attr:`labels` keeps the names.
    """

    def __init__(self, csv_file, tokenizer, max_length=None, pad_token_id=PAD_TOKEN_ID, *, text_column="Text",
                 label_column="Label", num_classes=None, labels=None):
        where = os.fspath(csv_file) if isinstance(csv_file, (str, os.PathLike)) else "the data"
        rows = _rows_of(csv_file, where)
        if not rows:
            raise DatasetError(f"{where} has no rows: a classification data set needs at least one text and label")
        text_col = _column(rows, text_column, where, "text")
        label_col = _column(rows, label_column, where, "label")
        self.data = rows
        self.pad_token_id = pad_token_id
        texts = [r[text_col] for r in rows]
        for row, t in enumerate(texts):
            if t is None or not str(t).strip():
                raise DatasetError(f"{where}: row {row + 1} has an empty text")
        self.label_ids, self.labels = _label_ids([r[label_col] for r in rows], labels, num_classes, where)
        self.num_classes = num_classes or (len(self.labels) if self.labels else max(self.label_ids) + 1)
        self.encoded_texts = [tokenizer.encode(str(t)) for t in texts]
        if max_length is None:
            self.max_length = self._longest_encoded_length()
        else:
            self.max_length = int(max_length)
            self.encoded_texts = [e[: self.max_length] for e in self.encoded_texts]
        self.encoded_texts = [e + [pad_token_id] * (self.max_length - len(e)) for e in self.encoded_texts]

    def __getitem__(self, index):
        return (torch.tensor(self.encoded_texts[index], dtype=torch.long),
                torch.tensor(self.label_ids[index], dtype=torch.long))

    def __len__(self):
        return len(self.data)

    def _longest_encoded_length(self):
        return max(len(e) for e in self.encoded_texts)


SpamDataset = ClassificationDataset  # the book's name


def replace_output_head(model, num_classes: int):
    """Swap ``model.out_head`` for ``nn.Linear(emb_dim, num_classes)`` (with bias, as the book); in place."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    old = model.out_head
    weight = getattr(old, "weight", None)
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes, device=weight.device if weight is not None else None,
                               dtype=weight.dtype if weight is not None else None)
    if model.cfg.tie_weights:  # the head no longer shares the embedding
        model.cfg = dataclasses.replace(model.cfg, tie_weights=False)
    return model


def prepare_for_classification(model, num_classes: int = 2, trainable_blocks: int = 1, train_final_norm: bool = True):
    """The book's chapter-6 setup, in place: freeze the model, replace the output head for
    ``num_classes``, and make the last ``trainable_blocks`` transformer blocks (and the final
    LayerNorm) trainable again; the new head trains. Returns ``model``."""
    if not 0 <= trainable_blocks <= len(model.trf_blocks):
        raise ValueError(f"trainable_blocks must be between 0 and {len(model.trf_blocks)}, got {trainable_blocks}")
    for param in model.parameters():
        param.requires_grad = False
    replace_output_head(model, num_classes)
    trainable = list(model.trf_blocks)[len(model.trf_blocks) - trainable_blocks:]
    if train_final_norm:
        trainable.append(model.final_norm)
    for module in trainable:
        for param in module.parameters():
            param.requires_grad = True
    return model


def last_token_index(input_batch, pad_token_id=PAD_TOKEN_ID):
    """(B,) position of each row's last token that is not ``pad_token_id`` (T-1 with ``None``)."""
    b, t = input_batch.shape
    if pad_token_id is None:
        return torch.full((b,), t - 1, dtype=torch.long, device=input_batch.device)
    real = (input_batch != pad_token_id).int()  # (B, T)
    return t - 1 - real.flip(1).argmax(dim=1)  # an all-padding row gives T-1


def _check_pool(pool):
    if pool not in POOLS:
        raise ValueError(f"pool must be 'last' (the book's last position) or 'last_token' (each row's last token "
                         f"that is not padding), got {pool!r}")


def classification_logits(model, input_batch, pad_token_id=PAD_TOKEN_ID, *, pool="last"):
    """(B, num_classes) logits at the last position (``pool="last"``, the book's), or at each row's last
    token that is not ``pad_token_id`` (``pool="last_token"``; with ``pad_token_id=None`` that is the
    last position too)."""
    _check_pool(pool)
    logits = model(input_batch)  # (B, T, C)
    if pool == "last":
        return logits[:, -1, :]
    idx = last_token_index(input_batch, pad_token_id)
    return logits[torch.arange(logits.shape[0], device=logits.device), idx]  # (B, C)


def calc_loss_batch(input_batch, target_batch, model, device, *, pool="last", pad_token_id=PAD_TOKEN_ID):
    """Cross-entropy of the class logits at the last position (the book's chapter-6 function; ``pool``
    as :func:`classification_logits`)."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    return F.cross_entropy(classification_logits(model, input_batch, pad_token_id, pool=pool), target_batch)


def calc_loss_loader(data_loader, model, device, num_batches=None, *, pool="last", pad_token_id=PAD_TOKEN_ID):
    """Average batch loss over the first ``num_batches`` batches (all by default); NaN for an empty loader."""
    total_loss = 0.0
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device, pool=pool,
                                      pad_token_id=pad_token_id).item()
    return total_loss / num_batches


def calc_accuracy_loader(data_loader, model, device, num_batches=None, *, pool="last", pad_token_id=PAD_TOKEN_ID):
    """Fraction of correctly classified examples in the first ``num_batches`` batches (eval mode, no grad)."""
    model.eval()
    correct_predictions, num_examples = 0, 0
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        with torch.no_grad():
            logits = classification_logits(model, input_batch, pad_token_id, pool=pool)
        predicted_labels = torch.argmax(logits, dim=-1)
        num_examples += predicted_labels.shape[0]
        correct_predictions += (predicted_labels == target_batch).sum().item()
    return correct_predictions / num_examples if num_examples else float("nan")


def evaluate_model(model, train_loader, val_loader, device, eval_iter, *, pool="last", pad_token_id=PAD_TOKEN_ID):
    """Training and validation loss over ``eval_iter`` batches each, in eval mode and without gradients."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, eval_iter, pool=pool, pad_token_id=pad_token_id)
        val_loss = calc_loss_loader(val_loader, model, device, eval_iter, pool=pool, pad_token_id=pad_token_id)
    model.train()
    return train_loss, val_loss


def train_classifier_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter, *,
                            pool="last", pad_token_id=PAD_TOKEN_ID):
    """The book's chapter-6 loop; prints its lines. Returns ``(train_losses, val_losses, train_accs,
    val_accs, examples_seen)``: losses every ``eval_freq`` steps, accuracies once per epoch."""
    train_losses, val_losses, train_accs, val_accs = [], [], [], []
    examples_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device, pool=pool, pad_token_id=pad_token_id)
            loss.backward()
            optimizer.step()
            examples_seen += input_batch.shape[0]
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter, pool=pool,
                                                      pad_token_id=pad_token_id)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                print(f"Ep {epoch+1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        train_accuracy = calc_accuracy_loader(train_loader, model, device, eval_iter, pool=pool, pad_token_id=pad_token_id)
        val_accuracy = calc_accuracy_loader(val_loader, model, device, eval_iter, pool=pool, pad_token_id=pad_token_id)
        print(f"Training accuracy: {train_accuracy*100:.2f}% | ", end="")
        print(f"Validation accuracy: {val_accuracy*100:.2f}%")
        train_accs.append(train_accuracy)
        val_accs.append(val_accuracy)
    return train_losses, val_losses, train_accs, val_accs, examples_seen


_BOOK_LABELS = ("not spam", "spam")


def _classifier_folder(path):
    """The step folder a classifier path means (a run folder's newest step, or the folder of a file in one)."""
    from . import checkpoint

    if os.path.isfile(path) and os.path.basename(path) in (checkpoint.MODEL_FILE, checkpoint.CONFIG_FILE):
        path = os.path.dirname(path) or "."
    if not os.path.isdir(path):
        raise DatasetError(f"{path} does not exist: pass a run folder written by `gptfast finetune classify` "
                           f"(or one of its step-N folders)")
    if os.path.isfile(os.path.join(path, checkpoint.CONFIG_FILE)):
        return path
    folder = checkpoint.latest_checkpoint(path)
    if folder is None:
        raise DatasetError(f"{path} holds no checkpoint (no step-N folder with {checkpoint.MODEL_FILE}): pass a "
                           f"run folder written by `gptfast finetune classify`")
    return folder


def load_classifier(path, backend=None, *, device="cpu", dtype=None):
    """A classifier fine-tuned by ``gptfast finetune classify`` (a run folder or one step folder), with
    what its run stored: ``model.labels`` (the class names, or None for integer labels; what
    :func:`classify_review` answers with), ``model.pad_token_id``, ``model.max_length`` and
    ``model.pool`` (how the run read its outputs: ``"last_token"``).

    The run's ``config.json`` is checked before any weights are read: a folder that is not a classifier
    raises :class:`DatasetError` at once."""
    from . import checkpoint
    from .weights import from_pretrained

    path = os.fspath(path)
    folder = _classifier_folder(path)
    raw = checkpoint.read_raw_config(folder)
    if raw.get("task") != "classify":
        hint = ("; it is an instruction-tuned run: talk to it with `gptfast chat`" if raw.get("task") == "instruct"
                else "")
        raise DatasetError(f"{path} is not a classifier run (its config.json has task {raw.get('task')!r}); "
                           f"pass a folder written by `gptfast finetune classify`{hint}")
    model = from_pretrained(folder, backend, device=device, dtype=dtype)
    model.labels = raw.get("labels")
    model.pad_token_id = raw.get("pad_token_id", PAD_TOKEN_ID)
    model.max_length = raw.get("max_length")
    pool = raw.get("pool", "last_token")  # as the run trained
    _check_pool(pool)
    model.pool = pool
    return model


def _context_length(model):
    """The longest input ``model`` takes: gptfast's ``cfg``, else the book's ``pos_emb`` rows (any nn.Module)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        return cfg["context_length"] if isinstance(cfg, dict) else cfg.context_length
    return model.pos_emb.weight.shape[0]


def classify_review(text, model, tokenizer, device, max_length=None, pad_token_id=PAD_TOKEN_ID, *, pool=None,
                    labels=_BOOK_LABELS):
    """Classify one text, as the book's chapter 6 does: cut it to ``min(max_length, context_length)``
    tokens, pad it to ``max_length`` with ``pad_token_id`` and read the last position. Returns
    ``labels[class]`` (the book's "spam"/"not spam"), or the class id with ``labels=None``.

    Works on any model with the book's attributes (the book's own ``GPTModel`` too). ``max_length=None``
    or ``pad_token_id=None`` classifies the text unpadded. ``pool`` as :func:`classification_logits`;
    ``None`` means the model's own ``pool`` (``"last_token"`` for a :func:`load_classifier` model) or
    ``"last"``. A model trained on text labels answers with its own class names unless ``labels`` is given."""
    if labels is _BOOK_LABELS and getattr(model, "labels", None):
        labels = model.labels
    pool = getattr(model, "pool", "last") if pool is None else pool
    _check_pool(pool)
    model.eval()
    input_ids = tokenizer.encode(text)
    if not input_ids:
        raise ValueError("classify_review got an empty text")
    supported_context_length = _context_length(model)
    limit = supported_context_length if max_length is None else min(max_length, supported_context_length)
    input_ids = input_ids[:limit]
    if max_length is not None and pad_token_id is not None:
        input_ids += [pad_token_id] * (limit - len(input_ids))
    input_tensor = torch.tensor(input_ids, device=device).unsqueeze(0)  # (1, T)
    with torch.no_grad():
        logits = classification_logits(model, input_tensor, pad_token_id, pool=pool)
    predicted_label = torch.argmax(logits, dim=-1).item()
    return predicted_label if labels is None else labels[predicted_label]


# --------------------------------------------------------------------------------------------------
# Classifying texts with a fine-tuned run: gptfast.classify(run, texts)
# --------------------------------------------------------------------------------------------------


class Prediction(NamedTuple):
    """One text's answer: the most likely class's ``label`` (its name, or the class id for a run trained
    on integer labels) and its ``probability`` (the softmax of the class logits). A tuple, so
    ``label, probability = prediction`` works too."""

    label: "str | int"
    probability: float


def read_texts(path, text_column="Text"):
    """The texts of a CSV file's ``text_column`` (matched exactly, else case-insensitively), as training
    reads them; :class:`DatasetError` for a missing file or column, no rows, or an empty text."""
    where = os.fspath(path)
    rows = _rows_of(path, where)
    if not rows:
        raise DatasetError(f"{where} has no rows: write a header line and one text per row")
    col = _column(rows, text_column, where, "text", hint="Name the text column with --text-column")
    texts = [r[col] for r in rows]
    for row, t in enumerate(texts):
        if t is None or not str(t).strip():
            raise DatasetError(f"{where}: row {row + 1} has an empty text")
    return [str(t) for t in texts]


def _encode_texts(texts, tokenizer, limit):
    encoded = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DatasetError(f"text {i + 1} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise DatasetError(f"text {i + 1} is empty: give at least one character to classify")
        try:
            ids = tokenizer.encode(text)
        except ValueError as e:  # the <|endoftext|> text, which only padding may be
            raise DatasetError(f"text {i + 1} cannot be encoded: {e}") from None
        encoded.append(ids[:limit])
    return encoded


def classify(run_or_model, texts, *, device=None, batch_size=16, tokenizer=None, backend=None):
    """Classify ``texts`` with a classifier: a run folder (or step folder) written by ``gptfast finetune
    classify``, or a model already loaded (:func:`load_classifier`, :func:`gptfast.finetune.finetune_classifier`).

    Returns one :class:`Prediction` ``(label, probability)`` per text, in order; a single string gives a
    single :class:`Prediction`. Texts are read as the run trained: encoded with GPT-2's tokenizer (or
    ``tokenizer``), cut to the run's ``max_length`` (at most the context length), padded with its
    ``pad_token_id`` and read at the position its ``pool`` names (the last real token), so a text gets the
    same answer alone or in any batch of ``batch_size``. A model without the run's attributes is read the
    book's way: unpadded, at the last position.

    ``device``: where a run is loaded (default: cuda when available, else cpu); a model stays where it is.

    >>> gptfast.classify("runs/spam", ["WINNER!! Claim your prize", "lunch at noon?"])   # doctest: +SKIP
    [Prediction(label='spam', probability=0.97...), Prediction(label='ham', probability=0.99...)]
    """
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if tokenizer is None:
        from .data import default_tokenizer

        tokenizer = default_tokenizer()
    if isinstance(run_or_model, (str, os.PathLike)):
        if device is None:
            from .devices import resolve_device

            device = resolve_device(None)
        model = load_classifier(run_or_model, backend, device=device)
    else:
        model = run_or_model
    device = next(model.parameters()).device
    labels = getattr(model, "labels", None)
    pool = getattr(model, "pool", "last")
    _check_pool(pool)
    pad = getattr(model, "pad_token_id", PAD_TOKEN_ID)
    max_length = getattr(model, "max_length", None)
    context = _context_length(model)
    limit = context if max_length is None else min(int(max_length), context)
    encoded = _encode_texts(texts, tokenizer, limit)
    if pad is None or (pool == "last" and max_length is None):
        batch_size = 1  # nothing to pad with, or the book's last position of an unpadded text: one at a time
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = limit if max_length is not None and pad is not None else max(map(len, chunk))
            rows = [ids + [pad] * (width - len(ids)) for ids in chunk]
            batch = torch.tensor(rows, dtype=torch.long, device=device)  # (B, T)
            with torch.no_grad():
                logits = classification_logits(model, batch, pad, pool=pool)  # (B, C)
            probs = torch.softmax(logits.float(), dim=-1)
            best = probs.argmax(dim=-1)
            for b in range(len(chunk)):
                k = int(best[b])
                out.append(Prediction(labels[k] if labels else k, float(probs[b, k])))
    finally:
        model.train(was_training)
    return out[0] if single else out


class _CallableModule(types.ModuleType):
    """This module, callable: ``gptfast.classify(run, texts)`` is :func:`classify` even once
    ``import gptfast.classify`` has made the package attribute this module."""

    def __call__(self, *args, **kwargs):
        return classify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
