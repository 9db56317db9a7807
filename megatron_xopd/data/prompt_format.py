"""How each model's prompts are rendered: by its own tokenizer and chat template, with its own options (a system
prompt, template switches such as ``enable_thinking``), and, for the student's speech prompt, in its family's own
audio layout. Whatever a model family needs lives here, once per family:

* ``locator`` (LLMs such as SmolLM2 with one added audio-locator token; NeMo's SALM, whose ``audio_locator_tag`` is
  that token): the speech prompt's user message is the locator string, as NeMo's SALM renders it;
* ``qwen3_omni`` (a tokenizer with ``<|audio_start|>``, ``<|audio_pad|>`` and ``<|audio_end|>``): the user message is
  one audio item, which Qwen3-Omni's chat template renders as ``<|audio_start|><|audio_pad|><|audio_end|>``, the
  layout of transformers' ``Qwen3OmniMoeProcessor``. The processor repeats ``<|audio_pad|>`` once per audio-tower
  output frame; the trainer does the same at batch time (:func:`~megatron_xopd.models.speech.expand_audio_locators`),
  so ``<|audio_pad|>`` (the thinker's ``audio_token_id``, already in the vocabulary) is this family's locator.

Every prompt is one user turn ending in the assistant header (``add_generation_prompt=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from transformers import PreTrainedTokenizerBase

AUDIO_LOCATOR = "<|audio|>"  # the locator family's default locator token
END_OF_TURN = "<|im_end|>"  # ChatML's; a tokenizer without it ends turns with its EOS


@dataclass(frozen=True)
class ChatOptions:
    """One model's chat-template options (``model.student.*`` / ``model.teacher.*`` of the run config)."""

    system_prompt: str | None = None  # a system turn before the user's; None: none (or the template's own default)
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)  # passed to ``apply_chat_template``


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The token that ends an assistant turn: ChatML's ``<|im_end|>`` when the tokenizer has it, else its EOS."""
    return END_OF_TURN if END_OF_TURN in tokenizer.get_vocab() else tokenizer.eos_token


class PromptFormat:
    """One model's text prompts, rendered by its own tokenizer and chat template with its own options. The
    student's formats (the subclasses) also render its speech prompt, holding exactly one audio locator."""

    family = "text"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, options: ChatOptions = ChatOptions()) -> None:
        self.tokenizer = tokenizer
        self.options = options

    def render(self, content: str | list[dict[str, Any]]) -> list[int]:
        """Token ids of the one-turn prompt whose user message is ``content``."""
        messages = [{"role": "user", "content": content}]
        if self.options.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.options.system_prompt})
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                      **dict(self.options.chat_template_kwargs))
        # The template renders any BOS itself, so the tokenizer must not add special tokens again.
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    def text_prompt(self, text: str) -> list[int]:
        return self.render(text)

    @property
    def end_of_turn_id(self) -> int | None:
        token = end_of_turn_token(self.tokenizer)
        return None if token is None else self.tokenizer.convert_tokens_to_ids(token)


class LocatorFormat(PromptFormat):
    """The speech prompt's user message is the audio locator alone, one special token added to the tokenizer
    (``load_tokenizer``); the speech is spliced in at its position. The locator is the tokenizer's first id
    beyond the text vocabulary."""

    family = "locator"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, options: ChatOptions = ChatOptions(),
                 locator: str = AUDIO_LOCATOR) -> None:
        super().__init__(tokenizer, options)
        self.locator = locator

    @property
    def locator_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.locator)

    @property
    def own_token_ids(self) -> list[int]:
        """The student's ids that are not text: the teacher has none of them, and no loss or sampler emits them."""
        return [self.locator_id]

    def speech_content(self) -> str | list[dict[str, Any]]:
        return self.locator

    def speech_prompt(self) -> list[int]:
        """Token ids of the speech prompt, with one audio locator where the speech goes."""
        ids = self.render(self.speech_content())
        if ids.count(self.locator_id) != 1:
            raise ValueError(f"{self.locator!r} is not a single special token of this tokenizer: use load_tokenizer")
        return ids


class Qwen3OmniFormat(LocatorFormat):
    """Qwen3-Omni's audio layout: ``<|audio_start|><|audio_pad|><|audio_end|>`` in the user turn, rendered by the
    tokenizer's own chat template from an audio content item (as ``Qwen3OmniMoeProcessor.apply_chat_template``)."""

    family = "qwen3_omni"
    LOCATOR, START, END = "<|audio_pad|>", "<|audio_start|>", "<|audio_end|>"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, options: ChatOptions = ChatOptions()) -> None:
        super().__init__(tokenizer, options, self.LOCATOR)

    @classmethod
    def matches(cls, tokenizer: PreTrainedTokenizerBase) -> bool:
        vocab = tokenizer.get_vocab()
        return all(token in vocab for token in (cls.LOCATOR, cls.START, cls.END))

    @property
    def own_token_ids(self) -> list[int]:
        """The audio tokens; every id from the smallest of them on belongs to the Omni tokenizer alone."""
        return [self.tokenizer.convert_tokens_to_ids(t) for t in (self.START, self.LOCATOR, self.END)]

    def speech_content(self) -> str | list[dict[str, Any]]:
        return [{"type": "audio", "audio": "speech"}]

    def speech_prompt(self) -> list[int]:
        ids = self.render(self.speech_content())
        start, locator, end = (self.tokenizer.convert_tokens_to_ids(t) for t in (self.START, self.LOCATOR, self.END))
        window = [i for i in range(len(ids) - 2) if ids[i: i + 3] == [start, locator, end]]
        if len(window) != 1 or ids.count(locator) != 1:
            raise ValueError(
                f"model.tokenizer: its chat template does not render an audio item as {self.START}{self.LOCATOR}"
                f"{self.END} once (Qwen3-Omni's layout); it rendered {self.tokenizer.decode(ids)!r}. Use the "
                "Qwen3-Omni checkpoint's own chat template (chat_template.json)")
        return ids


def student_format(tokenizer: PreTrainedTokenizerBase, audio_locator: str | None = None,
                   options: ChatOptions = ChatOptions()) -> LocatorFormat:
    """The student's prompt format, chosen from its tokenizer: Qwen3-Omni's when it has the Omni audio tokens,
    else the locator family's with ``audio_locator`` (``model.audio_locator``; None: ``<|audio|>``)."""
    if Qwen3OmniFormat.matches(tokenizer):
        if audio_locator not in (None, Qwen3OmniFormat.LOCATOR):
            raise ValueError(f"model.audio_locator={audio_locator!r}: a Qwen3-Omni tokenizer marks the audio with "
                             f"{Qwen3OmniFormat.LOCATOR!r} (its audio_token_id); leave model.audio_locator unset")
        return Qwen3OmniFormat(tokenizer, options)
    return LocatorFormat(tokenizer, options, audio_locator or AUDIO_LOCATOR)
