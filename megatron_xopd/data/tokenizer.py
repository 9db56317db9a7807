"""Tokenizers of the student (speech LLM) and teacher (text LLM), and their chat-formatted prompts.

The student's tokenizer is the teacher's plus one special audio-locator token, which marks where the
encoded speech is spliced into the prompt. Distillation compares the two models' distributions over the
same vocabulary, so the two tokenizers must agree on every other id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

AUDIO_LOCATOR = "<|audio|>"
_SHOWN_MISMATCHES = 5


@dataclass(frozen=True)
class VocabReport:
    """Outcome of :func:`check_vocab_compat`: the shared vocabulary size and the student's locator id."""

    shared_size: int
    audio_locator_id: int | None


def load_tokenizer(path: Path | str, audio_locator: str = AUDIO_LOCATOR) -> PreTrainedTokenizerBase:
    """Load the HF tokenizer (with its chat template) at ``path`` and register ``audio_locator`` as a special token."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if audio_locator not in tokenizer.all_special_tokens:
        # Second argument False: extend the extra/additional special tokens instead of replacing them.
        tokenizer.add_special_tokens({"additional_special_tokens": [audio_locator]}, False)
    return tokenizer


def check_vocab_compat(
    student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase, audio_locator: str = AUDIO_LOCATOR
) -> VocabReport:
    """Check that the two tokenizers map every id to the same token, apart from the student's audio locator.

    Raises ``ValueError`` naming the sizes and the first mismatching ids when they differ.
    """
    student = {idx: tok for tok, idx in student_tok.get_vocab().items()}
    teacher = {idx: tok for tok, idx in teacher_tok.get_vocab().items()}
    locator_id = student_tok.convert_tokens_to_ids(audio_locator) if audio_locator in student.values() else None
    if locator_id is not None and teacher.get(locator_id) != audio_locator:
        del student[locator_id]
    mismatches = [
        f"id {idx}: student {student.get(idx)!r} vs teacher {teacher.get(idx)!r}"
        for idx in sorted(student.keys() | teacher.keys())
        if student.get(idx) != teacher.get(idx)
    ]
    if mismatches:
        raise ValueError(
            f"student and teacher vocabularies differ (student {len(student)} tokens, its {audio_locator!r} aside; "
            f"teacher {len(teacher)} tokens; {len(mismatches)} ids differ): "
            + "; ".join(mismatches[:_SHOWN_MISMATCHES])
        )
    return VocabReport(shared_size=len(teacher), audio_locator_id=locator_id)


def format_prompt(
    tokenizer: PreTrainedTokenizerBase, text: str, *, audio: bool, audio_locator: str = AUDIO_LOCATOR
) -> list[int]:
    """Token ids of a one-turn chat prompt ending in the assistant header (``add_generation_prompt=True``).

    With ``audio=True`` the user message is the audio locator alone (one token) and ``text`` is not used:
    the speech itself is spliced in by the student at the locator's position.
    """
    messages = [{"role": "user", "content": audio_locator if audio else text}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template renders any BOS itself, so the tokenizer must not add special tokens again.
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    if audio and ids.count(tokenizer.convert_tokens_to_ids(audio_locator)) != 1:
        raise ValueError(f"{audio_locator!r} is not a single special token of this tokenizer: use load_tokenizer")
    return ids
