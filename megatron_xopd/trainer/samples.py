"""``logging.samples``: rollouts a user can read, ``<logging.dir>/samples.jsonl``.

One JSON object per rollout: ``step``, ``modality`` (``speech`` or ``text``), ``prompt_ids`` (the student's prompt as
the model saw it, each audio position as the audio-locator id), ``teacher_prompt_ids``, ``response_ids`` and
``response_text`` (decoded with its special tokens, so the end of the turn shows). It is how a user sees what the
student generates, and checks how each model's prompts are rendered.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from ..algo import CROSS_MODAL, IN_MODAL, Rollouts


class SampleWriter:
    """Appends ``count`` rollouts a step to ``samples.jsonl`` (flushed at once), alternating speech and text rows;
    a no-op when ``count`` is 0 or on every rank but the first (``enabled``): its rollouts are those of the first
    data-parallel rank."""

    def __init__(self, log_dir: str | Path, count: int, tokenizer: Any, *, enabled: bool) -> None:
        self.count, self.tokenizer = count, tokenizer
        self._file = None
        if enabled and count > 0:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._file = open(Path(log_dir) / "samples.jsonl", "a", encoding="utf-8")

    def write(self, step: int, rollouts: Rollouts) -> None:
        if self._file is None:
            return
        rows = [(rollouts.modality == m).nonzero().flatten().tolist() for m in (CROSS_MODAL, IN_MODAL)]
        chosen = [r for pair in itertools.zip_longest(*rows) for r in pair if r is not None][: self.count]
        for r in chosen:
            response = rollouts.responses[r, : int(rollouts.lengths[r])].tolist()
            sample = {
                "step": step,
                "modality": "speech" if int(rollouts.modality[r]) == CROSS_MODAL else "text",
                "prompt_ids": [int(t) for t in rollouts.student_prompts[r]],
                "teacher_prompt_ids": [int(t) for t in rollouts.teacher_prompts[r]],
                "response_ids": response,
                "response_text": self.tokenizer.decode(response, skip_special_tokens=False),
            }
            self._file.write(json.dumps(sample, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
