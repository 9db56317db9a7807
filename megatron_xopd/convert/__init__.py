"""Checkpoint conversion: GGUF, Hugging Face and NeMo SALM formats to and from megatron-core."""
