"""Build script for gptfast.

Three source folders become one package:

* ``gptfast/`` -> ``gptfast``          (the library)
* ``kernels/`` -> ``gptfast.kernels``  (Triton kernels; they import torch and triton only)
* ``bench/``   -> ``gptfast.bench``    (benchmarks; ``gptfast bench`` and ``python -m bench``)

and ``csrc/*.cpp`` becomes the C++ extension ``gptfast._bpe``.

This file must not import torch: an isolated build would otherwise have to
download a multi-GB wheel just to read it.
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _bpe_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:  # a build without pybind11: the tokenizer falls back to its reference
        print("gptfast: pybind11 is not installed; building without the C++ tokenizer", file=sys.stderr)
        return []
    extra = ["-O3"] if sys.platform != "win32" else ["/O2"]
    return [
        Pybind11Extension(
            "gptfast._bpe",
            sources,
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=extra,
        )
    ]


def _readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


setup(
    name="gptfast-from-scratch",
    version="0.1.0",
    description="The GPT of 'Build a Large Language Model (From Scratch)' with Triton kernels and a C++ BPE tokenizer",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["gptfast", "gptfast.book", "gptfast.book.kv_cache", "gptfast.commands", "gptfast.kernels", "gptfast.bench"],
    package_dir={"gptfast": "gptfast", "gptfast.kernels": "kernels", "gptfast.bench": "bench"},
    package_data={"gptfast": ["assets/*.tiktoken"], "gptfast.bench": ["results/*.json", "results/*.png"]},
    ext_modules=_bpe_extension(),
    install_requires=[
        "torch>=2.6",
        "triton; platform_system == 'Linux'",
        "tiktoken>=0.7",
        "numpy",
        "safetensors",
        "matplotlib",
        "tqdm",
        # TOML run configs (--config): the standard library's tomllib from Python 3.11
        "tomli; python_version < '3.11'",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-benchmark",
            "pytest-xdist",
            "hypothesis",
            "transformers",
            "tiktoken==0.14.0",
            # the book's chapter code (llms-from-scratch, installed with --no-deps) needs these two
            "pandas",
            "psutil",
            # Triton 3.2's CPU interpreter (torch 2.6's triton) cannot launch kernels with numpy 2.4
            # ("only 0-dimensional arrays can be converted to Python scalars"); newer triton can.
            "numpy<2.4",
        ],
        # the tokenizer's peers for `python -m bench --only tokenizer`, in a venv of their own: tokenizers
        # 1.0 is a pre-release, and the test extra's transformers needs tokenizers<0.24
        "bench": [
            "tiktoken==0.14.0",
            "gigatoken==0.10.0",
            "tokenizers==1.0.0rc3",
            "fastokens==0.3.5",
        ],
        "hub": ["huggingface_hub"],
        # training logs beyond metrics.jsonl and CSV: gptfast train --log tensorboard / --log wandb
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["gptfast=gptfast.cli:main"]},
)
