"""Chapter 5, pretraining on unlabeled data: the losses, the training loop, sampling, and loading
OpenAI's GPT-2 weights (gptfast.train, gptfast.generation, gptfast.weights).

``download_and_load_gpt2`` and ``load_gpt2_params_from_tf_ckpt`` read OpenAI's TensorFlow checkpoints
as the book does; TensorFlow is imported only when they are called. gptfast's own way needs neither
TensorFlow nor the checkpoint: ``gptfast.GPTModel.from_pretrained("gpt2")``.
"""

import json
import os

import torch

from ..generation import generate, generate_text_simple, text_to_token_ids, token_ids_to_text
from ..train import (calc_loss_batch, calc_loss_loader, evaluate_model, generate_and_print_sample, plot_losses,
                     train_model_simple)
from ..weights import load_weights_into_gpt
from ._files import fetch

__all__ = ["generate", "generate_text_simple", "train_model_simple", "evaluate_model", "generate_and_print_sample",
           "assign", "load_weights_into_gpt", "text_to_token_ids", "token_ids_to_text", "calc_loss_batch",
           "calc_loss_loader", "plot_losses", "download_and_load_gpt2", "download_file",
           "load_gpt2_params_from_tf_ckpt"]

GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
GPT2_BACKUP_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
GPT2_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
              "model.ckpt.meta", "vocab.bpe")
GPT2_SIZES = ("124M", "355M", "774M", "1558M")


def assign(left, right):
    """``right`` (an array or tensor) as a new ``nn.Parameter``, after checking it has ``left``'s shape."""
    if tuple(left.shape) != tuple(right.shape):
        raise ValueError(f"Shape mismatch. Left: {left.shape}, Right: {right.shape}")
    return torch.nn.Parameter(torch.as_tensor(right).clone().detach())


def _tensorflow():
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError("reading OpenAI's TensorFlow checkpoint needs TensorFlow: pip install tensorflow "
                          "(or load the weights without it: gptfast.GPTModel.from_pretrained('gpt2'))") from None
    return tf


def download_file(url, destination, backup_url=None):
    """Bring ``url`` to ``destination``, the book's function; a file already there is kept as it is,
    and ``url`` may also be a local file or a folder holding the file."""
    if os.path.isfile(destination):
        print(f"File already exists: {destination}")
        return
    fetch(url, destination, backup_url)


def download_and_load_gpt2(model_size, models_dir):
    """OpenAI's GPT-2 checkpoint ``model_size`` ("124M", "355M", "774M", "1558M") in ``models_dir/model_size``:
    fetched when missing, then read with TensorFlow. Returns ``(settings, params)`` as the book's does."""
    if model_size not in GPT2_SIZES:
        raise ValueError(f"Model size not in {GPT2_SIZES}")
    model_dir = os.path.join(models_dir, model_size)
    os.makedirs(model_dir, exist_ok=True)
    for filename in GPT2_FILES:
        download_file(f"{GPT2_URL}/{model_size}/{filename}", os.path.join(model_dir, filename),
                      f"{GPT2_BACKUP_URL}/{model_size}/{filename}")
    tf = _tensorflow()
    with open(os.path.join(model_dir, "hparams.json"), encoding="utf-8") as f:
        settings = json.load(f)
    params = load_gpt2_params_from_tf_ckpt(tf.train.latest_checkpoint(model_dir), settings)
    return settings, params


def load_gpt2_params_from_tf_ckpt(ckpt_path, settings):
    """The checkpoint's variables as the book's nested dict: ``wte``, ``wpe``, ``g``, ``b`` and
    ``blocks[i]`` (``attn``, ``mlp``, ``ln_1``, ``ln_2``), NumPy arrays with singleton axes squeezed."""
    import numpy as np

    tf = _tensorflow()
    params = {"blocks": [{} for _ in range(settings["n_layer"])]}
    for name, _ in tf.train.list_variables(ckpt_path):
        parts = name.split("/")[1:]  # drop the leading "model/"
        target = params
        if parts[0].startswith("h"):  # h0, h1, ...: a transformer block
            target = params["blocks"][int(parts[0][1:])]
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = np.squeeze(tf.train.load_variable(ckpt_path, name))
    return params
