"""The speech student: NeMo speechlm2 perception spliced at audio-locator tokens into a megatron-core GPT.

Convention (the one of megatron-core's ``models/mimo`` and NeMo's SALM): a prompt holds one audio-locator
token per audio; before the forward it is expanded to as many locator positions as the perception emits
frames, and the audio embeddings replace those positions in the embedding sequence, which enters the
``GPTModel`` as ``decoder_input``.

Why not ``megatron.core.models.mimo.MimoModel`` itself: in megatron-core 0.16 its ``forward`` always runs the
encoders and the embedding (no pipeline stages after the first) and takes no ``inference_context``, so it
cannot serve KV-cached rollouts or PP. :class:`SpeechStudent` keeps its splicing convention and adds both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..runtime.device import current_device
from .config import GPTModelConfig, ModelConfigError, RecomputeConfig
from .gpt import build_gpt_model


@dataclass
class PerceptionConfig:
    """The audio front-end.

    ``source="audio"``: NeMo's ``AudioPerceptionModule`` on waveforms; ``nemo`` is its config (``preprocessor``,
    ``encoder``, ``modality_adapter``, ``output_dim``), the ``perception`` section of a SALM config.
    ``source="features"``: cached frozen-encoder features [frames, ``feature_dim``]; only ``nemo.modality_adapter``
    and the projection run, with NeMo's module names, so SALM weights load unchanged.
    """

    source: str = "features"
    feature_dim: int | None = None
    nemo: dict[str, Any] = field(default_factory=dict)
    freeze_encoder: bool = True
    freeze_adapter: bool = True
    init_seed: int = 0  # random init of whatever no checkpoint fills, the same under any TP/PP layout

    def __post_init__(self) -> None:
        if self.source not in ("audio", "features"):
            raise ModelConfigError(f"model.student.perception.source: {self.source!r} is not 'audio' or 'features'")
        if "modality_adapter" not in self.nemo:
            raise ModelConfigError("model.student.perception.nemo.modality_adapter is required")
        if self.source == "features" and self.feature_dim is None:
            raise ModelConfigError("model.student.perception.feature_dim is required when source='features'")


def _adapter_out_dim(adapter_cfg: DictConfig, default: int) -> int:
    return int(adapter_cfg.get("d_model", adapter_cfg.get("feat_out", default)) or default)


class FeaturePerception(nn.Module):
    """``modality_adapter`` + ``proj`` of NeMo's ``AudioPerceptionModule``, on cached encoder features."""

    def __init__(self, cfg: PerceptionConfig, output_dim: int) -> None:
        super().__init__()
        from nemo.core.classes.common import Serialization

        adapter_cfg = OmegaConf.create(cfg.nemo["modality_adapter"])
        self.modality_adapter = Serialization.from_config_dict(adapter_cfg)
        out_dim = _adapter_out_dim(adapter_cfg, cfg.feature_dim)
        self.proj = nn.Linear(out_dim, output_dim) if out_dim != output_dim or "d_model" in adapter_cfg else nn.Identity()

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, D] features -> ([B, T', H] embeddings, [B] lengths)."""
        encoded, lengths = self.modality_adapter(audio_signal=features.transpose(1, 2), length=lengths)
        return self.proj(encoded.transpose(1, 2)), lengths


def build_perception(cfg: PerceptionConfig, output_dim: int) -> nn.Module:
    if cfg.source == "features":
        return FeaturePerception(cfg, output_dim)
    from nemo.collections.speechlm2.modules.perception import AudioPerceptionModule

    nemo_cfg = OmegaConf.create({**cfg.nemo, "output_dim": output_dim})
    return AudioPerceptionModule(nemo_cfg)


def expand_audio_locators(prompt: list[int], num_frames: int, locator_id: int) -> list[int]:
    """Replace the prompt's single audio locator by ``num_frames`` locators."""
    where = [i for i, tok in enumerate(prompt) if tok == locator_id]
    if len(where) != 1:
        raise ValueError(f"a speech prompt must hold exactly one audio locator (id {locator_id}); found {len(where)}")
    i = where[0]
    return prompt[:i] + [locator_id] * num_frames + prompt[i + 1 :]


class SpeechStudent(MegatronModule):
    """A speech LLM: perception (first pipeline stage only) + a megatron-core ``GPTModel``."""

    def __init__(
        self,
        llm_cfg: GPTModelConfig,
        perception_cfg: PerceptionConfig | None,
        audio_locator_id: int,
        *,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        sequence_parallel: bool = False,
        recompute: RecomputeConfig | None = None,
    ) -> None:
        language_model = build_gpt_model(
            llm_cfg, pre_process=pre_process, post_process=post_process, sequence_parallel=sequence_parallel,
            recompute=recompute,
        )
        super().__init__(config=language_model.config)
        if not llm_cfg.text_vocab_size <= audio_locator_id < llm_cfg.vocab_size:
            raise ModelConfigError(
                f"model.student: audio locator id {audio_locator_id} must be an added token, in "
                f"[text_vocab_size={llm_cfg.text_vocab_size}, vocab_size={llm_cfg.vocab_size})"
            )
        self.llm_cfg = llm_cfg
        self.audio_locator_id = audio_locator_id
        self.language_model: GPTModel = language_model
        self.model_type = language_model.model_type  # read by megatron's pipeline schedules
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.perception = None
        if self.pre_process and perception_cfg is not None:  # None: a text-only student (data.speech_input=none)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(perception_cfg.init_seed)
                # built on the CPU by NeMo; megatron builds the GPT on this rank's device already
                self.perception = build_perception(perception_cfg, llm_cfg.hidden_size).to(current_device())
        if self.perception is not None:
            self._freeze(perception_cfg)
            self._trainable_in_llm_dtype(llm_cfg.torch_dtype)
            self.mark_sequence_parallel()

    def _freeze(self, cfg: PerceptionConfig) -> None:
        for name in ("preprocessor", "encoder"):
            if cfg.freeze_encoder and hasattr(self.perception, name):
                getattr(self.perception, name).requires_grad_(False)
        if cfg.freeze_adapter:
            self.perception.modality_adapter.requires_grad_(False)
            self.perception.proj.requires_grad_(False)

    def _trainable_in_llm_dtype(self, dtype: torch.dtype) -> None:
        """In a 16-bit run, the perception's trainable parts hold the LLM's dtype and cast their inputs to it.

        megatron-core's mixed-precision optimizer keeps fp32 main copies of 16-bit parameters and cannot save the
        state of an fp32 parameter beside them (``Float16OptimizerWithFloat16Params.sharded_state_dict`` maps its
        16-bit groups only; the distributed optimizer's checkpoint formats take one dtype per buffer): megatron wraps
        whole models in ``Float16Module`` for this. Frozen parts (the encoder) keep their own dtype.
        """
        if dtype == torch.float32:
            return
        for child in self.perception.children():
            if any(p.requires_grad for p in child.parameters()):
                child.to(dtype)
                child.register_forward_pre_hook(
                    lambda _m, args, kwargs: (
                        tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args),
                        {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                         for k, v in kwargs.items()},
                    ),
                    with_kwargs=True,
                )

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor]) -> None:
        self.language_model.set_input_tensor(input_tensor)

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def embed_audio(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> list[torch.Tensor]:
        """Perception output per example: a list of [frames_i, hidden] tensors.

        ``audio`` is [B, samples] waveforms (``source="audio"``) or [B, frames, feature_dim] features.
        """
        if self.perception is None:
            raise RuntimeError("embed_audio: no perception here (a text-only student, or not the first pipeline stage)")
        if isinstance(self.perception, FeaturePerception):
            emb, lens = self.perception(audio, audio_lens)
        else:
            emb, lens = self.perception(input_signal=audio, input_signal_length=audio_lens)
        return [emb[i, : int(n)] for i, n in enumerate(lens)]

    def splice(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, audio_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with locator positions replaced, row-major, by ``audio_embeds`` [n, H] -> [S, B, H].

        With sequence parallelism the embedding returns this rank's slice of the sequence, [S/TP, B, H]; each
        rank splices the audio frames that fall in its slice (so the perception's gradient is partial per rank
        and summed over TP by megatron's ``finalize_model_grads``: see :meth:`mark_sequence_parallel`).
        """
        is_audio = input_ids == self.audio_locator_id
        count = int(is_audio.sum())
        if count != audio_embeds.shape[0]:
            raise ValueError(f"{count} audio-locator positions but {audio_embeds.shape[0]} audio embeddings")
        text_ids = input_ids.masked_fill(is_audio, 0)
        embeds = self.language_model.embedding(input_ids=text_ids, position_ids=position_ids)  # [S(/TP), B, H]
        order = (is_audio.flatten().cumsum(0) - 1).view_as(input_ids)  # row-major index of each audio position
        local = embeds.shape[0]
        start = parallel_state.get_tensor_model_parallel_rank() * local if local != input_ids.shape[1] else 0
        here = is_audio[:, start : start + local]
        embeds = embeds.transpose(0, 1).clone()
        embeds[here] = audio_embeds[order[:, start : start + local][here]].to(embeds.dtype)
        return embeds.transpose(0, 1).contiguous()

    def mark_sequence_parallel(self) -> None:
        """Under sequence parallelism each TP rank splices only its slice of the audio frames, so the trainable
        perception's gradients are partial sums: mark them, as megatron marks its norms, for the TP all-reduce
        in ``finalize_model_grads``."""
        if self.perception is not None and self.config.sequence_parallel:
            for param in self.perception.parameters():
                if param.requires_grad:
                    param.sequence_parallel = True

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        audio_embeds: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        audio_lens: torch.Tensor | None = None,
        inference_context: Any = None,
        labels: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> torch.Tensor:
        """Vocab-parallel logits [B, S, V/TP] (last stage) or hidden states (other stages).

        ``audio_embeds``: the concatenated perception outputs of the batch's audio positions, in row-major
        order of the locator positions. Or ``audio`` / ``audio_lens`` (the inputs of :meth:`embed_audio`, one per
        locator in row-major order): the perception runs inside this forward, so a trainable perception
        gets gradients. Without either the student is a plain text LLM.
        """
        if self.pre_process and audio is not None:
            audio_embeds = torch.cat(self.embed_audio(audio, audio_lens))
        decoder_input = None
        if self.pre_process and audio_embeds is not None:
            decoder_input = self.splice(input_ids, position_ids, audio_embeds)
        elif self.pre_process and bool((input_ids == self.audio_locator_id).any()):
            raise ValueError("input_ids hold audio locators but no audio_embeds were given")
        return self.language_model(
            input_ids,
            position_ids,
            attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            inference_context=inference_context,
            runtime_gather_output=runtime_gather_output,
        )


def check_vocab_partition(student: GPTModelConfig, teacher: GPTModelConfig, tensor_parallel_size: int) -> tuple[int, int]:
    """Teacher and student must shard one vocabulary the same way; returns (padded vocab, text vocab).

    The text vocabularies must be equal, and both models must pad to the same size, so that on every TP rank
    the two logit shards cover the same ids. The student's added tokens (the audio locator) lie at or beyond
    ``text_vocab_size`` and are excluded from every loss and sampler.
    """
    if student.text_vocab_size != teacher.text_vocab_size:
        raise ModelConfigError(
            f"unequal vocab: model.student.text_vocab_size={student.text_vocab_size} but "
            f"model.teacher.text_vocab_size={teacher.text_vocab_size}; teacher and student need one tokenizer"
        )
    s_pad, t_pad = student.padded_vocab(tensor_parallel_size), teacher.padded_vocab(tensor_parallel_size)
    if s_pad != t_pad:
        raise ModelConfigError(
            f"unequal vocab: padded vocab sizes differ (student {s_pad}, teacher {t_pad}); set "
            f"padded_vocab_size to {max(s_pad, t_pad)} in both model.student and model.teacher"
        )
    return s_pad, student.text_vocab_size


def common_padded_vocab(configs: list[GPTModelConfig], tensor_parallel_size: int) -> int:
    """The smallest padding that fits every config: set it as ``padded_vocab_size`` on all of them."""
    multiple = max(c.make_vocab_size_divisible_by for c in configs) * tensor_parallel_size
    rows = max(c.vocab_size for c in configs)
    return -(-rows // multiple) * multiple


def audio_locator_id(tokenizer: Any, audio_locator: str) -> int:
    """The id of the audio-locator token; a clear error when the tokenizer does not have it as one token."""
    ids = tokenizer.encode(audio_locator, add_special_tokens=False)
    if len(ids) != 1 or audio_locator not in tokenizer.get_vocab():
        raise ModelConfigError(
            f"model.student.audio_locator: {audio_locator!r} is not a single special token of the student tokenizer "
            f"(it encodes to {ids}); add it with load_tokenizer(..., audio_locator=...)"
        )
    return ids[0]
