"""Rollout collection: a batch of paired prompts -> the student's S and T prompts -> a step's :class:`Rollouts`.

Four sources of responses (``xopd.responses``): ``on_policy`` samples n responses per prompt from the live
student (the engine); ``teacher_greedy`` takes the teacher's greedy answer to T (offline KD), generated once per
cut and cached; ``transcript`` takes T's own text (speech-recognition alignment); ``reference`` takes the cut's
reference response (supervised fine-tuning). Every rank of a TP/PP group
ends with the same rollouts; the perception output lives on the first pipeline stage only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..algo import CROSS_MODAL, Rollouts, XOPDConfig
from ..data.cuts import BadCutError
from ..data.prompt_format import end_of_turn_token
from ..models.speech import SpeechStudent, expand_audio_locators
from ..ops.sampling import SamplingParams
from ..runtime.device import current_device
from ..runtime.reduce import agree_on_step
from .engine import RolloutBatch, RolloutEngine, rollout_mode


@dataclass
class StudentPrompts:
    """A batch's student prompts, one entry per (prompt, modality) kept."""

    prompts: list[list[int]] = field(default_factory=list)  # T ids, or S ids with one audio locator
    audio: list[torch.Tensor | None] = field(default_factory=list)  # perception output (first PP stage), S only
    inputs: list[torch.Tensor | None] = field(default_factory=list)  # the perception's input (features/audio), S
    num_frames: list[int] = field(default_factory=list)  # perception frames for S prompts, 0 for T
    modality: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)  # the prompt's position in the batch
    skipped: list[BadCutError] = field(default_factory=list)  # speech prompts too long with the audio expanded


@dataclass
class Collected:
    """What :meth:`RolloutCollector.collect` made of a batch."""

    rollouts: Rollouts | None  # None on every rank when some rank has no usable prompt (the step is skipped)
    skipped: list[BadCutError]  # this rank's speech prompts left out as too long
    anyone: bool  # whether any rank had a batch at all


def has_speech(batch: dict[str, Any]) -> bool:
    """Whether the batch carries speech (``data.speech_input`` is not ``none``)."""
    return "features" in batch or "audio" in batch


def teacher_prompts(batch: dict[str, Any]) -> list[list[int]]:
    """The teacher's T prompts, in its own format; a batch made without them (one tokenizer and template for both
    models) has the student's."""
    return batch.get("teacher_prompt_ids", batch["text_prompt_ids"])


def speech_inputs(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's perception inputs: cached encoder features, or audio."""
    if "features" in batch:
        return batch["features"], batch["feature_lens"]
    return batch["audio"], batch["audio_lens"]


class RolloutCollector:
    """Builds the student's prompts and the step's rollouts; owns the student and teacher rollout engines."""

    def __init__(
        self,
        student: SpeechStudent,
        teacher: torch.nn.Module,
        tokenizer: Any,
        *,
        xopd: XOPDConfig,
        sampling: SamplingParams,
        max_positions: int,
        text_vocab_size: int,
        audio_locator_id: int,
        seed: int,
        teacher_resident: Callable[[], ContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self.student, self.tokenizer, self.xopd = student, tokenizer, xopd
        # the rollout sampling (``trainer.rollout``); n, seed and stop ids are set per call
        self.sampling = replace(sampling, n=xopd.n_samples, stop_ids=self.stop_ids())
        self.engine = RolloutEngine(student, text_vocab_size)
        self.teacher_engine = RolloutEngine(teacher, text_vocab_size)
        self.prompt_limit = max_positions - sampling.max_new_tokens  # positions a prompt may take
        self.audio_locator_id, self.seed = audio_locator_id, seed
        self.teacher_resident = teacher_resident  # puts offloaded teacher weights on the device for a block
        self._teacher_answers: dict[str, list[int]] = {}  # cut id -> the teacher's greedy answer to T

    # ------------------------------------------------------------------------------------------- prompts
    def trains_perception(self) -> bool:
        perception = self.student.perception
        return perception is not None and any(p.requires_grad for p in perception.parameters())

    def _audio_embeddings(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor | None], list[int]]:
        """Perception output per prompt (first PP stage) and its frame counts (every stage)."""
        n = len(batch["cut_ids"])
        embeds: list[torch.Tensor | None] = [None] * n
        frames = torch.zeros(n, dtype=torch.long, device=current_device())
        if parallel_state.is_pipeline_first_stage():
            features, lens = speech_inputs(batch)
            with rollout_mode(self.student):  # no dropout in the embeddings that rollouts and evaluation read
                embeds = list(self.student.embed_audio(features.to(current_device()), lens.to(current_device())))
            frames = torch.tensor([e.shape[0] for e in embeds], dtype=torch.long, device=current_device())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(
                frames,
                src=parallel_state.get_pipeline_model_parallel_first_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return embeds, frames.tolist()

    def prompts(self, batch: dict[str, Any], modalities: tuple[int, ...]) -> StudentPrompts:
        """The student's prompts for every (prompt, modality): T ids, or S ids with one audio locator and its
        perception output. Speech prompts too long once the locator is expanded are left out and listed."""
        embeds, frames = self._audio_embeddings(batch) if CROSS_MODAL in modalities else ([], [])
        speech, speech_lens = speech_inputs(batch) if CROSS_MODAL in modalities else (None, None)
        out = StudentPrompts()
        for m in modalities:
            for i in range(len(batch["cut_ids"])):
                speech_prompt = m == CROSS_MODAL
                if speech_prompt:
                    positions = len(batch["speech_prompt_ids"][i]) - 1 + frames[i]
                    if positions > self.prompt_limit:
                        out.skipped.append(BadCutError(
                            batch["cut_ids"][i], "speech_prompt_ids",
                            f"{positions} positions with the audio expanded; the limit is {self.prompt_limit}"))
                        continue
                out.prompts.append(batch["speech_prompt_ids"][i] if speech_prompt else batch["text_prompt_ids"][i])
                out.audio.append(embeds[i] if speech_prompt else None)
                out.inputs.append(speech[i, : int(speech_lens[i])] if speech_prompt else None)
                out.num_frames.append(frames[i] if speech_prompt else 0)
                out.modality.append(m)
                out.index.append(i)
        return out

    # -------------------------------------------------------------------------------------------- engines
    def generate(self, prompts: StudentPrompts, params: SamplingParams) -> RolloutBatch | None:
        """The student's responses to ``prompts`` (speech embeddings fed on the first stage); ``None`` for no
        prompts, when under expert parallelism this rank joins the others' generation
        (:meth:`RolloutEngine.generate_or_join`, called on every rank of the group)."""
        speech = [a for a in prompts.audio if a is not None]
        first = parallel_state.is_pipeline_first_stage()
        return self.engine.generate_or_join(prompts.prompts, params, audio_embeds=speech if first else None)

    def teacher_generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch | None:
        """The teacher's responses to T prompts, as :meth:`generate`; its weights resident for the generation."""
        return self.teacher_engine.generate_or_join(prompts, params, resident=self.teacher_resident)

    def greedy(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(greedy=True, max_new_tokens=max_new_tokens, stop_ids=self.stop_ids())

    def end_of_turn_id(self) -> int:
        """ChatML's ``<|im_end|>`` when the tokenizer has it, else EOS (the teacher's is the same: checked at start)."""
        return self.tokenizer.convert_tokens_to_ids(end_of_turn_token(self.tokenizer))

    def stop_ids(self) -> tuple[int, ...]:
        return tuple(sorted(i for i in {self.tokenizer.eos_token_id, self.end_of_turn_id()} if i is not None))

    # ------------------------------------------------------------------------------------------- rollouts
    def collect(self, batch: dict[str, Any], step: int) -> Collected:
        """The step's rollouts, on every rank or on none (collective: one all-reduce over the world).

        The ranks agree before generating whether each has a usable prompt: a rank that had none would skip the
        generation that the others run, and under expert parallelism their MoE forwards wait for it.
        """
        prompts = self.prompts(batch, self.xopd.modalities) if batch["cut_ids"] else StudentPrompts()
        anyone, everyone = agree_on_step(bool(batch["cut_ids"]), bool(prompts.prompts))
        if not everyone:
            return Collected(None, prompts.skipped, anyone)
        if self.xopd.responses == "on_policy":
            return Collected(self._sampled(batch, prompts, step), prompts.skipped, anyone)
        return Collected(self._given(batch, prompts), prompts.skipped, anyone)

    def _sampled(self, batch: dict[str, Any], prompts: StudentPrompts, step: int) -> Rollouts:
        """n samples per prompt from the live student; ``old_logprobs`` are its log-probs at temperature 1."""
        seed = self.seed * 1_000_003 + step * 1009 + parallel_state.get_data_parallel_rank()
        out = self.generate(prompts, replace(self.sampling, seed=seed))
        assert out is not None  # this rank has prompts
        src = out.sample_to_prompt.tolist()
        expanded = [out.prompt_ids[p, : out.prompt_lengths[p]].tolist() for p in range(len(prompts.prompts))]
        return Rollouts(
            modality=torch.tensor([prompts.modality[p] for p in src]),
            prompt_index=torch.tensor([prompts.index[p] for p in src]),
            student_prompts=[expanded[p] for p in src],
            teacher_prompts=[teacher_prompts(batch)[prompts.index[p]] for p in src],
            responses=out.tokens.cpu(),
            lengths=out.lengths.cpu(),
            old_logprobs=out.logprobs.float().cpu(),
            audio_embeds=[prompts.audio[p] for p in src],
            audio_inputs=[prompts.inputs[p] for p in src] if self.trains_perception() else None,
        )

    def teacher_greedy_answers(self, batch: dict[str, Any]) -> list[list[int]]:
        """The teacher's greedy answer to each prompt's T (ending with its stop token), generated once per cut."""
        missing = [i for i, cut in enumerate(batch["cut_ids"]) if cut not in self._teacher_answers]
        # under expert parallelism a rank whose answers are all cached joins the others' generation
        out = self.teacher_generate([teacher_prompts(batch)[i] for i in missing],
                                    self.greedy(self.sampling.max_new_tokens))
        if out is not None:
            for row, i in enumerate(missing):
                self._teacher_answers[batch["cut_ids"][i]] = out.tokens[row, : out.lengths[row]].tolist()
        return [self._teacher_answers[cut] for cut in batch["cut_ids"]]

    def _turns(self, texts: list[str]) -> list[list[int]]:
        """Texts as response token ids, each ending the turn."""
        end = self.end_of_turn_id()
        return [self.tokenizer.encode(text, add_special_tokens=False) + [end] for text in texts]

    def transcripts(self, batch: dict[str, Any]) -> list[list[int]]:
        """The text of each prompt's T, ending the turn: the responses of speech-recognition alignment."""
        return self._turns(batch["text_prompts"])

    def references(self, batch: dict[str, Any]) -> list[list[int]]:
        """Each prompt's reference response, ending the turn (the dataset has left out cuts without one)."""
        return self._turns(batch["responses"])

    def _given(self, batch: dict[str, Any], prompts: StudentPrompts) -> Rollouts:
        """Rows whose responses are given, not sampled: every student prompt (S or T) paired with the teacher's
        greedy answer to T (``responses=teacher_greedy``), with T's text (``responses=transcript``) or with the
        cut's reference response (``responses=reference``)."""
        source = {"teacher_greedy": self.teacher_greedy_answers, "transcript": self.transcripts,
                  "reference": self.references}[self.xopd.responses]
        answers = source(batch)
        responses = [answers[i] for i in prompts.index]
        longest = max(len(r) for r in responses)
        tokens = torch.zeros(len(responses), longest, dtype=torch.long)
        for row, response in enumerate(responses):
            tokens[row, : len(response)] = torch.tensor(response, dtype=torch.long)
        locator = self.audio_locator_id
        return Rollouts(
            modality=torch.tensor(prompts.modality),
            prompt_index=torch.tensor(prompts.index),
            student_prompts=[expand_audio_locators(p, f, locator) if m == CROSS_MODAL else p
                             for p, f, m in zip(prompts.prompts, prompts.num_frames, prompts.modality)],
            teacher_prompts=[teacher_prompts(batch)[i] for i in prompts.index],
            responses=tokens,
            lengths=torch.tensor([len(r) for r in responses]),
            old_logprobs=torch.zeros(len(responses), longest),
            audio_embeds=prompts.audio,
            audio_inputs=prompts.inputs if self.trains_perception() else None,
        )
