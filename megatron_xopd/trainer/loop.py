"""The X-OPD trainer: rollout -> old log-probs -> teacher -> advantages -> forward/backward -> optimizer step.

The same loop runs the paper's baselines (``xopd.responses=teacher_greedy`` with ``xopd.loss=sft``: offline KD, or
the speech-alignment stage when only the perception trains): the responses are then the teacher's greedy answers
to T, generated once per prompt, and the teacher pass is skipped for ``sft``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..algo import CROSS_MODAL, IN_MODAL, rollout_weights
from ..data.cuts import BadCutError, CutStats, load_prompt_cuts
from ..data.dataset import PairedPromptDataset, build_dataloader
from ..data.tokenizer import load_tokenizer
from ..models.speech import expand_audio_locators
from ..rollout import RolloutBatch, RolloutEngine, SamplingParams, rollout_mode
from ..runtime import ParallelConfig, init_distributed, initialize_model_parallel, set_seed
from .build import build_models, build_optimizer, resolve_path, wrap_ddp
from .checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
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


@dataclass
class StudentPrompts:
    """A batch's student prompts, one entry per (prompt, modality) kept."""

    prompts: list[list[int]]  # T ids, or S ids with one audio locator
    audio: list[torch.Tensor | None]  # perception output (first PP stage) for S prompts
    inputs: list[torch.Tensor | None]  # the perception's input (features or audio) for S prompts
    num_frames: list[int]  # perception frames for S prompts, 0 for T
    modality: list[int]
    index: list[int]  # the prompt's position in the batch


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
        self.teacher_engine = RolloutEngine(self.models.teacher, self.models.text_vocab_size)
        self._teacher_answers: dict[str, list[int]] = {}  # cut id -> the teacher's greedy answer to T
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

    def _trains_perception(self) -> bool:
        perception = self.student.perception
        return perception is not None and any(p.requires_grad for p in perception.parameters())

    def _audio_embeddings(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor | None], list[int]]:
        """Perception output per prompt (first PP stage) and its frame counts (every stage)."""
        n = len(batch["cut_ids"])
        embeds: list[torch.Tensor | None] = [None] * n
        frames = torch.zeros(n, dtype=torch.long)
        if parallel_state.is_pipeline_first_stage():
            with rollout_mode(self.student):  # no dropout in the embeddings that rollouts and evaluation read
                embeds = list(self.student.embed_audio(*self._speech_inputs(batch)))
            frames = torch.tensor([e.shape[0] for e in embeds], dtype=torch.long)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(
                frames,
                src=parallel_state.get_pipeline_model_parallel_first_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return embeds, frames.tolist()

    def _prompts(self, batch: dict[str, Any], modalities: tuple[int, ...]) -> StudentPrompts:
        """The student's prompts for every (prompt, modality): T ids, or S ids with one audio locator and its
        perception output. Speech prompts too long once the locator is expanded are skipped and counted."""
        limit = self.models.student_cfg.max_position_embeddings - self.cfg.trainer.rollout.max_new_tokens
        embeds, frames = self._audio_embeddings(batch) if CROSS_MODAL in modalities else ([], [])
        speech, speech_lens = self._speech_inputs(batch)
        out = StudentPrompts([], [], [], [], [], [])
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
                speech_prompt = m == CROSS_MODAL
                out.prompts.append(batch["speech_prompt_ids"][i] if speech_prompt else batch["text_prompt_ids"][i])
                out.audio.append(embeds[i] if speech_prompt else None)
                out.inputs.append(speech[i, : int(speech_lens[i])] if speech_prompt else None)
                out.num_frames.append(frames[i] if speech_prompt else 0)
                out.modality.append(m)
                out.index.append(i)
        return out

    def _generate(self, prompts: list[list[int]], audio: list[torch.Tensor | None], params: SamplingParams) -> RolloutBatch:
        speech = [a for a in audio if a is not None]
        return self.engine.generate(prompts, params, audio_embeds=speech if parallel_state.is_pipeline_first_stage() else None)

    def _rollout(self, batch: dict[str, Any]) -> Rollouts | None:
        cfg = self.cfg
        student_prompts = self._prompts(batch, cfg.xopd.modalities)
        if not student_prompts.prompts:
            return None
        if cfg.xopd.responses == "on_policy":
            return self._sampled_rollouts(batch, student_prompts)
        return self._given_rollouts(batch, student_prompts)

    def _sampled_rollouts(self, batch: dict[str, Any], student_prompts: StudentPrompts) -> Rollouts:
        cfg = self.cfg
        prompts, audio, modality, index = (student_prompts.prompts, student_prompts.audio, student_prompts.modality,
                                           student_prompts.index)
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
            audio_inputs=[student_prompts.inputs[p] for p in src] if self._trains_perception() else None,
        )

    def _greedy(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(greedy=True, max_new_tokens=max_new_tokens, stop_ids=tuple(self._eos_ids()))

    def _teacher_greedy_answers(self, batch: dict[str, Any]) -> list[list[int]]:
        """The teacher's greedy answer to each prompt's T (ending with its stop token), generated once per cut."""
        missing = [i for i, cut in enumerate(batch["cut_ids"]) if cut not in self._teacher_answers]
        if missing:
            with self._teacher_on_device():
                out = self.teacher_engine.generate([batch["text_prompt_ids"][i] for i in missing],
                                                   self._greedy(self.cfg.trainer.rollout.max_new_tokens))
            for row, i in enumerate(missing):
                self._teacher_answers[batch["cut_ids"][i]] = out.tokens[row, : out.lengths[row]].tolist()
        return [self._teacher_answers[cut] for cut in batch["cut_ids"]]

    def _transcripts(self, batch: dict[str, Any]) -> list[list[int]]:
        """The text of each prompt's T, ending the turn: the responses of speech-recognition alignment."""
        end = self._end_of_turn_id()
        return [self.tokenizer.encode(text, add_special_tokens=False) + [end] for text in batch["text_prompts"]]

    def _given_rollouts(self, batch: dict[str, Any], student_prompts: StudentPrompts) -> Rollouts:
        """Rows whose responses are given, not sampled: every student prompt (S or T) paired with the teacher's
        greedy answer to T (``responses=teacher_greedy``) or with T's text (``responses=transcript``)."""
        prompts, audio, modality, index, num_frames = (student_prompts.prompts, student_prompts.audio,
                                                       student_prompts.modality, student_prompts.index,
                                                       student_prompts.num_frames)
        teacher = self.cfg.xopd.responses == "teacher_greedy"
        answers = self._teacher_greedy_answers(batch) if teacher else self._transcripts(batch)
        responses = [answers[i] for i in index]
        longest = max(len(r) for r in responses)
        tokens = torch.zeros(len(responses), longest, dtype=torch.long)
        for row, response in enumerate(responses):
            tokens[row, : len(response)] = torch.tensor(response, dtype=torch.long)
        locator = self.models.audio_locator_id
        return Rollouts(
            modality=torch.tensor(modality),
            prompt_index=torch.tensor(index),
            student_prompts=[expand_audio_locators(p, f, locator) if m == CROSS_MODAL else p
                             for p, f, m in zip(prompts, num_frames, modality)],
            teacher_prompts=[batch["text_prompt_ids"][i] for i in index],
            responses=tokens,
            lengths=torch.tensor([len(r) for r in responses]),
            old_logprobs=torch.zeros(len(responses), longest),
            audio_embeds=audio,
            audio_inputs=student_prompts.inputs if self._trains_perception() else None,
        )

    def _end_of_turn_id(self) -> int:
        """ChatML's ``<|im_end|>`` when the tokenizer has it, else EOS."""
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
            return end_of_turn
        return self.tokenizer.eos_token_id

    def _eos_ids(self) -> list[int]:
        return sorted(i for i in {self.tokenizer.eos_token_id, self._end_of_turn_id()} if i is not None)

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
        if cfg.xopd.loss != "sft":
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
        on_policy = self.cfg.xopd.responses == "on_policy"  # the sampled-token KL estimate needs student samples
        sums: dict[str, float] = {}
        for m, name in ((IN_MODAL, "im"), (CROSS_MODAL, "cm")):
            sel = (rollouts.modality == m).unsqueeze(1) & mask
            rows = rollouts.modality == m
            if rollouts.teacher_logprobs is not None and on_policy:
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
            "kl_cm": -g["adv_cm"] / g["tok_cm"] if g["tok_cm"] and on_policy else float("nan"),
            "kl_im": -g["adv_im"] / g["tok_im"] if g["tok_im"] and on_policy else float("nan"),
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
    def _score(self, tokens: torch.Tensor, lengths: torch.Tensor, row: int, reference: str) -> float:
        return self.scorer(self.tokenizer.decode(tokens[row, : lengths[row]].tolist(), skip_special_tokens=True), reference)

    @torch.no_grad()
    def evaluate(self, *, with_teacher: bool = False) -> dict[str, float]:
        """Greedy answers from S and from T on the validation set, scored against the references (prompts
        without a reference are not counted); ``with_teacher`` adds the text teacher's accuracy from T."""
        if not self.cfg.data.validation:
            return {}
        loader = self._loader(self.cfg.data.validation, shuffle=False)
        greedy = self._greedy(self.cfg.trainer.eval_max_new_tokens)
        totals = {"acc_s": 0.0, "acc_t": 0.0, "acc_teacher": 0.0, "n": 0.0}
        for batch in loader:
            if not batch["cut_ids"] or totals["n"] >= self.cfg.data.max_eval_prompts:
                continue
            answers = batch["answers"]
            student_prompts = self._prompts(batch, (IN_MODAL, CROSS_MODAL))
            modality, index = student_prompts.modality, student_prompts.index
            out = self._generate(student_prompts.prompts, student_prompts.audio, greedy)
            for row, p in enumerate(out.sample_to_prompt.tolist()):
                if answers[index[p]] is not None:
                    score = self._score(out.tokens, out.lengths, row, answers[index[p]])
                    totals["acc_s" if modality[p] == CROSS_MODAL else "acc_t"] += score
            totals["n"] += sum(a is not None for a in answers)
            if with_teacher:
                with self._teacher_on_device():
                    out = self.teacher_engine.generate(batch["text_prompt_ids"], greedy)
                for row, reference in enumerate(answers):
                    if reference is not None:
                        totals["acc_teacher"] += self._score(out.tokens, out.lengths, row, reference)
        g = _reduce(totals)
        n = max(g["n"], 1.0)
        metrics = {"eval/acc_speech": g["acc_s"] / n, "eval/acc_text": g["acc_t"] / n,
                   "eval/gap": (g["acc_t"] - g["acc_s"]) / n, "eval/prompts": g["n"]}
        if with_teacher:
            metrics["eval/acc_teacher_text"] = g["acc_teacher"] / n
        return metrics

    # --------------------------------------------------------------------------------------------- loop
    def train(self) -> None:
        cfg = self.cfg
        progress = None
        if cfg.logging.progress and dist.get_rank() == 0:
            from tqdm import tqdm

            progress = tqdm(total=cfg.trainer.max_steps, initial=self.step, desc="x-opd", unit="step")
        batches = self._batches()
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
                if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                    self.save()
            if cfg.checkpoint.dir and not (cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0):
                self.save()
        finally:
            if progress is not None:
                progress.close()
            self.logger.close()
