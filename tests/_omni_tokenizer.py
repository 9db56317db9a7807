"""Tiny offline Qwen-style tokenizers for the prompt-format tests, and Qwen3-Omni's processor built from one.

Byte-level vocabularies with ChatML and vision special tokens, as Qwen3's; the Omni tokenizer adds the audio tokens
after them (as Qwen3-Omni's adds its own after Qwen3's), and names them as the processor expects
(``audio_token``, ``audio_bos_token``, ...). The chat templates follow the checkpoints' own: Qwen3-Omni's renders an
audio item as ``<|audio_start|><|audio_pad|><|audio_end|>``; Qwen3's switches thinking off with
``enable_thinking=False``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
OMNI_AUDIO = ["<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"]
OMNI_NAMED = {"audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
              "image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
              "vision_eos_token": "<|vision_end|>"}

_SYSTEM_AND_ROLES = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'audio' or 'audio' in c or 'audio_url' in c %}<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif c['type'] == 'image' or 'image' in c %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' or 'video' in c %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
)
OMNI_TEMPLATE = _SYSTEM_AND_ROLES + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
QWEN3_TEMPLATE = (
    _SYSTEM_AND_ROLES + "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen_tokenizer(path: Path, *, omni: bool = False, template: str | None = None, rename: dict | None = None,
                   swap: tuple[int, int] | None = None) -> Path:
    """Write a tokenizer under ``path``: Qwen3-like, or with ``omni`` Qwen3-Omni-like (audio tokens appended).

    ``rename`` gives some special tokens another name at the same id (``{"<|im_end|>": "<|eot|>"}``); ``swap`` two
    ids of the byte vocabulary: the ways a teacher's tokenizer may differ from the student's.
    """
    rename = rename or {}
    specials = [rename.get(t, t) for t in QWEN_SPECIALS]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet())
    if swap:
        a, b = (len(specials) + i for i in swap)
        tokens[a], tokens[b] = tokens[b], tokens[a]
    if omni:
        specials, tokens = specials + OMNI_AUDIO, tokens + OMNI_AUDIO
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=rename.get("<|im_end|>", "<|im_end|>"),
                                   pad_token="<|endoftext|>", extra_special_tokens=OMNI_NAMED if omni else None)
    fast.chat_template = template or (OMNI_TEMPLATE if omni else QWEN3_TEMPLATE)
    fast.save_pretrained(path)
    return path


def omni_processor(tokenizer_dir: Path, monkeypatch):
    """transformers' ``Qwen3OmniMoeProcessor`` from the tokenizer (and its chat template) at ``tokenizer_dir`` and
    Whisper's 128-bin feature extractor, as Qwen3-Omni's ``preprocessor_config.json`` has it. The vision processors
    are never called on audio: the video one is the bare mixin (registered with transformers for the processor's
    class check), so torchvision is not needed."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3OmniMoeProcessor, WhisperFeatureExtractor
    from transformers import processing_utils
    from transformers.video_processing_utils import VideoProcessorMixin

    # the module in which the processor looks its components' base classes up
    monkeypatch.setattr(processing_utils.transformers_module, "VideoProcessorMixin", VideoProcessorMixin, raising=False)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return Qwen3OmniMoeProcessor(image_processor=Qwen2VLImageProcessorPil(), video_processor=VideoProcessorMixin(),
                                 feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer,
                                 chat_template=tokenizer.chat_template)
