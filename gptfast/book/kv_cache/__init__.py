"""The book's KV-cache chapter: a GPTModel whose forward takes a cache, and the cached greedy loop."""
