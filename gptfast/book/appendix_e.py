"""Appendix E, parameter-efficient fine-tuning with LoRA (gptfast.lora). ``replace_linear_with_lora``
freezes nothing, as the book's; ``freeze_base=True`` freezes the model first."""

from ..lora import LinearWithLoRA, LoRALayer, replace_linear_with_lora

__all__ = ["LoRALayer", "LinearWithLoRA", "replace_linear_with_lora"]
