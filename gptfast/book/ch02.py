"""Chapter 2, working with text data: the sliding-window data set and its loader (gptfast.data)."""

from ..data import GPTDatasetV1, create_dataloader_v1

__all__ = ["GPTDatasetV1", "create_dataloader_v1"]
