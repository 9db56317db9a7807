"""Build the run's models, optimizer and LR schedule from the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from safetensors.torch import load_file

from ..convert.checkpoint import load_hf_weights, load_mcore_checkpoint, load_model_config
from ..convert.hf import HFCheckpoint, hf_config_to_model_config
from ..convert.sources import resolve_path
from ..data.prompt_format import ChatOptions, LocatorFormat, PromptFormat, student_format
from ..data.tokenizer import check_end_of_turn, check_vocab_compat, load_text_tokenizer, load_tokenizer
from ..runtime.parallel import ParallelConfig

from ..models import (
    GPTModelConfig,
    ModelConfigError,
    PerceptionConfig,
    RecomputeConfig,
    SpeechStudent,
    audio_locator_id,
    build_teacher,
    common_padded_vocab,
)
from .config import LLMSection, OptimSection, RunConfig


def llm_config(section: LLMSection, where: str) -> GPTModelConfig:
    """The architecture from the checkpoint it comes with, updated by the fields given inline."""
    if section.hf_path:
        base = hf_config_to_model_config(HFCheckpoint(resolve_path(section.hf_path)).config).to_dict()
    elif section.mcore_path:
        base = load_model_config(resolve_path(section.mcore_path)).to_dict()
    else:
        base = {}
    return GPTModelConfig.from_dict({**base, **section.llm}, where=where)


def load_llm_weights(model: torch.nn.Module, section: LLMSection, cfg: GPTModelConfig) -> None:
    """Load an HF directory or a megatron checkpoint into this rank's shard; random init when neither is set.

    Embedding rows beyond the checkpoint's (the student's audio locator) are zero: they are never read.
    """
    if section.hf_path:
        load_hf_weights(model, HFCheckpoint(resolve_path(section.hf_path)), cfg)
    elif section.mcore_path:
        load_mcore_checkpoint(model, resolve_path(section.mcore_path))


@dataclass
class Models:
    student: SpeechStudent
    teacher: torch.nn.Module
    student_cfg: GPTModelConfig
    teacher_cfg: GPTModelConfig
    text_vocab_size: int
    audio_locator_id: int


@dataclass
class Prompts:
    """Each model's prompt format: its own tokenizer, chat template and options (``data/prompt_format.py``)."""

    student: LocatorFormat
    teacher: PromptFormat

    @property
    def text_vocab_size(self) -> int:
        """The ids below the student's first own audio token: the text vocabulary of both models."""
        return min(self.student.own_token_ids)


def chat_options(section: LLMSection) -> ChatOptions:
    return ChatOptions(section.system_prompt, dict(section.chat_template_kwargs))


def load_prompts(cfg: RunConfig, tokenizer: Any = None) -> Prompts:
    """The student's prompt format (``model.tokenizer``, or the loaded ``tokenizer``) and the teacher's (its own
    tokenizer: :func:`teacher_tokenizer_source`), each with its chat options; a teacher tokenizer that does not share
    the student's text vocabulary or end-of-turn token is an error naming the key it came from."""
    if tokenizer is None:
        tokenizer = load_tokenizer(str(resolve_path(cfg.model.tokenizer)), audio_locator=cfg.model.audio_locator)
    student = student_format(tokenizer, cfg.model.audio_locator, chat_options(cfg.model.student))
    source, key = teacher_tokenizer_source(cfg)
    teacher = PromptFormat(tokenizer if source is None else load_text_tokenizer(source), chat_options(cfg.model.teacher))
    if source is not None:
        try:
            check_end_of_turn(student, teacher)
        except ValueError as err:
            raise ModelConfigError(f"end-of-turn token: model.tokenizer vs {key}={source}: {err}") from err
        try:
            check_vocab_compat(tokenizer, teacher.tokenizer, audio_locator=student.locator)
        except ValueError as err:
            raise ModelConfigError(f"unequal vocab: model.tokenizer vs {key}={source}: {err}") from err
    return Prompts(student, teacher)


def build_models(cfg: RunConfig, tokenizer: Any, prompts: Prompts | None = None) -> Models:
    """Student and teacher on this rank's TP/PP shard, with one vocabulary partition (``prompts``: as
    :func:`load_prompts` of ``tokenizer``, which checks the teacher's tokenizer)."""
    prompts = prompts or load_prompts(cfg, tokenizer)
    locator = audio_locator_id(tokenizer, prompts.student.locator)
    student_cfg = llm_config(cfg.model.student, "model.student.llm")
    teacher_cfg = llm_config(cfg.model.teacher, "model.teacher.llm")
    # The ids below the student's own audio tokens are the text vocabulary of both models; embedding rows
    # beyond it (HF padding rows, the audio tokens) are excluded from every loss and sampler.
    text_vocab = prompts.text_vocab_size
    omni = omni_student_dir(cfg, locator)
    if omni is not None:  # the thinker's own text vocabulary: the ids below its audio tokens
        text_vocab = min(text_vocab, student_cfg.text_vocab_size)
    for name, llm in (("student", student_cfg), ("teacher", teacher_cfg)):
        if llm.vocab_size < text_vocab:
            raise ModelConfigError(
                f"unequal vocab: model.{name} has {llm.vocab_size} embedding rows but the tokenizer has "
                f"{text_vocab} text tokens"
            )
        llm.text_vocab_size = text_vocab
    student_cfg.vocab_size = max(student_cfg.vocab_size, locator + 1)
    layout = cfg.trainer.parallel
    try:
        layout.validate(dist.get_world_size(), ("model.student.llm", student_cfg), ("model.teacher.llm", teacher_cfg))
    except ValueError as err:
        raise ModelConfigError(str(err)) from None
    tp = parallel_state.get_tensor_model_parallel_world_size()
    padded = padded_vocab(cfg, student_cfg, teacher_cfg, tp)
    student_cfg.padded_vocab_size = teacher_cfg.padded_vocab_size = padded

    recompute = RecomputeConfig(cfg.trainer.recompute_granularity, cfg.trainer.recompute_method,
                                cfg.trainer.recompute_num_layers)
    if omni is not None:
        student = build_omni_student(cfg, omni, student_cfg, locator, layout.sequence_parallel, recompute)
    else:
        perception = None  # a text-only run (data.speech_input=none) needs no perception
        if cfg.data.speech_input != "none" or cfg.model.student.perception:
            perception = PerceptionConfig(**cfg.model.student.perception)
        student = SpeechStudent(student_cfg, perception, locator, sequence_parallel=layout.sequence_parallel,
                                recompute=recompute)
    load_llm_weights(student.language_model, cfg.model.student, student_cfg)
    if cfg.model.student.perception_weights and student.perception is not None and omni is None:
        student.perception.load_state_dict(load_file(str(resolve_path(cfg.model.student.perception_weights))))
    if cfg.model.student.freeze_llm:
        student.language_model.requires_grad_(False)
    if cfg.model.student.freeze_embedding:
        freeze_embedding(student.language_model)
    teacher = build_teacher(teacher_cfg, student_cfg, sequence_parallel=layout.sequence_parallel)
    load_llm_weights(teacher, cfg.model.teacher, teacher_cfg)
    return Models(student, teacher, student_cfg, teacher_cfg, text_vocab, locator)


def omni_student_dir(cfg: RunConfig, locator: int) -> Path | None:
    """The converted Qwen3-Omni directory when ``model.student.mcore_path`` is one (tools/convert_qwen3_omni_to_mcore.py
    wrote it), checked against the run's locator and speech input; ``None`` for any other student."""
    from ..convert.qwen3_omni import is_omni_student_dir, load_omni_student_configs

    section = cfg.model.student
    if not section.mcore_path or not is_omni_student_dir(resolve_path(section.mcore_path)):
        return None
    path = Path(resolve_path(section.mcore_path))
    meta = load_omni_student_configs(path)[2]
    if locator != meta["audio_token_id"]:
        raise ModelConfigError(
            f"model.audio_locator={cfg.model.audio_locator!r} is id {locator} in the tokenizer, but the Qwen3-Omni "
            f"student at model.student.mcore_path={section.mcore_path} splices audio at its audio_token_id "
            f"{meta['audio_token_id']} (<|audio_pad|>): set model.audio_locator to that token"
        )
    unknown = sorted(set(section.perception) - {"source"})
    if unknown:
        raise ModelConfigError(f"model.student.perception: {unknown} do not apply to a Qwen3-Omni student (its frozen "
                               f"audio tower comes from model.student.mcore_path); only 'source' (audio | features)")
    source = section.perception.get("source", "features")
    if cfg.data.speech_input != "none" and cfg.data.speech_input != source:
        raise ModelConfigError(
            f"data.speech_input={cfg.data.speech_input} but model.student.perception.source={source}: a Qwen3-Omni "
            f"student takes waveforms with source=audio (the frozen tower runs in the step) and the tower's cached "
            f"outputs (tools/cache_audio_features.py) with source=features"
        )
    return path


def build_omni_student(cfg: RunConfig, path: Path, llm_cfg: GPTModelConfig, locator: int, sequence_parallel: bool,
                       recompute: RecomputeConfig) -> SpeechStudent:
    """The Qwen3-Omni thinker as the student (its LLM is loaded by the caller): the frozen tower from the converted
    directory (``perception.source=audio``) or none (``features``: the tower's cached outputs are spliced)."""
    from ..convert.qwen3_omni import PERCEPTION_WEIGHTS, load_omni_perception, load_omni_student_configs
    from ..models.qwen3_omni import Qwen3OmniStudent

    source = None if cfg.data.speech_input == "none" else cfg.model.student.perception.get("source", "features")
    _, pcfg, _ = load_omni_student_configs(path, source or "features")
    student = Qwen3OmniStudent(llm_cfg, pcfg if source else None, locator, sequence_parallel=sequence_parallel,
                               recompute=recompute)
    weights = cfg.model.student.perception_weights
    load_omni_perception(student.perception, resolve_path(weights) if weights else path / PERCEPTION_WEIGHTS)
    return student


def freeze_embedding(llm: torch.nn.Module) -> None:
    """No gradient to the input embedding, nor to the output layer when it is tied to it (the same weights)."""
    if llm.pre_process:
        llm.embedding.word_embeddings.weight.requires_grad_(False)
    if llm.post_process and llm.share_embeddings_and_output_weights:
        llm.shared_embedding_or_output_weight().requires_grad_(False)


def teacher_tokenizer_source(cfg: RunConfig) -> tuple[Any, str]:
    """The teacher's own tokenizer and the config key that names it: ``model.teacher_tokenizer``, else the
    teacher's checkpoint directory (``hf_path``, or ``mcore_path``) when it holds a tokenizer; ``(None, "")`` when
    there is none: the teacher then reads ``model.tokenizer``'s (with its own chat options)."""
    if cfg.model.teacher_tokenizer:
        return resolve_path(cfg.model.teacher_tokenizer), "model.teacher_tokenizer"
    for key in ("hf_path", "mcore_path"):
        if getattr(cfg.model.teacher, key):
            path = resolve_path(getattr(cfg.model.teacher, key))
            if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
                return path, f"model.teacher.{key}"
    return None, ""


def padded_vocab(cfg: RunConfig, student: GPTModelConfig, teacher: GPTModelConfig, tp: int) -> int:
    """The one embedding padding of both models: a ``padded_vocab_size`` given inline by the user if it fits both
    (and equals the other's when both are given), else the smallest common one."""
    needed = common_padded_vocab([student, teacher], tp)
    given = {f"model.{name}.llm.padded_vocab_size": section.llm["padded_vocab_size"]
             for name, section in (("student", cfg.model.student), ("teacher", cfg.model.teacher))
             if section.llm.get("padded_vocab_size") is not None}
    if not given:
        return needed
    if len(set(given.values())) > 1:
        raise ModelConfigError(f"student and teacher share one vocabulary partition: {given} must be equal")
    (key, value), = list(given.items())[:1]
    rows = max(student.vocab_size, teacher.vocab_size)
    if value < rows or value % tp:
        raise ModelConfigError(f"{key}={value} must be >= {rows} (the larger model's vocabulary with the student's "
                               f"audio locator) and divisible by tensor_model_parallel_size={tp}; {needed} fits")
    return value


def distributed_optimizer(layout: ParallelConfig) -> bool:
    """``trainer.parallel.use_distributed_optimizer``; unset: shard the optimizer state when DP > 1."""
    if layout.use_distributed_optimizer is None:
        return parallel_state.get_data_parallel_world_size() > 1
    return layout.use_distributed_optimizer


def wrap_ddp(model: torch.nn.Module, layout: ParallelConfig | None = None) -> DistributedDataParallel:
    """megatron's DDP: gradient buffers, DP reduction (overlapped with the backward when ``overlap_grad_reduce``),
    and ``finalize_model_grads`` as the schedule's hook."""
    layout = layout or ParallelConfig()
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=layout.overlap_grad_reduce,
            use_distributed_optimizer=distributed_optimizer(layout),
        ),
        model,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    if layout.overlap_grad_reduce:
        model.config.grad_sync_func = ddp.start_grad_sync
    return ddp


def build_optimizer(ddp: DistributedDataParallel, optim: OptimSection, max_steps: int) -> tuple[Any, OptimizerParamScheduler]:
    """megatron's optimizer (distributed across DP when DP > 1) with gradient clipping, and its LR schedule."""
    dtype = ddp.module.config.params_dtype
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=ddp.ddp_config.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=optim.lr if optim.warmup_steps == 0 else 0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr if optim.decay_style != "constant" else optim.lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(max_steps, optim.warmup_steps + 1),
        lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler

