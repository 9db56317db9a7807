"""Answer scorers for the evaluation hook: exact match by default, or any ``module:function``."""

from __future__ import annotations

import importlib
import re
from typing import Callable

Scorer = Callable[[str, str], float]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def extract_answer(response: str) -> str:
    """The last ``<answer>...</answer>`` span, else the whole response."""
    tags = _ANSWER_TAG.findall(response)
    return tags[-1] if tags else response


def exact_match(response: str, reference: str) -> float:
    """1.0 when the (tagged) answer equals the reference after normalisation, or is its last number."""
    answer = normalise(extract_answer(response))
    ref = normalise(reference)
    if answer == ref:
        return 1.0
    numbers = re.findall(r"-?\d+(?:\.\d+)?", answer)
    return float(bool(numbers) and numbers[-1] == ref)


def load_scorer(spec: str) -> Scorer:
    """``exact_match`` or ``package.module:function`` taking (response, reference) -> score in [0, 1]."""
    if spec == "exact_match":
        return exact_match
    if ":" not in spec:
        raise ValueError(f"data.scorer: {spec!r} is neither 'exact_match' nor 'module:function'")
    module, name = spec.split(":", 1)
    return getattr(importlib.import_module(module), name)
