"""The X-OPD trainer: rollout -> old log-probs -> teacher -> advantages -> forward/backward -> optimizer step."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..algo import CROSS_MODAL, IN_MODAL, rollout_weights
from ..data.cuts import BadCutError, CutStats, load_prompt_cuts
from ..data.dataset import PairedPromptDataset, build_dataloader
from ..data.tokenizer import load_tokenizer
from ..rollout import RolloutBatch, RolloutEngine, SamplingParams
from ..runtime import ParallelConfig, init_distributed, initialize_model_parallel, set_seed
from .build import build_models, build_optimizer, resolve_path, wrap_ddp
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import RunConfig
from .metrics import MetricsLogger
from .passes import Rollouts, TrainStats, score_with_teacher, train_pass
from .scoring import load_scorer

log = logging.getLogger("megatron_xopd")


def _is_reporting_rank() -> bool:
    """One rank per DP replica contributes each sum: last pipeline stage, TP rank 0."""
    return parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def _reduce(values: dict[str, float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> dict[str, float]:
    keys = sorted(values)
    own = _is_reporting_rank()
    tensor = torch.tensor([values[k] if own else 0.0 for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor, op=op)
    return dict(zip(keys, tensor.tolist()))


class XOPDTrainer:
    """Owns the run: process groups, models, optimizer, data, checkpoints and logs."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        init_distributed()
        initialize_model_parallel(
            ParallelConfig(
                tensor_model_parallel_size=cfg.trainer.tensor_model_parallel_size,
                pipeline_model_parallel_size=cfg.trainer.pipeline_model_parallel_size,
            )
        )
        set_seed(cfg.trainer.seed)
        self.tokenizer = load_tokenizer(str(resolve_path(cfg.model.tokenizer)), audio_locator=cfg.model.audio_locator)
        self.models = build_models(cfg, self.tokenizer)
        if cfg.trainer.offload_teacher and torch.cuda.is_available():
            self.models.teacher.cpu()
        self.student = self.models.student
        self.ddp = wrap_ddp(self.student)
        self.engine = RolloutEngine(self.student, self.models.text_vocab_size)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, cfg.optim, cfg.trainer.max_steps)
        self.scorer = load_scorer(cfg.data.scorer)
        max_prompt = min(
            cfg.trainer.rollout.max_prompt_tokens,
            self.models.student_cfg.max_position_embeddings - cfg.trainer.rollout.max_new_tokens,
        )
        self.dataset = PairedPromptDataset(
            self.tokenizer,
            cfg.model.audio_locator,
            max_prompt,
            speech_input=cfg.data.speech_input,
            on_bad_cut=cfg.data.on_bad_cut,
        )
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
            for batch in self.loader:
                yield batch
            self.epoch += 1

    # ------------------------------------------------------------------------------------------ rollouts
    def _speech_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "features" in batch:
            return batch["features"], batch["feature_lens"]
        return batch["audio"], batch["audio_lens"]

    def _audio_embeddings(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor | None], list[int]]:
        """Perception output per prompt (first PP stage) and its frame counts (every stage)."""
        n = len(batch["cut_ids"])
        embeds: list[torch.Tensor | None] = [None] * n
        frames = torch.zeros(n, dtype=torch.long)
        if parallel_state.is_pipeline_first_stage():
            with torch.no_grad():
                embeds = list(self.student.embed_audio(*self._speech_inputs(batch)))
            frames = torch.tensor([e.shape[0] for e in embeds], dtype=torch.long)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(
                frames,
                src=parallel_state.get_pipeline_model_parallel_first_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return embeds, frames.tolist()

    def _prompts(self, batch: dict[str, Any], modalities: tuple[int, ...]):
        """The student's prompts for every (prompt, modality): T ids, or S ids with one audio locator and its
        perception output. Speech prompts too long once the locator is expanded are skipped and counted."""
        limit = self.models.student_cfg.max_position_embeddings - self.cfg.trainer.rollout.max_new_tokens
        embeds, frames = self._audio_embeddings(batch) if CROSS_MODAL in modalities else ([], [])
        prompts, audio, modality, index = [], [], [], []
        for m in modalities:
            for i in range(len(batch["cut_ids"])):
                if m == CROSS_MODAL:
                    positions = len(batch["speech_prompt_ids"][i]) - 1 + frames[i]
                    if positions > limit:
                        error = BadCutError(batch["cut_ids"][i], "speech_prompt_ids",
                                            f"{positions} positions with the audio expanded; the limit is {limit}")
                        log.warning("%s; skipped", error)
                        self.data_stats.record_skip(error)
                        continue
                prompts.append(batch["text_prompt_ids"][i] if m == IN_MODAL else batch["speech_prompt_ids"][i])
                audio.append(embeds[i] if m == CROSS_MODAL else None)
                modality.append(m)
                index.append(i)
        return prompts, audio, modality, index

    def _generate(self, prompts: list[list[int]], audio: list[torch.Tensor | None], params: SamplingParams) -> RolloutBatch:
        speech = [a for a in audio if a is not None]
        return self.engine.generate(prompts, params, audio_embeds=speech if parallel_state.is_pipeline_first_stage() else None)

    def _rollout(self, batch: dict[str, Any]) -> Rollouts | None:
        cfg = self.cfg
        prompts, audio, modality, index = self._prompts(batch, cfg.xopd.modalities)
        if not prompts:
            return None
        params = SamplingParams(
            max_new_tokens=cfg.trainer.rollout.max_new_tokens,
            temperature=cfg.trainer.rollout.temperature,
            top_k=cfg.trainer.rollout.top_k,
            top_p=cfg.trainer.rollout.top_p,
            n=cfg.xopd.n_samples,
            stop_ids=tuple(self._eos_ids()),
            seed=cfg.trainer.seed * 1_000_003 + self.step * 1009 + parallel_state.get_data_parallel_rank(),
        )
        out = self._generate(prompts, audio, params)
        src = out.sample_to_prompt.tolist()
        expanded = [out.prompt_ids[p, : out.prompt_lengths[p]].tolist() for p in range(len(prompts))]
        return Rollouts(
            modality=torch.tensor([modality[p] for p in src]),
            prompt_index=torch.tensor([index[p] for p in src]),
            student_prompts=[expanded[p] for p in src],
            teacher_prompts=[batch["text_prompt_ids"][index[p]] for p in src],
            responses=out.tokens,
            lengths=out.lengths,
            old_logprobs=out.logprobs.float(),
            audio_embeds=[audio[p] for p in src],
        )

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
            ids.add(end_of_turn)
        return sorted(i for i in ids if i is not None)

    # ------------------------------------------------------------------------------------------ the step
    def _set_weights(self, rollouts: Rollouts) -> None:
        counts = torch.zeros(4, dtype=torch.float64)
        for m in (IN_MODAL, CROSS_MODAL):
            sel = rollouts.modality == m
            counts[2 * m] = float(sel.sum())
            counts[2 * m + 1] = float(rollouts.lengths[sel].sum())
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        rollouts.weights = rollout_weights(
            rollouts.lengths,
            rollouts.modality,
            self.cfg.xopd,
            global_rollouts={m: counts[2 * m].item() for m in (IN_MODAL, CROSS_MODAL)},
            global_tokens={m: counts[2 * m + 1].item() for m in (IN_MODAL, CROSS_MODAL)},
        )

    @contextlib.contextmanager
    def _teacher_on_device(self) -> Iterator[None]:
        """With ``trainer.offload_teacher`` on GPU, the teacher's weights live in host memory outside its phase."""
        offload = self.cfg.trainer.offload_teacher and torch.cuda.is_available()
        if offload:
            self.models.teacher.cuda()
        try:
            yield
        finally:
            if offload:
                self.models.teacher.cpu()
                torch.cuda.empty_cache()

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        rollouts = self._rollout(batch)
        t_rollout = time.perf_counter() - t0
        if rollouts is None:
            raise RuntimeError(f"step {self.step}: no usable prompt in the batch (cuts {batch['cut_ids']})")
        with self._teacher_on_device():
            score_with_teacher(
                self.models.teacher, rollouts, cfg.trainer.micro_batch_size, self.models.text_vocab_size,
                keep_logits=cfg.xopd.loss != "sampled_token",
            )
        t_teacher = time.perf_counter() - t0 - t_rollout
        self._set_weights(rollouts)
        stats = TrainStats()
        grad_norm = 0.0
        self.student.train()
        for rows in torch.arange(len(rollouts)).chunk(cfg.xopd.minibatches):
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            train_pass(self.ddp, rollouts, rows, cfg.xopd, cfg.trainer.micro_batch_size, self.models.text_vocab_size,
                       stats, minibatches=cfg.xopd.minibatches)
            ok, norm, _ = self.optimizer.step()
            grad_norm = float(norm) if norm is not None else 0.0
            self.scheduler.step(increment=1)
        t_train = time.perf_counter() - t0 - t_rollout - t_teacher
        return self._metrics(rollouts, stats, batch, grad_norm, t_rollout, t_teacher, t_train)

    def _metrics(self, rollouts: Rollouts, stats: TrainStats, batch, grad_norm, t_rollout, t_teacher, t_train) -> dict[str, float]:
        mask = torch.arange(rollouts.responses.shape[1]).unsqueeze(0) < rollouts.lengths.unsqueeze(1)
        sums: dict[str, float] = {}
        for m, name in ((IN_MODAL, "im"), (CROSS_MODAL, "cm")):
            sel = (rollouts.modality == m).unsqueeze(1) & mask
            rows = rollouts.modality == m
            if rollouts.teacher_logprobs is not None:
                adv = rollouts.teacher_logprobs - rollouts.old_logprobs
                sums[f"adv_{name}"] = float(adv[sel].sum())
            else:
                sums[f"adv_{name}"] = 0.0
            sums[f"tok_{name}"] = float(sel.sum())
            sums[f"n_{name}"] = float(rows.sum())
        sums.update(L_im=stats.objective[IN_MODAL], L_cm=stats.objective[CROSS_MODAL], loss=stats.loss,
                    ratio_sum=stats.ratio_sum, ratio_count=stats.ratio_count)
        g = _reduce(sums)
        ratio_max = _reduce({"ratio_max": stats.ratio_max}, op=dist.ReduceOp.MAX)["ratio_max"]
        step_time = t_rollout + t_teacher + t_train
        self.data_stats.update(batch["stats"])
        metrics = {
            "kl_cm": -g["adv_cm"] / g["tok_cm"] if g["tok_cm"] else float("nan"),
            "kl_im": -g["adv_im"] / g["tok_im"] if g["tok_im"] else float("nan"),
            "loss": g["loss"],
            "L_im": g["L_im"],
            "L_cm": g["L_cm"],
            "ratio_mean": g["ratio_sum"] / g["ratio_count"] if g["ratio_count"] else float("nan"),
            "ratio_max": ratio_max,
            "response_len_cm": g["tok_cm"] / g["n_cm"] if g["n_cm"] else float("nan"),
            "response_len_im": g["tok_im"] / g["n_im"] if g["n_im"] else float("nan"),
            "time_rollout_s": t_rollout,
            "time_teacher_s": t_teacher,
            "time_train_s": t_train,
            "tokens_per_s": (g["tok_cm"] + g["tok_im"]) / step_time,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
        }
        metrics.update(self.data_stats.as_dict())
        return metrics

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
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy answers from S and from T on the validation set, scored against the references."""
        if not self.cfg.data.validation:
            return {}
        loader = self._loader(self.cfg.data.validation, shuffle=False)
        greedy = SamplingParams(greedy=True, max_new_tokens=self.cfg.trainer.eval_max_new_tokens, stop_ids=tuple(self._eos_ids()))
        totals = {"acc_s": 0.0, "acc_t": 0.0, "n": 0.0}
        for batch in loader:
            if not batch["cut_ids"] or totals["n"] >= self.cfg.data.max_eval_prompts:
                continue
            prompts, audio, modality, index = self._prompts(batch, (IN_MODAL, CROSS_MODAL))
            out = self._generate(prompts, audio, greedy)
            for row, p in enumerate(out.sample_to_prompt.tolist()):
                reference = batch["answers"][index[p]]
                if reference is None:
                    continue
                text = self.tokenizer.decode(out.tokens[row, : out.lengths[row]].tolist(), skip_special_tokens=True)
                totals["acc_s" if modality[p] == CROSS_MODAL else "acc_t"] += self.scorer(text, reference)
                totals["n"] += 0.5  # each prompt is asked twice, from S and from T
        g = _reduce(totals)
        n = max(g["n"], 1.0)
        return {"eval/acc_speech": g["acc_s"] / n, "eval/acc_text": g["acc_t"] / n,
                "eval/gap": (g["acc_t"] - g["acc_s"]) / n, "eval/prompts": g["n"]}

    # --------------------------------------------------------------------------------------------- loop
    def train(self) -> None:
        cfg = self.cfg
        progress = None
        if cfg.logging.progress and dist.get_rank() == 0:
            from tqdm import tqdm

            progress = tqdm(total=cfg.trainer.max_steps, initial=self.step, desc="x-opd", unit="step")
        batches = self._batches()
        try:
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
                    progress.set_postfix(kl_cm=f"{metrics['kl_cm']:.3f}", kl_im=f"{metrics['kl_im']:.3f}")
                if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                    self.save()
            if cfg.checkpoint.dir and not (cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0):
                self.save()
        finally:
            if progress is not None:
                progress.close()
            self.logger.close()
