"""Data: file readers, batching, the tokenizer, text augmentations."""
