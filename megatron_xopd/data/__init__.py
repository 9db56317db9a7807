"""Training input: lhotse CutSets of paired speech/text prompts, the tokenizer and prompt format, batching."""
