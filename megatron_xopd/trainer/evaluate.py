"""Evaluation: greedy answers of the student from S and from T (and of the teacher from T), scored against the
cuts' reference answers."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..algo import CROSS_MODAL, IN_MODAL
from ..rollout import RolloutBatch, RolloutCollector, has_speech
from ..runtime.reduce import reduce_over_replicas
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
    for batch in batches:
        if not batch["cut_ids"] or totals["n"] >= max_prompts:
            continue
        answers = batch["answers"]
        speech = has_speech(batch)
        prompts = collector.prompts(batch, (IN_MODAL, CROSS_MODAL) if speech else (IN_MODAL,))
        out = collector.generate(prompts, greedy)
        for row, p in enumerate(out.sample_to_prompt.tolist()):
            reference = answers[prompts.index[p]]
            if reference is not None:
                key = "acc_s" if prompts.modality[p] == CROSS_MODAL else "acc_t"
                totals[key] += scorer(_decoded(tokenizer, out, row), reference)
        totals["n"] += sum(a is not None for a in answers)
        if with_teacher:
            out = collector.teacher_generate(batch["text_prompt_ids"], greedy)
            for row, reference in enumerate(answers):
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
