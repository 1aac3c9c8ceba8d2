"""The package's namespace: every public name is listed by dir() (tab completion) and resolves, and
describe(model) reports what that model's ops will run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import gptfast
from gptfast import ops


def test_dir_lists_every_public_name_including_those_loaded_on_first_use():
    names = dir(gptfast)
    for name in ("format_input", "merge_lora", "generate_response", "classify", "Tokenizer", "Trainer",
                 "GPTModel", "describe"):
        assert name in names
    assert [n for n in gptfast.__all__ if n not in names] == []
    assert [n for n in gptfast._LAZY if n not in names] == []


def test_every_listed_name_resolves():
    for name in gptfast.__all__:
        assert getattr(gptfast, name) is not None, name


def test_dir_imports_nothing_heavy():
    code = ("import sys, gptfast; names = dir(gptfast); "
            "print('format_input' in names, 'triton' in sys.modules, 'gptfast.instruct' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False"]


def _tiny():
    cfg = gptfast.GPTConfig.from_name("gpt2", emb_dim=32, n_layers=1, n_heads=2, context_length=8, vocab_size=64)
    return gptfast.GPTModel(cfg)


def _rows(text):
    return [line.split(None, 2) for line in text.splitlines()]


def test_describe_reports_the_models_own_backend():
    model = _tiny().set_backend("reference")
    rows = _rows(gptfast.describe(model))
    assert [r[0] for r in rows] == list(ops.OPS)
    assert all(r[1] == "reference" and "the model's backend" in r[2] for r in rows)
    # one op on the kernel, the rest on the global rules
    model.set_backend({"attention": "reference"})
    rows = dict((r[0], r) for r in _rows(gptfast.describe(model)))
    assert "the model's backend" in rows["attention"][2]
    assert "the model's backend" not in rows["layer_norm"][2]


def test_describe_after_set_backend_triton_is_not_the_global_default():
    model = _tiny().set_backend("triton")
    rows = _rows(gptfast.describe(model))
    if ops.interpreting():
        assert all(r[1] == "triton" and "interpreter" in r[2] for r in rows), rows
    else:  # CPU parameters without the interpreter: the kernels cannot run there, and describe says why
        assert all(r[1] == "error" and "'triton' was asked for by the model's backend" in r[2] for r in rows), rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a model on a GPU needs CUDA")
def test_describe_of_a_gpu_model_speaks_of_its_device():
    model = _tiny().cuda()
    rows = _rows(gptfast.describe(model))
    assert all("CPU" not in r[2] for r in rows)
