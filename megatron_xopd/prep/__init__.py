"""Offline preparation, run by tools and examples before training: spoken prompts (espeak-ng + an ASR filter),
encoder-feature caches, prompt generators, and the CTC warm start of a speech adapter. Nothing in the training
path imports this package."""
