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
from omegaconf import OmegaConf
from tqdm import tqdm

from ..algo import CROSS_MODAL, IN_MODAL, LossStats, Rollouts, rollout_sums, rollout_weights
from ..algo import step_metrics
from ..convert.sources import resolve_path
from ..data.cuts import CutStats, load_prompt_cuts
from ..data.dataset import PairedPromptDataset, build_dataloader
from ..ops.sampling import SamplingParams
from ..rollout import RolloutCollector
from ..runtime import init_distributed, initialize_model_parallel, set_seed
from ..runtime.device import current_device, resident
from ..runtime.memory import peak_memory, reset_peak_memory
from ..runtime.reduce import all_ranks_agree, reduce_over_replicas
from .build import build_models, build_optimizer, load_prompts, wrap_ddp
from .checkpoint import CheckpointSaver, resume
from .config import RunConfig
from .evaluate import evaluate
from .export import export_student_llm
from .guard import FiniteStepGuard
from .metrics import MetricsLogger
from .passes import minibatch_rows, score_with_teacher, train_pass
from .run_dir import prepare_run_dir
from .samples import SampleWriter
from .scoring import load_scorer

log = logging.getLogger("megatron_xopd")


class XOPDTrainer:
    """Owns the run: process groups, models, optimizer, data, checkpoints and logs."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        init_distributed()
        cfg = self.cfg = prepare_run_dir(cfg)  # logging.dir, checkpoint.dir: NeMo exp_manager's layout
        initialize_model_parallel(cfg.trainer.parallel)
        set_seed(cfg.trainer.seed)
        self.prompts = load_prompts(cfg)  # each model's own tokenizer and chat template, checked against each other
        self.tokenizer = self.prompts.student.tokenizer
        self.models = build_models(cfg, self.tokenizer, self.prompts)
        self.student, self.teacher = self.models.student, self.models.teacher
        self.offload_teacher = cfg.trainer.offload_teacher and torch.cuda.is_available()
        if self.offload_teacher:
            self.teacher.cpu()
        self.ddp = wrap_ddp(self.student, cfg.trainer.parallel)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, cfg.optim, cfg.trainer.max_steps)
        rollout = cfg.trainer.rollout
        self.collector = RolloutCollector(
            self.student, self.teacher, self.tokenizer, xopd=cfg.xopd,
            sampling=SamplingParams(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                    top_k=rollout.top_k, top_p=rollout.top_p),
            max_positions=self.models.student_cfg.max_position_embeddings, text_vocab_size=self.models.text_vocab_size,
            audio_locator_id=self.models.audio_locator_id, seed=cfg.trainer.seed,
            teacher_resident=self._teacher_resident)
        self.scorer = load_scorer(cfg.data.scorer)
        max_prompt = min(rollout.max_prompt_tokens, self.collector.prompt_limit)
        formats = {"student": self.prompts.student, "teacher": self.prompts.teacher}
        self.dataset = PairedPromptDataset(self.tokenizer, max_prompt_tokens=max_prompt, **formats,
                                           speech_input=cfg.data.speech_input, on_bad_cut=cfg.data.on_bad_cut,
                                           require_response=cfg.xopd.responses == "reference")
        self.eval_dataset = PairedPromptDataset(self.tokenizer, max_prompt_tokens=max_prompt, **formats,
                                                speech_input=cfg.data.speech_input, on_bad_cut=cfg.data.on_bad_cut)
        self.loader = self._loader(cfg.data.train, "data.train", shuffle=cfg.data.shuffle)
        self.data_stats = CutStats()
        self.guard = FiniteStepGuard(cfg.trainer.max_bad_steps)
        self.step = self.epoch = self.skipped_steps = 0
        self._restored_position = False
        self.saver = CheckpointSaver(cfg.checkpoint.dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
        resume(self)  # checkpoint.py: at any layout
        self.logger = MetricsLogger(
            cfg.logging.dir, enabled=dist.get_rank() == 0, tensorboard=cfg.logging.tensorboard, resume_step=self.step,
            wandb=cfg.logging.wandb, hparams=OmegaConf.to_container(OmegaConf.structured(cfg)),
        )
        self.samples = SampleWriter(cfg.logging.dir, cfg.logging.samples, self.tokenizer, enabled=dist.get_rank() == 0)

    # ----------------------------------------------------------------------------------------------- data
    def _loader(self, manifest: Any, key: str, *, shuffle: bool, validation: bool = False):
        try:
            cuts = load_prompt_cuts(manifest, seed=self.cfg.trainer.seed, finite=validation,
                                    on_bad_cut=self.cfg.data.on_bad_cut)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{key}: {err}") from err
        data = self.cfg.data
        return build_dataloader(
            cuts,
            self.eval_dataset if validation else self.dataset,
            max_cuts=(data.eval_prompts_per_step or data.prompts_per_step) if validation else data.prompts_per_step,
            max_duration=self.cfg.data.max_duration,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_world_size=parallel_state.get_data_parallel_world_size(),
            seed=self.cfg.trainer.seed,
            shuffle=shuffle,
            num_buckets=self.cfg.data.num_buckets,
        )

    def _batches(self) -> Iterator[dict[str, Any]]:
        """This rank's batches with at least one usable cut, epoch after epoch; an epoch without any is an error
        (rather than an endless loop over cuts that are all skipped)."""
        restored = self._restored_position  # the loader already sits inside an epoch
        while True:
            if not restored:
                self.loader.set_epoch(self.epoch)
            usable = restored  # the part of a resumed epoch before the checkpoint had usable cuts
            restored = False
            for batch in self.loader:
                self._count_cuts(batch["stats"])
                if batch["cut_ids"]:
                    usable = True
                    yield batch
            if not usable:
                skipped = {k: v for k, v in self.data_stats.as_dict().items() if k.startswith("data/skipped_")}
                raise RuntimeError(
                    f"data.train={self.cfg.data.train}: epoch {self.epoch} has no usable cut on data-parallel rank "
                    f"{parallel_state.get_data_parallel_rank()} (skipped so far: {skipped or 'none; empty manifest'}; "
                    f"data.speech_input={self.cfg.data.speech_input}); set data.on_bad_cut=raise to see the first one"
                )
            self.epoch += 1

    def _count_cuts(self, stats: CutStats) -> None:
        """Add a batch's cut counts; each skipped cut is logged once, by one rank of its model-parallel group."""
        self._log_skips(self.data_stats.update(stats))

    def _log_skips(self, errors: list) -> None:
        if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.is_pipeline_first_stage():
            for error in errors:
                log.warning("%s; skipped (counted once)", error)

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

    def train_step(self, batch: dict[str, Any]) -> dict[str, float] | None:
        """One step; ``None`` when no rank had a batch. When some DP rank has no usable prompt, every rank skips
        the step (it is counted in ``skipped_steps``, and nothing is updated)."""
        cfg = self.cfg
        reset_peak_memory()
        t0 = time.perf_counter()
        collected = self.collector.collect(batch, self.step)  # every rank decides alike, before generating
        self._log_skips([error for error in collected.skipped if self.data_stats.record_skip(error)])
        rollouts = collected.rollouts
        if rollouts is None:
            if not collected.anyone:
                return None
            self.skipped_steps += 1
            log.warning("step %d skipped: a data-parallel rank has no usable prompt", self.step)
            return {"skipped_steps": self.skipped_steps, "time_rollout_s": time.perf_counter() - t0,
                    "time_teacher_s": 0.0, "time_train_s": 0.0, **self.data_stats.as_dict()}
        t_rollout = time.perf_counter() - t0
        if cfg.xopd.loss != "sft":
            with self._teacher_resident():
                score_with_teacher(self.teacher, rollouts, cfg.trainer.micro_batch_size,
                                   self.models.text_vocab_size, cfg.xopd)
        t_teacher = time.perf_counter() - t0 - t_rollout
        self._set_weights(rollouts)
        stats = LossStats()
        grad_norm = 0.0
        updated = True
        self.student.train()
        minibatches = minibatch_rows(len(rollouts), cfg.xopd.minibatches)
        for i, rows in enumerate(minibatches):
            stats.measure_gap = i == 0  # logprob_gap: the weights the rollouts were sampled with
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            loss_before = stats.loss
            train_pass(self.ddp, rollouts, rows, cfg.xopd, cfg.trainer.micro_batch_size, self.models.text_vocab_size,
                       stats, minibatches=len(minibatches))
            # The guard before the step (megatron's FP32/BF16 optimizers would apply a NaN), and the optimizer's
            # own verdict after it (the FP16 loss scaler skips overflows itself); all ranks agree on both.
            updated = self.guard.update_allowed(self.ddp, stats.loss - loss_before)
            if updated:
                ok, norm, _ = self.optimizer.step()
                grad_norm = float(norm) if norm is not None else 0.0
                updated = all_ranks_agree(bool(ok))
            if not updated:
                grad_norm = float("nan")
                break  # the remaining mini-batches of this rollout batch are dropped with it
            self.scheduler.step(increment=1)
        self.guard.end_step(self.step + 1, updated, loss=stats.loss, grad_norm=grad_norm)
        t_train = time.perf_counter() - t0 - t_rollout - t_teacher
        self.samples.write(self.step + 1, rollouts)  # logging.samples: readable rollouts, samples.jsonl
        on_policy = cfg.xopd.responses == "on_policy"  # the sampled-token KL estimate needs student samples
        g = reduce_over_replicas({**rollout_sums(rollouts, on_policy), **stats.sums()})
        maxima = reduce_over_replicas({"ratio_max": stats.ratio_max, "gap_max": stats.gap_max}, op=dist.ReduceOp.MAX)
        step_time = t_rollout + t_teacher + t_train
        return {
            **step_metrics(g, maxima["ratio_max"], on_policy, maxima["gap_max"]),
            "time_rollout_s": t_rollout,
            "time_teacher_s": t_teacher,
            "time_train_s": t_train,
            "time_step_s": step_time,
            **peak_memory(),  # runtime/memory.py: peak_mem_mb (CUDA max reserved this step, CPU peak RSS), peak_mem_allocated_mb
            "tokens_per_s": (g["tok_cm"] + g["tok_im"]) / step_time,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "skipped_steps": self.skipped_steps,
            "skipped_update": float(not updated),
            "bad_steps": self.guard.total,
            **self.data_stats.as_dict(),
        }

    # -------------------------------------------------------------------------------------- checkpoints
    # ---------------------------------------------------------------------------------------- evaluation
    def evaluate(self, *, with_teacher: bool = False) -> dict[str, float]:
        """Greedy accuracy on the validation set (``data.validation``: ``eval/...``) and on each of
        ``data.eval_sets`` (``eval/<name>/...``); empty when there are none."""
        data = self.cfg.data
        sets = {"data.validation": ("eval/", data.validation)} if data.validation else {}
        sets.update({f"data.eval_sets.{name}": (f"eval/{name}/", manifest) for name, manifest in data.eval_sets.items()})
        metrics = {}
        for key, (prefix, manifest) in sets.items():
            found = evaluate(self.collector, self._loader(manifest, key, shuffle=False, validation=True), self.scorer,
                             max_new_tokens=self.cfg.trainer.eval_max_new_tokens, max_prompts=data.max_eval_prompts,
                             with_teacher=with_teacher)
            metrics.update({prefix + name.removeprefix("eval/"): value for name, value in found.items()})
        return metrics

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
            save_s = 0.0
            while self.step < cfg.trainer.max_steps:
                metrics = self.train_step(next(batches))
                if metrics is None:
                    continue
                self.step += 1
                if cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0:
                    metrics.update(self.evaluate())
                # save_s: the time the previous step's checkpoint save took (logged before its own save, so that
                # a crash in a save never loses a metrics line), and its share of that step's time
                step_time = metrics["time_rollout_s"] + metrics["time_teacher_s"] + metrics["time_train_s"]
                metrics.update(save_s=save_s, save_share=save_s / (save_s + step_time))
                self.logger.log(self.step, metrics)
                self.guard.raise_if_exhausted(self.step)
                if progress is not None:
                    progress.update(1)
                    shown = ("kl_cm", "kl_im") if cfg.xopd.responses == "on_policy" else ("loss",)
                    progress.set_postfix({k: f"{metrics[k]:.3f}" for k in shown if k in metrics})
                save_s = self.saver.save(self) if saves and self.step % saves == 0 else 0.0
            if self.step > 0:  # max_steps=0 writes no (untrained) checkpoint
                self.saver.save(self)
            self.saver.finish()
            if cfg.checkpoint.export_hf:
                export_student_llm(cfg, self.models, cfg.checkpoint.export_hf)
        finally:
            if progress is not None:
                progress.close()
            self.logger.close()
            self.samples.close()
