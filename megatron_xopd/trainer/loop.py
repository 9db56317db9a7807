"""The X-OPD trainer: batch -> prompts -> rollouts -> teacher scores -> loss -> optimizer step -> metrics ->
checkpoint. ``train_step`` is one step, read top to bottom; each box lives in its own module
(``docs/architecture.md`` draws them).

The same loop runs the paper's baselines (``xopd.responses=teacher_greedy`` with ``xopd.loss=sft``: offline KD, or
the speech-alignment stage when only the perception trains): the responses are then the teacher's greedy answers
to T, generated once per prompt, and the teacher pass is skipped for ``sft``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from ..algo import CROSS_MODAL, IN_MODAL, LossStats, Rollouts, rollout_sums, rollout_weights
from ..algo import step_metrics
from ..convert.sources import resolve_path
from ..data.cuts import CutStats, load_prompt_cuts
from ..data.dataset import PairedPromptDataset, build_dataloader
from ..data.tokenizer import load_tokenizer
from ..ops.sampling import SamplingParams
from ..rollout import RolloutCollector
from ..runtime import init_distributed, initialize_model_parallel, set_seed
from ..runtime.device import current_device, resident
from ..runtime.memory import peak_memory_mb, reset_peak_memory
from ..runtime.reduce import reduce_over_replicas
from .build import build_models, build_optimizer, wrap_ddp
from .checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from .config import RunConfig
from .evaluate import evaluate
from .metrics import MetricsLogger
from .passes import score_with_teacher, train_pass
from .scoring import load_scorer

log = logging.getLogger("megatron_xopd")


class XOPDTrainer:
    """Owns the run: process groups, models, optimizer, data, checkpoints and logs."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        init_distributed()
        initialize_model_parallel(cfg.trainer.parallel)
        set_seed(cfg.trainer.seed)
        self.tokenizer = load_tokenizer(str(resolve_path(cfg.model.tokenizer)), audio_locator=cfg.model.audio_locator)
        self.models = build_models(cfg, self.tokenizer)
        self.student, self.teacher = self.models.student, self.models.teacher
        self.offload_teacher = cfg.trainer.offload_teacher and torch.cuda.is_available()
        if self.offload_teacher:
            self.teacher.cpu()
        self.ddp = wrap_ddp(self.student)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, cfg.optim, cfg.trainer.max_steps)
        rollout = cfg.trainer.rollout
        self.collector = RolloutCollector(
            self.student,
            self.teacher,
            self.tokenizer,
            xopd=cfg.xopd,
            sampling=SamplingParams(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                    top_k=rollout.top_k, top_p=rollout.top_p),
            max_positions=self.models.student_cfg.max_position_embeddings,
            text_vocab_size=self.models.text_vocab_size,
            audio_locator_id=self.models.audio_locator_id,
            seed=cfg.trainer.seed,
            teacher_resident=self._teacher_resident,
        )
        self.scorer = load_scorer(cfg.data.scorer)
        max_prompt = min(rollout.max_prompt_tokens, self.collector.prompt_limit)
        self.dataset = PairedPromptDataset(self.tokenizer, cfg.model.audio_locator, max_prompt,
                                           speech_input=cfg.data.speech_input, on_bad_cut=cfg.data.on_bad_cut)
        self.loader = self._loader(cfg.data.train, shuffle=cfg.data.shuffle)
        self.data_stats = CutStats()
        self.step = 0
        self.epoch = 0
        self._restored_position = False
        self._resume()
        self.logger = MetricsLogger(
            cfg.logging.dir, enabled=dist.get_rank() == 0, tensorboard=cfg.logging.tensorboard, resume_step=self.step
        )

    # ----------------------------------------------------------------------------------------------- data
    def _loader(self, manifest: str, *, shuffle: bool):
        return build_dataloader(
            load_prompt_cuts(manifest),
            self.dataset,
            max_cuts=self.cfg.data.prompts_per_step,
            max_duration=self.cfg.data.max_duration,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_world_size=parallel_state.get_data_parallel_world_size(),
            seed=self.cfg.trainer.seed,
            shuffle=shuffle,
            num_buckets=self.cfg.data.num_buckets,
        )

    def _batches(self) -> Iterator[dict[str, Any]]:
        restored = self._restored_position  # the loader already sits inside an epoch
        while True:
            if not restored:
                self.loader.set_epoch(self.epoch)
            restored = False
            yield from self.loader
            self.epoch += 1

    def _teacher_resident(self):
        """With ``trainer.offload_teacher`` on GPU, the teacher's weights live in host memory outside its phase."""
        return resident(self.teacher, offload=self.offload_teacher)

    # ------------------------------------------------------------------------------------------ the step
    def _set_weights(self, rollouts: Rollouts) -> None:
        """c_j from the step's global rollout and token counts per modality (summed over DP ranks)."""
        counts = torch.zeros(4, dtype=torch.float64, device=current_device())
        for m in (IN_MODAL, CROSS_MODAL):
            sel = rollouts.modality == m
            counts[2 * m] = float(sel.sum())
            counts[2 * m + 1] = float(rollouts.lengths[sel].sum())
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        counts = counts.tolist()
        rollouts.weights = rollout_weights(
            rollouts.lengths,
            rollouts.modality,
            self.cfg.xopd,
            global_rollouts={m: counts[2 * m] for m in (IN_MODAL, CROSS_MODAL)},
            global_tokens={m: counts[2 * m + 1] for m in (IN_MODAL, CROSS_MODAL)},
        )

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        cfg = self.cfg
        reset_peak_memory()
        t0 = time.perf_counter()
        rollouts, skipped = self.collector.collect(batch, self.step)
        for error in skipped:
            log.warning("%s; skipped", error)
            self.data_stats.record_skip(error)
        if rollouts is None:
            raise RuntimeError(f"step {self.step}: no usable prompt in the batch (cuts {batch['cut_ids']})")
        t_rollout = time.perf_counter() - t0
        if cfg.xopd.loss != "sft":
            with self._teacher_resident():
                score_with_teacher(self.teacher, rollouts, cfg.trainer.micro_batch_size,
                                   self.models.text_vocab_size, cfg.xopd)
        t_teacher = time.perf_counter() - t0 - t_rollout
        self._set_weights(rollouts)
        stats = LossStats()
        grad_norm = 0.0
        self.student.train()
        for rows in torch.arange(len(rollouts)).chunk(cfg.xopd.minibatches):
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            train_pass(self.ddp, rollouts, rows, cfg.xopd, cfg.trainer.micro_batch_size, self.models.text_vocab_size,
                       stats, minibatches=cfg.xopd.minibatches)
            _, norm, _ = self.optimizer.step()
            grad_norm = float(norm) if norm is not None else 0.0
            self.scheduler.step(increment=1)
        t_train = time.perf_counter() - t0 - t_rollout - t_teacher
        on_policy = cfg.xopd.responses == "on_policy"  # the sampled-token KL estimate needs student samples
        g = reduce_over_replicas({**rollout_sums(rollouts, on_policy), **stats.sums()})
        ratio_max = reduce_over_replicas({"ratio_max": stats.ratio_max}, op=dist.ReduceOp.MAX)["ratio_max"]
        self.data_stats.update(batch["stats"])
        step_time = t_rollout + t_teacher + t_train
        return {
            **step_metrics(g, ratio_max, on_policy),
            "time_rollout_s": t_rollout,
            "time_teacher_s": t_teacher,
            "time_train_s": t_train,
            "time_step_s": step_time,
            "peak_mem_mb": peak_memory_mb(),  # runtime/memory.py: CUDA max allocated this step, CPU peak RSS
            "tokens_per_s": (g["tok_cm"] + g["tok_im"]) / step_time,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            **self.data_stats.as_dict(),
        }

    # -------------------------------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "loader": self.loader.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_stats": self.data_stats,
        }

    def save(self) -> None:
        if self.cfg.checkpoint.dir:
            save_checkpoint(self.cfg.checkpoint.dir, self.step, self.student, self.optimizer, self._trainer_state(),
                            keep_last=self.cfg.checkpoint.keep_last)

    def _resume(self) -> None:
        path = latest_checkpoint(self.cfg.checkpoint.dir) if self.cfg.checkpoint.resume else None
        if path is None:
            if self.cfg.checkpoint.init_from:
                loaded = load_model_weights(resolve_path(self.cfg.checkpoint.init_from), self.student)
                if dist.get_rank() == 0:
                    log.info("student initialised from %s", loaded)
            return
        state = load_checkpoint(path, self.student, self.optimizer)
        self.step, self.epoch = state["step"], state["epoch"]
        self.loader.load_state_dict(state["loader"])
        self._restored_position = True
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_stats = state["data_stats"]
        if dist.get_rank() == 0:
            log.info("resumed from %s at step %d", path, self.step)

    # ---------------------------------------------------------------------------------------- evaluation
    def evaluate(self, *, with_teacher: bool = False) -> dict[str, float]:
        """Greedy accuracy on the validation set (``data.validation``); empty when there is none."""
        if not self.cfg.data.validation:
            return {}
        return evaluate(self.collector, self._loader(self.cfg.data.validation, shuffle=False), self.scorer,
                        max_new_tokens=self.cfg.trainer.eval_max_new_tokens,
                        max_prompts=self.cfg.data.max_eval_prompts, with_teacher=with_teacher)

    # --------------------------------------------------------------------------------------------- loop
    def train(self) -> None:
        cfg = self.cfg
        progress = None
        if cfg.logging.progress and dist.get_rank() == 0:
            progress = tqdm(total=cfg.trainer.max_steps, initial=self.step, desc="x-opd", unit="step")
        batches = self._batches()
        saves = cfg.checkpoint.save_every
        try:
            if cfg.trainer.eval_at_start and self.step == 0:
                self.logger.log(0, self.evaluate(with_teacher=True))
            while self.step < cfg.trainer.max_steps:
                batch = next(batches)
                if not batch["cut_ids"]:
                    self.data_stats.update(batch["stats"])
                    continue
                metrics = self.train_step(batch)
                self.step += 1
                if cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0:
                    metrics.update(self.evaluate())
                self.logger.log(self.step, metrics)
                if progress is not None:
                    progress.update(1)
                    shown = ("kl_cm", "kl_im") if cfg.xopd.responses == "on_policy" else ("loss",)
                    progress.set_postfix({k: f"{metrics[k]:.3f}" for k in shown})
                if saves and self.step % saves == 0:
                    self.save()
            if cfg.checkpoint.dir and not (saves and self.step % saves == 0):
                self.save()
        finally:
            if progress is not None:
                progress.close()
            self.logger.close()
