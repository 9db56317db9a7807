"""Tokenizers of the student (speech LLM) and teacher (text LLM), and the check that they share the text vocabulary.

The student's tokenizer is the teacher's plus its own audio tokens: one added audio-locator token, which marks where
the encoded speech is spliced into the prompt, or the audio tokens of a family that has its own
(:mod:`.prompt_format`). Distillation compares the two models' distributions over the same vocabulary, so the two
tokenizers must agree on every other id, and end the assistant's turn with the same token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .prompt_format import AUDIO_LOCATOR, PromptFormat, Qwen3OmniFormat, end_of_turn_token, student_format

__all__ = ["AUDIO_LOCATOR", "VocabReport", "check_end_of_turn", "check_vocab_compat", "format_prompt",
           "load_text_tokenizer", "load_tokenizer"]
_SHOWN_MISMATCHES = 5
END_OF_TURN_RULE = "the end of a turn is ChatML's '<|im_end|>' where a tokenizer has it, else its EOS token"


@dataclass(frozen=True)
class VocabReport:
    """Outcome of :func:`check_vocab_compat`: the shared vocabulary size and the student's locator id."""

    shared_size: int
    audio_locator_id: int | None


def load_text_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    """The HF tokenizer at ``path`` with its chat template, as it is (the teacher's). A chat template kept only in
    the processor's ``chat_template.json`` (as multimodal checkpoints ship it) is the tokenizer's too."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    processor_template = Path(path) / "chat_template.json"
    if tokenizer.chat_template is None and processor_template.is_file():
        tokenizer.chat_template = json.loads(processor_template.read_text())["chat_template"]
    return tokenizer


def load_tokenizer(path: Path | str, audio_locator: str | None = AUDIO_LOCATOR) -> PreTrainedTokenizerBase:
    """The student's tokenizer (:func:`load_text_tokenizer`) with ``audio_locator`` (None: ``<|audio|>``) registered
    as a special token, unless the tokenizer has audio tokens of its own (Qwen3-Omni's)."""
    tokenizer = load_text_tokenizer(path)
    locator = audio_locator or AUDIO_LOCATOR
    if not Qwen3OmniFormat.matches(tokenizer) and locator not in tokenizer.all_special_tokens:
        # Second argument False: extend the extra/additional special tokens instead of replacing them.
        tokenizer.add_special_tokens({"additional_special_tokens": [locator]}, False)
    return tokenizer


def check_vocab_compat(
    student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase, audio_locator: str | None = None
) -> VocabReport:
    """Check that the two tokenizers map every id to the same token, apart from the student's own audio tokens
    (its locator; Qwen3-Omni's audio tokens and every id after the first of them) that the teacher lacks.

    Raises ``ValueError`` naming the sizes and the first mismatching ids when they differ.
    """
    student = {idx: tok for tok, idx in student_tok.get_vocab().items()}
    teacher = {idx: tok for tok, idx in teacher_tok.get_vocab().items()}
    fmt = student_format(student_tok, audio_locator)
    has_locator = fmt.locator in student.values()
    if has_locator:
        first_own = min(fmt.own_token_ids)
        for idx in [i for i in student if i >= first_own and teacher.get(i) != student[i]]:
            del student[idx]
    mismatches = [
        f"id {idx}: student {student.get(idx)!r} vs teacher {teacher.get(idx)!r}"
        for idx in sorted(student.keys() | teacher.keys())
        if student.get(idx) != teacher.get(idx)
    ]
    if mismatches:
        raise ValueError(
            f"student and teacher vocabularies differ (student {len(student)} tokens, its audio tokens aside; "
            f"teacher {len(teacher)} tokens; {len(mismatches)} ids differ): "
            + "; ".join(mismatches[:_SHOWN_MISMATCHES])
        )
    return VocabReport(shared_size=len(teacher), audio_locator_id=fmt.locator_id if has_locator else None)


def check_end_of_turn(student: PromptFormat, teacher: PromptFormat) -> int:
    """The id of the token that ends the assistant's turn, which both tokenizers must have as the same id: the
    responses (and the rollouts' stop token) are shared. Raises ``ValueError`` otherwise."""
    tokens = {name: end_of_turn_token(fmt.tokenizer) for name, fmt in (("student", student), ("teacher", teacher))}
    ids = {"student": student.end_of_turn_id, "teacher": teacher.end_of_turn_id}
    if None in tokens.values() or tokens["student"] != tokens["teacher"] or ids["student"] != ids["teacher"]:
        shown = ", ".join(f"{name} {tokens[name]!r} (id {ids[name]})" for name in tokens)
        raise ValueError(f"student and teacher end the assistant's turn with different tokens ({shown}): "
                         f"{END_OF_TURN_RULE}")
    return ids["student"]


def format_prompt(
    tokenizer: PreTrainedTokenizerBase, text: str, *, audio: bool, audio_locator: str | None = None
) -> list[int]:
    """Token ids of a one-turn chat prompt ending in the assistant header (``add_generation_prompt=True``), in the
    student's own format (:func:`.prompt_format.student_format`), without chat options.

    With ``audio=True`` the user message is the audio alone (one locator token) and ``text`` is not used:
    the speech itself is spliced in by the student at the locator's position.
    """
    fmt = student_format(tokenizer, audio_locator)
    return fmt.speech_prompt() if audio else fmt.text_prompt(text)
