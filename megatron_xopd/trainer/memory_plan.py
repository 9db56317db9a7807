"""The memory plan of a recipe: the run's two model configs, vocabulary padding, perception and per-rank workload as
the trainer would build them, handed to :mod:`megatron_xopd.models.memory`. Used by ``tools/plan_memory.py``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from ..convert.sources import resolve_path
from ..data.prompt_format import student_format
from ..data.tokenizer import load_tokenizer
from ..models import GPTModelConfig, ModelConfigError, PerceptionConfig, audio_locator_id, common_padded_vocab
from ..models.memory import GiB, Layout, MemoryPlan, Workload, plan_memory
from ..models.speech import build_perception
from .build import llm_config
from .config import LLMSection, RunConfig

PRESETS = Path(__file__).resolve().parents[2] / "examples" / "conf" / "models"


def load_preset(spec: str) -> dict:
    """A preset name (``examples/conf/models/<name>.yaml``) or a YAML path of GPTModelConfig fields."""
    return GPTModelConfig.load(_preset_path(spec)).to_dict()


def _preset_path(spec: str) -> Path:
    path = Path(spec) if spec.endswith((".yaml", ".yml")) else PRESETS / f"{spec}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise ModelConfigError(f"model preset {spec!r}: no file {path}; known presets: {known}")
    return path


def _on_this_machine(section: LLMSection) -> bool:
    source = section.hf_path or section.mcore_path
    return not source or source.startswith("builtin:") or Path(source).expanduser().exists()


def section_config(section: LLMSection, where: str, preset: str | None) -> GPTModelConfig:
    """The architecture of one LLM: the checkpoint's config when it is on this machine, else its preset (``preset``
    from the command line first, then the recipe's ``model.<role>.preset``), updated by the recipe's ``llm``.

    A field the preset file names and the recipe's ``llm`` sets to another value is an error naming both: a plan of
    a model that is neither would be silently wrong (e.g. a 235B preset's expert width replaced by a 30B's).
    """
    role = where.split(".")[1]
    chosen = preset or (None if _on_this_machine(section) else section.preset)
    if not chosen:
        if not _on_this_machine(section):
            source = section.hf_path or section.mcore_path
            raise ModelConfigError(f"{where}: checkpoint {source!r} is not on this machine; give the architecture "
                                   f"with a preset (model.{role}.preset=NAME or --{role}-model NAME, one of "
                                   f"examples/conf/models/)")
        return llm_config(section, where)
    path = _preset_path(chosen)
    named = yaml.safe_load(path.read_text()) or {}
    clashes = [f"{where}.{key}={value!r} vs preset {chosen!r} ({path.name}) {key}={named[key]!r}"
               for key, value in section.llm.items() if key in named and named[key] != value]
    if clashes:
        raise ModelConfigError("the recipe's inline model fields disagree with the preset (drop the inline field or "
                               "pick the preset that has it): " + "; ".join(clashes))
    return GPTModelConfig.from_dict({**load_preset(chosen), **section.llm}, where=where)


@dataclass
class PerceptionCount:
    total: int
    trainable: int


def count_perception(perception: dict, hidden_size: int) -> PerceptionCount:
    """Parameters of the student's perception as built (on the meta device: no memory), and the trainable ones
    under its freeze flags (encoder/preprocessor, adapter/projection), as :class:`SpeechStudent` freezes them."""
    if not perception or set(perception) == {"source"}:
        # none, or a Qwen3-Omni student's (only `source`): cached tower outputs hold no module; its frozen tower
        # (source=audio) is not counted here
        return PerceptionCount(0, 0)
    cfg = PerceptionConfig(**perception)
    with torch.device("meta"):
        module = build_perception(cfg, hidden_size)
    frozen = set()
    if cfg.freeze_encoder:
        frozen |= {"preprocessor", "encoder"}
    if cfg.freeze_adapter:
        frozen |= {"modality_adapter", "proj"}
    total = trainable = 0
    for name, param in module.named_parameters():
        total += param.numel()
        if name.split(".")[0] not in frozen:
            trainable += param.numel()
    return PerceptionCount(total, trainable)


def run_model_configs(
    run: RunConfig, tensor_parallel_size: int, *, student_preset: str | None = None, teacher_preset: str | None = None
) -> tuple[GPTModelConfig, GPTModelConfig]:
    """Student and teacher configs with the trainer's vocabulary rules (``build_models``): the student's embedding
    grows to hold the audio locator when the tokenizer is at hand, and both share one padded vocabulary."""
    student = section_config(run.model.student, "model.student.llm", student_preset)
    teacher = section_config(run.model.teacher, "model.teacher.llm", teacher_preset)
    tokenizer = run.model.tokenizer
    if tokenizer.startswith("builtin:") or Path(tokenizer).expanduser().exists():
        loaded = load_tokenizer(str(resolve_path(tokenizer)), audio_locator=run.model.audio_locator)
        locator = audio_locator_id(loaded, student_format(loaded, run.model.audio_locator).locator)
        student.vocab_size = max(student.vocab_size, locator + 1)
    padded = common_padded_vocab([student, teacher], tensor_parallel_size)
    student.padded_vocab_size = teacher.padded_vocab_size = padded
    return student, teacher


def workload(run: RunConfig, recompute: str | None = None) -> Workload:
    """One DP rank's step from the recipe; speech prompts are bounded by ``trainer.rollout.max_prompt_tokens``."""
    xopd = run.xopd
    rollout = run.trainer.rollout
    recompute = recompute or run.trainer.recompute_granularity or None
    return Workload(
        prompts=run.data.prompts_per_step,
        n_samples=xopd.n_samples if xopd.responses == "on_policy" else 1,
        modalities=len(xopd.modalities),
        prompt_tokens=rollout.max_prompt_tokens,
        new_tokens=rollout.max_new_tokens,
        micro_batch=run.trainer.micro_batch_size,
        loss=xopd.loss,
        divergence_form=xopd.divergence_form,
        offload_teacher=run.trainer.offload_teacher,
        recompute=recompute,
        freeze_llm=run.model.student.freeze_llm,
    )


def plan_run(
    run: RunConfig,
    world_size: int,
    gpu_mem_gb: float,
    *,
    student_preset: str | None = None,
    teacher_preset: str | None = None,
    recompute: str | None = None,
) -> tuple[MemoryPlan, GPTModelConfig, GPTModelConfig, Workload]:
    """The recipe's plan on ``world_size`` GPUs of ``gpu_mem_gb`` GiB each (its own layout, validated)."""
    layout = Layout(run.trainer.parallel, world_size)
    student, teacher = run_model_configs(run, layout.tp, student_preset=student_preset, teacher_preset=teacher_preset)
    work = workload(run, recompute)
    perception = count_perception(run.model.student.perception, student.hidden_size)
    work = replace(work, perception_params=perception.total, perception_trainable=perception.trainable)
    return plan_memory(student, teacher, layout, work, int(gpu_mem_gb * GiB)), student, teacher, work


def format_plan(plan: MemoryPlan) -> str:
    """A table per phase: one line per buffer, GiB and the formula it comes from; the peak and the verdict."""
    rows = [f"layout {plan.layout.describe()} on {plan.layout.world_size} GPU(s); worst pipeline stage {plan.stage}",
            f"student params/rank: {plan.student_params.dense:,} dense + {plan.student_params.expert:,} expert; "
            f"teacher params/rank: {plan.teacher_params.dense:,} dense + {plan.teacher_params.expert:,} expert"]
    for phase in plan.phases:
        rows.append(f"\n[{phase.phase}]")
        for line in phase.lines:
            rows.append(f"  {line.name:<22} {line.bytes / GiB:>9.2f} GiB   {line.formula}")
        rows.append(f"  {'peak':<22} {phase.peak / GiB:>9.2f} GiB")
    acts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in
                     {"no recompute": plan.activations_no_recompute, **plan.activations_recompute}.items())
    rows.append(f"\nactivations (GiB): {acts}")
    verdict = "fits" if plan.fits else "does NOT fit"
    rows.append(f"peak {plan.peak / GiB:.2f} GiB of {plan.gpu_bytes / GiB:.0f} GiB usable: {verdict}")
    return "\n".join(rows)
