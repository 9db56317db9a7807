"""The miniature of the X-OPD paper's Table 1 (and Table 3's forgetting check) on a 2-core CPU, from one command.

    python examples/mini_replication/study.py [--out runs/mini_table1] [--plan plan.json]
    (examples/mini_replication/run.sh calls it)

Stages, each skipped on a rerun once its ``OUT/<stage>/DONE`` exists (so the study may span sessions; delete a
stage's directory to redo it). Every trainer run goes through the project's trainer (``XOPDTrainer``), in this
one process, one after the other (no start-up per run):

1. ``data``: the spoken splits test / val / train / align / forget and the text-only SFT set (prepare_data.py);
2. ``teacher_sft``: the text teacher, SmolLM2-135M-Instruct fully fine-tuned on text (``data.speech_input=none``,
   ``xopd.loss=sft``, ``xopd.responses=reference``: the answer tokens "a op b = N" only; AdamW with warm-up and
   linear decay; tied embedding frozen), exported as an HF directory (``checkpoint.export_hf``);
3. ``student_sft``: the student's LLM, the same recipe for fewer steps (weaker than the teacher from text);
4. ``ctc`` and ``align``: the adapter's speech alignment as before (LLM frozen): a CTC warm start against the LLM's
   (frozen, so unchanged) token embeddings, then SFT from S on the teacher's greedy answers;
5. ``start``: the starting student from S and T, and the teacher from T, on val, test and forget;
6. ``runs/<method>/lr<lr>_seed<seed>``: each method from that student, same prompts (one epoch of ``train``),
   steps, optimizer (Adam, constant LR, clip 1.0), the LLM training, the adapter frozen. First every learning
   rate of ``LR_GRID`` at the first seed; the rate with the best accuracy from S on ``val`` (ties: from T, then
   the smaller rate) is the method's; then the other seeds at that rate. Each run ends with an evaluation on
   val, test and forget;
7. the table: ``OUT/results.md``, ``OUT/results.json`` and ``OUT/plots/*.png`` (summarize.py; always rebuilt).

The grid, the seeds and every size below were fixed before any method ran.

Cost. Measured here on 2026-12-01 (this study at nice 15, other jobs sharing the 2 cores): data preparation 31
min under load 10-18 (6.7 min on a quiet machine in the previous study); teacher_sft 44.7 min, its steps 30-70 s
under load 4-18 (16 text prompts of ~55 tokens, forward and backward of SmolLM2-135M); student_sft 3.2 min
for its first setting, 20 steps of ~6 s at lower load, evaluation included (78.9% from text, above the 60-75%
aim, so it was cut to 10 steps before any method ran). Counting "training tokens" (through forward and backward; a
forward-only token counts 1/3): a method run is ~9.6k for training (8 steps x 16 rows x ~75 tokens; on-policy
+ ~1.5k for rollouts and teacher scores, n = 1) and ~5k for its evaluation (val 32, test >= 60, forget 40, from
S and T); teacher_sft 66k, student_sft 18k, align 12k, start ~8k; ~540k in all. At the student_sft rate
(~150 training tokens/s) that is ~1 h plus data preparation; at the rate under heavy load (~21/s) ~7 h. So
the study fits the 2.5-hour aim only on a machine that is not shared. The measured wall time of
each stage goes to OUT/timings.jsonl; ``--stop-after STAGE`` ends a session after that stage, and the next
invocation goes on from there. Knobs that cut the cost without touching the comparison: ``max_eval_prompts``,
``teacher_sft_steps`` (the guide: 82% at 45 steps), the split sizes; fixed before any method runs.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import fcntl
import gc
import importlib.util
import json
import logging
import os
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")
warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS.*")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIG = ROOT / "examples" / "conf" / "mini_replication.yaml"

# Fixed before any method ran: the learning rates every method is tried at, and the seeds of the final runs.
LR_GRID = (2e-5, 1e-4)
SEEDS = (1, 2, 3)

# Each method: the xopd overrides (same data, steps, optimizer and budget for all).
METHODS: dict[str, dict[str, Any]] = {
    "sft_ref": {"loss": "sft", "responses": "reference", "lam": 0.5},  # SFT on the reference answers
    "offline_kd": {"loss": "sft", "responses": "teacher_greedy", "lam": 0.5},  # SFT on the teacher's answers
    "gkd": {"loss": "jsd", "beta": 0.0, "responses": "on_policy", "lam": 0.5},  # forward KL on student samples
    "xopd_lam0.5": {"loss": "sampled_token", "lam": 0.5},
    "xopd_lam0": {"loss": "sampled_token", "lam": 0.0},
    "xopd_lam1": {"loss": "sampled_token", "lam": 1.0},
    "xopd_rkl": {"loss": "reverse_kl", "lam": 0.5},  # exact full-vocabulary reverse KL (our variant)
}


def _load(name: str):
    """A sibling script as a module (registered, so its dataclasses work)."""
    key = f"mini_replication_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@dataclass
class Plan:
    """Everything the study's stages read; ``OUT/plan.json`` records it and a rerun must use the same."""

    data_seed: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # prepare_data.Sizes fields; {} = its defaults
    seed: int = 1234  # the text SFT, ctc, align and start stages
    base_llm: str = "builtin:smollm2"
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into every run's config (tests: tiny models)
    threads: int = 2
    # text SFT of the teacher and of the student's LLM (the guide's recipe)
    teacher_sft_steps: int = 75
    student_sft_steps: int = 10
    sft_prompts_per_step: int = 16
    sft_lr: float = 1e-4
    sft_warmup_steps: int = 5
    sft_weight_decay: float = 0.01
    # speech alignment of the adapter (LLM frozen)
    ctc_steps: int = 40
    align_steps: int = 8
    align_prompts_per_step: int = 16
    align_lr: float = 3e-4
    # the compared methods
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    lr_grid: list[float] = field(default_factory=lambda: list(LR_GRID))
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    steps: int = 8  # one epoch of train (64 prompts) at 8 prompts a step
    prompts_per_step: int = 8
    n_samples: int = 1  # 16 sampled rows a step at lam 0.5: as many as the SFT methods' 16 given rows
    max_new_tokens: int = 12
    eval_prompts_per_step: int = 32
    max_eval_prompts: int = 60  # per evaluation set: val 32, test 60 (of 100), forget 40

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"plan.methods: unknown {unknown}; known: {sorted(METHODS)}")


def load_plan(path: Path | None) -> Plan:
    if path is None:
        return Plan()
    values = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(Plan)}
    if set(values) - known:
        raise ValueError(f"{path}: unknown plan field(s) {sorted(set(values) - known)}")
    return Plan(**values)


# ------------------------------------------------------------------------------------------------- stages
class StopStudy(Exception):
    """Raised after the stage named by ``--stop-after`` has finished."""


class Study:
    """The stages of one study directory ``out``."""

    def __init__(self, plan: Plan, out: Path, stop_after: str | None = None) -> None:
        self.plan, self.out, self.stop_after = plan, out, stop_after
        self.data = out / "data"
        out.mkdir(parents=True, exist_ok=True)
        self._lock = (out / "study.lock").open("w")  # one driver per study directory (held until exit)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"{out}: another study.py is running there (it holds {out / 'study.lock'})") from None
        recorded = out / "plan.json"
        current = json.dumps(dataclasses.asdict(plan), indent=1, sort_keys=True)
        if recorded.exists() and recorded.read_text() != current:
            raise SystemExit(f"{recorded}: this study was started with another plan; use another --out, or delete "
                             f"{out} to start afresh")
        recorded.write_text(current)

    # ------------------------------------------------------------------------------------------- plumbing
    def done(self, name: str) -> bool:
        return (self.out / name / "DONE").exists()

    def stage(self, name: str, fn: Callable[[Path], None]) -> None:
        """Run ``fn(stage_dir)`` unless ``name`` is done; a stage that did not finish is redone from scratch."""
        if self.done(name):
            print(f"== {name}: done already", flush=True)
        else:
            self._run_stage(name, fn)
        if name == self.stop_after:
            raise StopStudy(name)

    def _run_stage(self, name: str, fn: Callable[[Path], None]) -> None:
        path = self.out / name
        print(f"== {name}", flush=True)
        if path.exists() and name != "data":  # data prep reuses its finished files itself
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        fn(path)
        _release_memory()
        wall = time.perf_counter() - start
        with (self.out / "timings.jsonl").open("a") as f:  # rss_mb: this process after the stage (leak check)
            f.write(json.dumps({"stage": name, "wall_s": round(wall, 1), "rss_mb": _rss_mb()}) + "\n")
        (path / "DONE").touch()

    def base_config(self) -> dict[str, Any]:
        """The shared setting (examples/conf/mini_replication.yaml) with the plan's model and paths."""
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(CONFIG)
        for key in ("defaults", "hydra"):
            cfg.pop(key, None)
        plan = self.plan
        cfg = OmegaConf.merge(cfg, {
            "model": {"student": {"hf_path": plan.base_llm}, "teacher": {"hf_path": plan.base_llm}},
            "data": {"train": str(self.manifest("train")), "validation": None, "eval_sets": {name: str(self.manifest(name)) for name in ("val", "test", "forget")},
                     "max_eval_prompts": plan.max_eval_prompts, "eval_prompts_per_step": plan.eval_prompts_per_step},
            "trainer": {"rollout": {"max_new_tokens": plan.max_new_tokens}, "eval_max_new_tokens": plan.max_new_tokens},
            "xopd": {"n_samples": plan.n_samples},
            "logging": {"progress": False},
        }, plan.overrides)
        return OmegaConf.to_container(cfg, resolve=True)

    def manifest(self, split: str) -> Path:
        return self.data / f"{split}_features.jsonl.gz"

    def train(self, run_dir: Path, overrides: dict[str, Any]) -> None:
        """One trainer run in this process, logging to ``run_dir``."""
        from omegaconf import OmegaConf

        from megatron_xopd.trainer import XOPDTrainer, to_run_config

        cfg = OmegaConf.merge(self.base_config(), {"logging": {"dir": str(run_dir)}}, overrides)
        cfg = OmegaConf.to_container(cfg, resolve=True)
        if overrides.get("data", {}).get("speech_input") == "none":
            cfg["model"]["student"]["perception"] = {}  # a text-only run needs no perception
        trainer = XOPDTrainer(to_run_config(cfg))
        trainer.train()
        del trainer

    # --------------------------------------------------------------------------------------------- stages
    def run_data(self, path: Path) -> None:
        prepare = _load("prepare_data")
        prepare.prepare(self.data, self.plan.data_seed, prepare.Sizes(**self.plan.sizes), threads=self.plan.threads)

    def run_text_sft(self, steps: int) -> Callable[[Path], None]:
        plan = self.plan

        def run(path: Path) -> None:
            self.train(path, {
                "trainer": {"max_steps": steps, "eval_every": steps, "seed": plan.seed,
                            "micro_batch_size": plan.sft_prompts_per_step},
                "data": {"train": str(self.data / "llm_sft_text.jsonl.gz"), "speech_input": "none",
                         "prompts_per_step": plan.sft_prompts_per_step},
                "xopd": {"loss": "sft", "responses": "reference", "lam": 1.0},
                "model": {"student": {"freeze_embedding": True}},
                "optim": {"lr": plan.sft_lr, "warmup_steps": plan.sft_warmup_steps, "decay_style": "linear",
                          "min_lr": 0.0, "weight_decay": plan.sft_weight_decay},
                "checkpoint": {"dir": None, "export_hf": str(path / "hf")},
            })
        return run

    def run_ctc(self, path: Path) -> None:
        config = path / "config.yaml"
        config.write_text(json.dumps(self.base_config()))  # JSON is YAML
        ctc = _load_tool("warmstart_adapter_ctc")
        ctc.main(["--cuts", str(self.data / "alignment_features.jsonl.gz"), "--steps", str(self.plan.ctc_steps),
                  "--config", str(config), "--out", str(path / "perception.safetensors"), "--seed", str(self.plan.seed),
                  "--no-progress"])

    def student_models(self) -> dict[str, Any]:
        """The student's LLM and the teacher, as the text SFT stages left them."""
        return {"student": {"hf_path": str(self.out / "student_sft" / "hf")},
                "teacher": {"hf_path": str(self.out / "teacher_sft" / "hf")}}

    def run_align(self, path: Path) -> None:
        plan = self.plan
        self.train(path, {
            "trainer": {"max_steps": plan.align_steps, "seed": plan.seed},
            "data": {"train": str(self.data / "alignment_features.jsonl.gz"),
                     "prompts_per_step": plan.align_prompts_per_step},
            "xopd": {"loss": "sft", "responses": "teacher_greedy", "lam": 0.0},
            "model": {**self.student_models(), "student": {
                **self.student_models()["student"], "perception_weights": str(self.out / "ctc" / "perception.safetensors"),
                "freeze_llm": True, "perception": {"freeze_adapter": False}}},
            "optim": {"lr": plan.align_lr},
            "checkpoint": {"dir": str(path / "checkpoints"), "resume": False},
        })

    def from_start(self) -> dict[str, Any]:
        return {"model": self.student_models(), "checkpoint": {"init_from": str(self.out / "align" / "checkpoints")}}

    def run_start(self, path: Path) -> None:
        self.train(path, _merge(self.from_start(), {"trainer": {"max_steps": 0, "eval_at_start": True,
                                                                "seed": self.plan.seed}}))

    def method_run(self, method: str, lr: float, seed: int) -> Callable[[Path], None]:
        plan = self.plan

        def run(path: Path) -> None:
            self.train(path, _merge(self.from_start(), {
                "trainer": {"max_steps": plan.steps, "eval_every": plan.steps, "seed": seed},
                "data": {"prompts_per_step": plan.prompts_per_step},
                "xopd": METHODS[method],
                "optim": {"lr": lr},
            }))
        return run

    def run_all(self) -> None:
        """Every stage in order (those done are skipped), then the table; ``stop_after`` ends the run early."""
        try:
            self._run_stages()
        except StopStudy as stop:
            print(f"== stopped after {stop} (--stop-after)", flush=True)
        _load("summarize").write(self.out)

    def _run_stages(self) -> None:
        plan, summarize = self.plan, _load("summarize")
        self.stage("data", self.run_data)
        self.stage("teacher_sft", self.run_text_sft(plan.teacher_sft_steps))
        self.stage("student_sft", self.run_text_sft(plan.student_sft_steps))
        self.stage("ctc", self.run_ctc)
        self.stage("align", self.run_align)
        self.stage("start", self.run_start)
        for method in plan.methods:
            for lr in plan.lr_grid:
                self.stage(run_name(method, lr, plan.seeds[0]), self.method_run(method, lr, plan.seeds[0]))
            lr = summarize.choose_lr(self.out, method, plan.lr_grid, plan.seeds[0])
            for seed in plan.seeds[1:]:
                self.stage(run_name(method, lr, seed), self.method_run(method, lr, seed))


def run_name(method: str, lr: float, seed: int) -> str:
    return _load("summarize").run_name(method, lr, seed)


def _release_memory() -> None:
    """Free the finished run's models before the next one is built in this process (glibc: give the freed heap
    back to the system, so that 30 runs of ~2.5 GB each do not fragment the heap)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_mb() -> float:
    """This process's resident memory now (MB)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _merge(dst: dict, src: dict) -> dict:
    """``dst`` updated recursively by ``src`` (in place; returned)."""
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = value
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "mini_table1")
    parser.add_argument("--plan", type=Path, default=None, help="JSON of Plan fields that differ (tests: tiny)")
    parser.add_argument("--stop-after", default=None, help="end after this stage has run (e.g. teacher_sft)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    os.environ.setdefault("MASTER_PORT", str(_free_port()))  # the in-process runs' world of one (not 29500: the
    # trainer's default, which another study or run on this machine may hold)
    Study(load_plan(args.plan), args.out, args.stop_after).run_all()


if __name__ == "__main__":  # dist_checkpointing's writer spawns processes: keep the guard
    main()
