"""The Qwen3-Omni thinker as our speech student: its audio tower as the perception, its MoE LLM as an MCore GPT.

What transformers' ``Qwen3OmniMoeThinkerForConditionalGeneration`` does on an audio+text prompt, and how the
student reproduces it:

* the audio tower (``Qwen3OmniMoeAudioEncoder``) turns 128-bin log-mel features into LLM-width embeddings; the
  student runs transformers' own tower, frozen (as in the paper), behind NeMo's perception interface
  (``forward(input_signal, input_signal_length) -> (embeddings [B, T, H], lengths)``), so NeMo recipes can swap
  it. It takes log-mel features [B, frames, mel], or 16 kHz waveforms [B, samples], which it turns into log-mel
  with the checkpoint's own ``WhisperFeatureExtractor`` one audio at a time, as ``Qwen3OmniMoeProcessor`` does
  (:func:`omni_log_mel`). ``source="features"`` takes cached tower outputs instead and holds no tower at all;
* the embeddings replace the ``audio_token_id`` positions of ``input_ids`` in row-major order (transformers'
  ``masked_scatter``), which is :meth:`SpeechStudent.splice` with the audio token as the locator;
* the LLM is a Qwen3-MoE decoder (the same layers as ``Qwen3MoeForCausalLM``): our MCore MoE GPT;
* RoPE: the thinker applies interleaved multimodal RoPE with positions from ``get_rope_index``. For prompts of
  audio and text only, ``get_rope_index`` gives all three (temporal, height, width) rows the same contiguous
  positions (the attention mask's cumulative sum), and interleaved mRoPE with equal rows is plain 1D RoPE.
  So the student uses megatron's 1D RoPE, and :func:`audio_text_rope_index` computes transformers' positions
  (tests check both claims against transformers). megatron's RoPE runs at positions 0..S-1: prompts must not be
  left-padded (the student refuses position rows that are not 0..S-1 with a clear error).

The vision tower is not part of the student (the paper's student hears, it does not see).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..runtime.device import current_device
from .config import GPTModelConfig, ModelConfigError, RecomputeConfig
from .speech import SpeechStudent

log = logging.getLogger(__name__)


@dataclass
class OmniPerceptionConfig:
    """The Qwen3-Omni audio front-end.

    ``source="audio"``: transformers' ``Qwen3OmniMoeAudioEncoder`` built from ``audio_config`` (the thinker's
    ``audio_config`` dict) on log-mel features [B, frames, num_mel_bins]. ``source="features"``: cached tower
    outputs [B, tokens, hidden], spliced as they are.
    """

    source: str = "audio"
    audio_config: dict[str, Any] = field(default_factory=dict)
    freeze_encoder: bool = True
    # the HF directory's preprocessor_config.json (WhisperFeatureExtractor settings); {}: Whisper's defaults with
    # audio_config.num_mel_bins bins, which are Qwen3-Omni's processor settings
    feature_extractor: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in ("audio", "features"):
            raise ModelConfigError(f"model.student.perception.source: {self.source!r} is not 'audio' or 'features'")
        if self.source == "audio" and not self.audio_config:
            raise ModelConfigError("model.student.perception.audio_config is required when source='audio'")


def audio_output_lengths(mel_frames: torch.Tensor, n_window: int = 50) -> torch.Tensor:
    """Audio tokens the tower emits for ``mel_frames`` mel frames (transformers' own formula)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    return _get_feat_extract_output_lengths(mel_frames, n_window)


def feature_extractor(cfg: OmniPerceptionConfig):
    """The checkpoint's ``WhisperFeatureExtractor`` (the feature extractor of ``Qwen3OmniMoeProcessor``)."""
    from transformers import WhisperFeatureExtractor

    settings = {k: v for k, v in cfg.feature_extractor.items() if k not in ("feature_extractor_type", "processor_class")}
    settings.setdefault("feature_size", int(cfg.audio_config.get("num_mel_bins", 128)))
    return WhisperFeatureExtractor(**settings)


def omni_log_mel(extractor, waveforms: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """16 kHz mono waveforms -> (log-mel [B, frames, mel] zero-padded, frames [B]).

    Each audio alone, with the processor's audio settings (``padding=True, truncation=False``): Whisper's
    log-mel normalisation depends on the maximum over the whole (padded) input, so batching would change it.
    """
    mels = []
    for audio in waveforms:
        out = extractor(audio, sampling_rate=extractor.sampling_rate, padding=True, truncation=False,
                        return_attention_mask=True, return_tensors="pt")
        mels.append(out["input_features"][0, :, : int(out["attention_mask"][0].sum())].transpose(0, 1))
    lens = torch.tensor([m.shape[0] for m in mels], dtype=torch.long)
    return nn.utils.rnn.pad_sequence(mels, batch_first=True), lens


class Qwen3OmniAudioPerception(nn.Module):
    """The thinker's audio tower behind NeMo's perception interface (``source="audio"``), or a pass-through of
    cached tower outputs (``source="features"``)."""

    def __init__(self, cfg: OmniPerceptionConfig, output_dim: int) -> None:
        super().__init__()
        self.source = cfg.source
        self.output_dim = output_dim
        self.audio_tower = None
        if cfg.source == "audio":
            from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig
            from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

            config = Qwen3OmniMoeAudioEncoderConfig(**{k: v for k, v in cfg.audio_config.items() if k != "model_type"})
            if config.output_dim != output_dim:
                raise ModelConfigError(
                    f"model.student.perception.audio_config.output_dim ({config.output_dim}) must equal the LLM "
                    f"hidden_size ({output_dim})"
                )
            self.audio_tower = Qwen3OmniMoeAudioEncoder(config)
            self.feature_extractor = feature_extractor(cfg)

    def forward(self, input_signal: torch.Tensor, input_signal_length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, frames, mel] log-mel features or [B, samples] 16 kHz waveforms (or [B, tokens, H] cached outputs)
        -> ([B, T, H], [B] lengths)."""
        if self.audio_tower is None:
            if input_signal.shape[-1] != self.output_dim:
                raise ValueError(f"cached audio features have width {input_signal.shape[-1]}, the LLM {self.output_dim}")
            return input_signal, input_signal_length
        if input_signal.dim() == 2:  # waveforms: the processor's log-mel, on the CPU
            waves = [x[: int(n)].float().cpu().numpy() for x, n in zip(input_signal, input_signal_length)]
            mel, lengths = omni_log_mel(self.feature_extractor, waves)
            input_signal, input_signal_length = mel.to(input_signal.device), lengths.to(input_signal.device)
        lengths = input_signal_length.long()
        # transformers' tower takes the valid frames of all audios concatenated: [mel, sum(frames)].
        mel = torch.cat([x[: int(n)] for x, n in zip(input_signal, lengths)]).transpose(0, 1)
        mel = mel.to(self.audio_tower.conv2d1.weight.dtype)
        out = self.audio_tower(mel, feature_lens=lengths).last_hidden_state
        out_lengths = audio_output_lengths(lengths, self.audio_tower.n_window)
        pieces = out.split(out_lengths.tolist())
        return nn.utils.rnn.pad_sequence(list(pieces), batch_first=True), out_lengths


def audio_text_rope_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers' ``get_rope_index`` for audio+text prompts: [3, B, S] positions, the three rows equal.

    Without image/video grids transformers numbers the non-padding tokens 0.. (padding gets 1); audio start,
    audio tokens and audio end are numbered like text.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions.unsqueeze(0).expand(3, -1, -1)


class Qwen3OmniStudent(SpeechStudent):
    """The Qwen3-Omni thinker without its vision tower: frozen audio tower + MCore MoE GPT."""

    def __init__(
        self,
        llm_cfg: GPTModelConfig,
        perception_cfg: OmniPerceptionConfig | None,
        audio_token_id: int,
        *,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        sequence_parallel: bool | None = None,
        recompute: RecomputeConfig | None = None,
    ) -> None:
        # sequence_parallel=None: on where megatron-core's MoE layer needs it (TP > 1), as build_gpt_model decides
        super().__init__(llm_cfg, None, audio_token_id, pre_process=pre_process, post_process=post_process,
                         sequence_parallel=sequence_parallel, recompute=recompute)
        if self.pre_process and perception_cfg is not None:
            self.perception = Qwen3OmniAudioPerception(perception_cfg, llm_cfg.hidden_size).to(current_device())
            if perception_cfg.freeze_encoder:
                self.perception.requires_grad_(False)
            self._trainable_in_llm_dtype(llm_cfg.torch_dtype)
            self.mark_sequence_parallel()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                **kwargs: Any) -> torch.Tensor:
        """As :meth:`SpeechStudent.forward`; ``position_ids`` may be [B, S] or transformers' [3, B, S] rows."""
        if position_ids is not None and position_ids.dim() == 3:
            if not bool((position_ids == position_ids[:1]).all()):
                raise ValueError("position_ids: the three mRoPE rows differ (a vision prompt); the student takes audio+text only")
            position_ids = position_ids[0]
        if position_ids is not None and kwargs.get("inference_context") is None:
            expected = torch.arange(input_ids.shape[1], device=position_ids.device).expand_as(position_ids)
            if not torch.equal(position_ids.long(), expected):
                raise ValueError("position_ids must be 0..S-1 per row: megatron's RoPE does not take left-padded prompts")
        return super().forward(input_ids, position_ids, attention_mask, **kwargs)
