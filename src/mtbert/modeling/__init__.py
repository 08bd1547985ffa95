"""Modeling: the encoder, poolers, task heads, the multitask model, adapters, checkpoints."""
