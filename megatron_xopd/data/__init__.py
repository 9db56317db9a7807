"""Paired speech/text prompt data: lhotse CutSets, tokenizers and prompt formats, batching, synthesis."""
