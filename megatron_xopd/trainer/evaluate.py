"""Evaluation: greedy answers of the student from S and from T (and of the teacher from T), scored against the
cuts' reference answers."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..algo import CROSS_MODAL, IN_MODAL
from ..rollout import RolloutBatch, RolloutCollector, StudentPrompts, has_speech, teacher_prompts
from ..runtime.reduce import all_ranks_agree, reduce_over_replicas
from .scoring import Scorer


def _decoded(tokenizer: Any, out: RolloutBatch, row: int) -> str:
    return tokenizer.decode(out.tokens[row, : out.lengths[row]].tolist(), skip_special_tokens=True)


@torch.no_grad()
def evaluate(
    collector: RolloutCollector,
    batches: Iterable[dict[str, Any]],
    scorer: Scorer,
    *,
    max_new_tokens: int,
    max_prompts: int,
    with_teacher: bool = False,
) -> dict[str, float]:
    """Accuracy from S and from T over this DP rank's ``batches`` (prompts without a reference are not counted),
    summed over the data-parallel replicas; ``with_teacher`` adds the text teacher's accuracy from T. Text-only
    data (``data.speech_input=none``) has no accuracy from S."""
    tokenizer = collector.tokenizer
    greedy = collector.greedy(max_new_tokens)
    totals = {"acc_s": 0.0, "acc_t": 0.0, "acc_teacher": 0.0, "n": 0.0}
    speech = True
    # Under expert parallelism the DP ranks' validation batches differ in number and content, but every MoE
    # forward is an all-to-all over the expert group: the ranks go through the batches in lockstep (one
    # all-reduce per batch) until every rank is done, and a rank without prompts joins the others' generation.
    lockstep = collector.engine.ep_group is not None or (with_teacher and collector.teacher_engine.ep_group is not None)
    remaining = iter(batches)
    while True:
        batch = next(remaining, None)
        if all_ranks_agree(batch is None) if lockstep else batch is None:
            break
        usable = batch is not None and bool(batch["cut_ids"]) and totals["n"] < max_prompts
        if not usable and not lockstep:
            continue
        answers = batch["answers"] if usable else []
        speech = has_speech(batch) if usable else speech
        modalities = (IN_MODAL, CROSS_MODAL) if speech else (IN_MODAL,)
        prompts = collector.prompts(batch, modalities) if usable else StudentPrompts()  # none: join the others
        out = collector.generate(prompts, greedy)
        for row, p in enumerate(out.sample_to_prompt.tolist() if out is not None else []):
            reference = answers[prompts.index[p]]
            if reference is not None:
                key = "acc_s" if prompts.modality[p] == CROSS_MODAL else "acc_t"
                totals[key] += scorer(_decoded(tokenizer, out, row), reference)
        totals["n"] += sum(a is not None for a in answers)
        if with_teacher:
            out = collector.teacher_generate(teacher_prompts(batch) if usable else [], greedy)
            for row, reference in enumerate(answers if out is not None else []):
                if reference is not None:
                    totals["acc_teacher"] += scorer(_decoded(tokenizer, out, row), reference)
    g = reduce_over_replicas(totals)
    n = max(g["n"], 1.0)
    metrics = {"eval/acc_text": g["acc_t"] / n, "eval/prompts": g["n"]}
    if speech:
        metrics.update({"eval/acc_speech": g["acc_s"] / n, "eval/gap": (g["acc_t"] - g["acc_s"]) / n})
    if with_teacher:
        metrics["eval/acc_teacher_text"] = g["acc_teacher"] / n
    return metrics
