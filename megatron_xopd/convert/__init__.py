"""Checkpoint conversion into Hugging Face format."""
