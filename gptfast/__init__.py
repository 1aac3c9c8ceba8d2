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

_BOOK_ONLY = {
    "ch03": ("SelfAttention_v1", "SelfAttention_v2", "CausalAttention", "MultiHeadAttentionWrapper",
             "PyTorchMultiHeadAttention"),
    "ch04": ("FeedForwardFast", "TransformerBlockFast", "GPTModelFast"),
    "ch05": ("assign", "download_and_load_gpt2", "download_file", "load_gpt2_params_from_tf_ckpt"),
    "ch06": ("download_and_unzip_spam_data", "create_balanced_dataset", "random_split", "plot_values"),
    "ch07": ("download_and_load_file", "custom_collate_draft_1", "custom_collate_draft_2", "check_if_running",
             "query_model", "generate_model_scores"),
    "appendix_a": ("NeuralNetwork", "ToyDataset"),
    "appendix_d": ("find_highest_gradient",),
}

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
    # gptfast.classify(run_or_model, texts): the module itself is callable (see gptfast/classify.py)
    "classify": ("gptfast.classify", None),
    "freeze_parameters": ("gptfast.lora", "freeze_parameters"),
    # the rest of the book's names (gptfast.book mirrors its modules); those that would collide with the
    # names above -- chapter 6's losses, the KV-cache chapter's GPTModel -- stay in gptfast.book only
    **{n: ("gptfast.book." + m, n) for m, names in _BOOK_ONLY.items() for n in names},
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        loaded = importlib.import_module(module)
        return loaded if attr is None else getattr(loaded, attr)
    raise AttributeError(f"module 'gptfast' has no attribute {name!r}")


def __dir__():
    # the names loaded on first use too, so that tab completion offers them
    return sorted(set(globals()) | set(_LAZY))


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
    "extract_response", "generate_response", "freeze_parameters", "classify",
    *(n for names in _BOOK_ONLY.values() for n in names),
]
