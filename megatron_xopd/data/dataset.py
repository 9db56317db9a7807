"""Batches of paired speech/text prompts, and their DP-sharded, resumable dataloader."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.dataset import DynamicBucketingSampler
from lhotse.dataset.collation import collate_matrices, collate_vectors
from torch.utils.data import DataLoader

from .cuts import (BadCutError, CutStats, answer, check_entry, load_audio, load_encoder_features,
                   reference_response, text_prompt)
from .nemo_config import located
from .prompt_format import LocatorFormat, PromptFormat, student_format

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class PairedPromptDataset(torch.utils.data.Dataset):
    """Lhotse map-style dataset: a ``CutSet`` mini-batch in, a dict of prompts and padded speech out.

    Keys of a batch of ``B`` usable cuts:

    * ``cut_ids``: ``list[str]``; ``text_prompts``: ``list[str]``; ``answers``: ``list[str | None]``;
      ``responses``: ``list[str | None]``, the reference responses (:func:`.cuts.reference_response`);
    * ``text_prompt_ids`` / ``speech_prompt_ids``: ``list[list[int]]``, the student's T and S prompts in its own
      format (:mod:`.prompt_format`), ending in the assistant header; the speech prompt holds one audio-locator
      token where the speech embeddings go; ``teacher_prompt_ids``: T in the teacher's own format;
    * ``speech_input="audio"``: ``audio`` float32 ``[B, T]`` (16 kHz mono, zero-padded), ``audio_lens`` int64 ``[B]``;
      ``speech_input="features"``: ``features`` float32 ``[B, F, D]`` and ``feature_lens`` int64 ``[B]``;
      ``speech_input="none"`` (text only: no speech is read, the cuts need none): neither;
    * ``stats``: the :class:`CutStats` of this batch (add them up in the training loop; this also works across
      dataloader worker processes).

    A bad cut (see :mod:`megatron_xopd.data.cuts`) raises with ``on_bad_cut="raise"``; with ``"skip"`` it is
    recorded in ``stats`` (the training loop logs and counts it once) and left out, so a batch may be smaller
    than sampled, or empty (``B == 0``). With ``require_response`` (``xopd.responses=reference``), a cut without
    a reference response is such a bad cut.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        audio_locator: str | None = None,
        max_prompt_tokens: int = 1024,
        *,
        student: LocatorFormat | None = None,
        teacher: PromptFormat | None = None,
        speech_input: Literal["audio", "features", "none"] = "audio",
        sampling_rate: int = 16000,
        on_bad_cut: Literal["skip", "raise"] = "skip",
        require_response: bool = False,
    ) -> None:
        if speech_input not in ("audio", "features", "none"):
            raise ValueError(f"data.speech_input must be 'audio', 'features' or 'none', got {speech_input!r}")
        if on_bad_cut not in ("skip", "raise"):
            raise ValueError(f"on_bad_cut must be 'skip' or 'raise', got {on_bad_cut!r}")
        self.tokenizer = tokenizer
        # the student's format (``tokenizer``'s family, no chat options, unless given) and the teacher's (the
        # student's text prompts, unless given)
        self.student = student or student_format(tokenizer, audio_locator)
        self.teacher = teacher
        self.max_prompt_tokens = max_prompt_tokens
        self.speech_input = speech_input
        self.sampling_rate = sampling_rate
        self.on_bad_cut = on_bad_cut
        self.require_response = require_response

    def _example(self, cut: Cut) -> dict[str, Any]:
        check_entry(cut)
        text = text_prompt(cut)
        text_ids = self.student.text_prompt(text)
        teacher_ids = self.teacher.text_prompt(text) if self.teacher is not None else text_ids
        longest = max(len(text_ids), len(teacher_ids))
        if longest > self.max_prompt_tokens:
            too_long = f"prompt too long: {longest} tokens > max_prompt_tokens={self.max_prompt_tokens}"
            raise BadCutError(cut.id, "text_prompt", too_long)
        response = reference_response(cut)
        if response is None and self.require_response:
            raise BadCutError(cut.id, "response", "no reference response (custom 'response' or 'answer'), which "
                              "xopd.responses=reference trains on")
        speech_ids = self.student.speech_prompt()
        speech = None
        if self.speech_input == "audio":
            speech = load_audio(cut, self.sampling_rate)
        elif self.speech_input == "features":
            speech = load_encoder_features(cut)
        return {"id": cut.id, "text": text, "text_ids": text_ids, "teacher_ids": teacher_ids,
                "speech_ids": speech_ids, "speech": speech,
                "answer": answer(cut), "response": response}

    def __getitem__(self, cuts: CutSet) -> dict[str, Any]:
        examples, stats = [], CutStats()
        for cut in cuts:
            stats.seen += 1
            try:
                examples.append(self._example(cut))
            except BadCutError as err:
                err = located(err, cut)
                if self.on_bad_cut == "raise":
                    raise err from None
                logger.debug("skipping bad cut: %s", err)
                stats.record_skip(err)
        speech = {}
        if self.speech_input != "none":
            key, lens_key = ("audio", "audio_lens") if self.speech_input == "audio" else ("features", "feature_lens")
            speech = dict(zip((key, lens_key), _pad([ex["speech"] for ex in examples], self.speech_input)))
        return {
            "cut_ids": [ex["id"] for ex in examples],
            "text_prompts": [ex["text"] for ex in examples],
            "text_prompt_ids": [ex["text_ids"] for ex in examples],
            "speech_prompt_ids": [ex["speech_ids"] for ex in examples],
            "teacher_prompt_ids": [ex["teacher_ids"] for ex in examples],
            **speech,
            "answers": [ex["answer"] for ex in examples],
            "responses": [ex["response"] for ex in examples],
            "stats": stats,
        }


def pad_along_time(arrays: list[np.ndarray] | list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``[T]`` (audio) or ``[T, D]`` (features) arrays along time: ``[B, T_max(, D)]`` and lengths ``[B]``."""
    lens = torch.tensor([a.shape[0] for a in arrays], dtype=torch.long)
    collate = collate_vectors if arrays[0].ndim == 1 else collate_matrices
    return collate(arrays, padding_value=0.0), lens


def _pad(arrays: list[np.ndarray], speech_input: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's speech inputs padded along time (an empty batch keeps the rank of its kind)."""
    if not arrays:
        empty = (0, 0) if speech_input == "audio" else (0, 0, 0)
        return torch.zeros(empty), torch.zeros(0, dtype=torch.long)
    return pad_along_time(arrays)


class PromptDataLoader:
    """The batches of one data-parallel rank, with a resumable data position.

    ``state_dict()`` is the lhotse sampler's, with the position set to the batches this loader has *yielded*:
    with ``num_workers > 0`` the sampler runs ahead by the batches the workers prefetch, and those must be
    sampled again after a restart. Call ``set_epoch(epoch)`` before each new epoch.
    """

    def __init__(self, dataset: PairedPromptDataset, sampler: DynamicBucketingSampler, num_workers: int = 0) -> None:
        self.sampler = sampler
        self._loader = DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers)
        self._consumed = 0
        self._restored = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self._restored:
            self._consumed = 0
        self._restored = False
        for batch in self._loader:
            self._consumed += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._consumed = 0
        self._restored = False

    def state_dict(self) -> dict[str, Any]:
        sd = self.sampler.state_dict()
        diagnostics = sd["diagnostics"]
        epoch_stats = diagnostics["stats_per_epoch"][diagnostics["current_epoch"]]
        epoch_stats.update(kept_batches=self._consumed, discarded_batches=0)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a position; the next ``iter()`` continues right after the last batch yielded before saving.

        Accepts the state after a JSON round trip (epoch keys turned into strings)."""
        state_dict = copy.deepcopy(state_dict)  # lhotse pops the keys it reads
        diagnostics = state_dict["diagnostics"]
        diagnostics["stats_per_epoch"] = {int(k): v for k, v in diagnostics["stats_per_epoch"].items()}
        self._consumed = diagnostics["stats_per_epoch"][diagnostics["current_epoch"]]["kept_batches"]
        self.sampler.load_state_dict(state_dict)
        self._restored = True


def build_dataloader(
    cuts: CutSet,
    dataset: PairedPromptDataset,
    *,
    max_duration: float | None = None,
    max_cuts: int | None = None,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    num_buckets: int = 10,
    num_workers: int = 0,
) -> PromptDataLoader:
    """A :class:`PromptDataLoader` over ``cuts``, bucketed by duration with lhotse's ``DynamicBucketingSampler``.

    Batches are capped by total speech duration (``max_duration``, seconds) and/or count (``max_cuts``). Each
    DP rank gets distinct batches (lhotse deals every ``dp_world_size``-th batch to each rank), all ranks draw
    from the same duration bucket at each step, and every rank gets the same number of batches: at the end of an
    epoch the last cuts are spread over the ranks, a few duplicated (id suffix ``_dup<n>``) if there are too few.
    """
    if max_duration is None and max_cuts is None:
        raise ValueError("build_dataloader needs max_duration and/or max_cuts")
    sampler = DynamicBucketingSampler(
        cuts,
        max_duration=max_duration,
        max_cuts=max_cuts,
        shuffle=shuffle,
        seed=seed,
        num_buckets=num_buckets,
        world_size=dp_world_size,
        rank=dp_rank,
    )
    return PromptDataLoader(dataset, sampler, num_workers=num_workers)
