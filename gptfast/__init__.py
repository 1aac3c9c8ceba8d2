"""gptfast: the GPT of *Build a Large Language Model (From Scratch)*, with Triton kernels and a C++ tokenizer.

>>> import torch, gptfast
>>> model = gptfast.GPTModel(gptfast.GPTConfig.from_name("gpt2"))      # doctest: +SKIP
>>> model.set_backend("triton")                                         # doctest: +SKIP

Importing gptfast never imports triton; the kernels load the first time they are chosen.
"""

from . import ops, reference
from .config import GPT_CONFIG_124M, GPTConfig
from .generation import generate, generate_text_simple, text_to_token_ids, token_ids_to_text
from .model import GELU, FeedForward, GPTModel, LayerNorm, MultiHeadAttention, TransformerBlock
from .ops import describe, use_backend
from .viz import attention_weights, plot_attention

__version__ = "0.1.0"

# Parts that arrive with their own modules; imported lazily so a missing one never breaks the rest.
_LAZY = {
    "Tokenizer": ("gptfast.tokenizer", "Tokenizer"),
    # training and generation (chapter 5, appendix D, the trainer, the KV cache)
    **{n: ("gptfast.data", n) for n in ("GPTDatasetV1", "create_dataloader_v1")},
    **{n: ("gptfast.train", n) for n in ("calc_loss_batch", "calc_loss_loader", "evaluate_model",
                                         "generate_and_print_sample", "train_model_simple", "train_model",
                                         "plot_losses", "Trainer", "TrainConfig", "latest_checkpoint")},
    "KVCache": ("gptfast.kv_cache", "KVCache"),
    # pretrained weights and fine-tuning (chapters 5-7, appendix E)
    "load_weights_into_gpt": ("gptfast.weights", "load_weights_into_gpt"),
    **{n: ("gptfast.lora", n) for n in ("LoRALayer", "LinearWithLoRA", "replace_linear_with_lora", "merge_lora",
                                        "save_lora", "load_lora")},
    **{n: ("gptfast.classify", n) for n in ("SpamDataset", "ClassificationDataset", "prepare_for_classification",
                                            "calc_accuracy_loader", "train_classifier_simple", "classify_review")},
    **{n: ("gptfast.instruct", n) for n in ("format_input", "InstructionDataset", "custom_collate_fn",
                                            "extract_response", "generate_response")},
    "generate_stream": ("gptfast.generation", "generate_stream"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'gptfast' has no attribute {name!r}")


__all__ = [
    "GPTConfig", "GPT_CONFIG_124M", "GPTModel", "LayerNorm", "GELU", "FeedForward", "MultiHeadAttention",
    "TransformerBlock", "generate", "generate_text_simple", "text_to_token_ids", "token_ids_to_text",
    "use_backend", "describe", "ops", "reference", "attention_weights", "plot_attention", "Tokenizer",
    "GPTDatasetV1", "create_dataloader_v1", "calc_loss_batch", "calc_loss_loader", "evaluate_model",
    "generate_and_print_sample", "train_model_simple", "train_model", "plot_losses", "Trainer", "TrainConfig",
    "latest_checkpoint", "KVCache", "generate_stream",
    "load_weights_into_gpt", "LoRALayer", "LinearWithLoRA", "replace_linear_with_lora", "merge_lora", "save_lora",
    "load_lora", "SpamDataset", "ClassificationDataset", "prepare_for_classification", "calc_accuracy_loader",
    "train_classifier_simple", "classify_review", "format_input", "InstructionDataset", "custom_collate_fn",
    "extract_response", "generate_response",
]
