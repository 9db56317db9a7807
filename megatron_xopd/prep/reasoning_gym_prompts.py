"""Text prompts with checkable answers from ``reasoning-gym`` (procedural, offline), and their scorer."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as err:
        raise RuntimeError("reasoning-gym prompts need the package: pip install reasoning-gym") from err
    return reasoning_gym


def generate_prompts(task_name: str, num: int, seed: int) -> list[dict[str, Any]]:
    """``num`` entries of a reasoning-gym task as prompt records ``{"id", "prompt", "answer", "metadata"}``."""
    dataset = _reasoning_gym().create_dataset(task_name, size=num, seed=seed)
    return [
        {"id": f"{task_name}-s{seed}-{index:06d}", "prompt": entry["question"], "answer": entry["answer"],
         "metadata": entry["metadata"]}
        for index, entry in enumerate(dataset)
    ]


ARITHMETIC_TEMPLATE = "What is {expression}? Answer with only the number."


def arithmetic_prompts(
    num: int,
    seed: int,
    *,
    max_digits: int = 1,
    operators: tuple[str, ...] = ("+",),
    exclude: set[str] = frozenset(),
    task: str = "basic_arithmetic",
) -> list[dict[str, Any]]:
    """``num`` distinct two-term prompts of a reasoning-gym arithmetic generator (operands with up to
    ``max_digits`` digits) as records ``{"id", "prompt", "answer", "metadata"}``, none in ``exclude`` (a set of
    prompt texts), all asked as :data:`ARITHMETIC_TEMPLATE`. ``task`` is ``basic_arithmetic`` (with one of
    ``operators``) or ``products`` (``a * b``). Ids are ``arith-<hash of the prompt>``: stable across runs and sizes.
    """
    if task == "basic_arithmetic":
        cfg = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": max_digits,
               "operators": tuple(operators), "allow_parentheses": False, "allow_negation": False}
    elif task == "products":
        cfg = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": max_digits, "allow_negation": False}
    else:
        raise ValueError(f"arithmetic_prompts: task {task!r} is not 'basic_arithmetic' or 'products'")
    draws = 20 * (num + len(exclude)) + 100
    dataset = _reasoning_gym().create_dataset(task, size=draws, seed=seed, **cfg)
    records: list[dict[str, Any]] = []
    seen = set(exclude)
    for entry in dataset:
        prompt = ARITHMETIC_TEMPLATE.format(expression=entry["metadata"]["expression"])
        if prompt in seen:
            continue
        seen.add(prompt)
        item_id = "arith-" + hashlib.sha1(prompt.encode()).hexdigest()[:12]
        records.append({"id": item_id, "prompt": prompt, "answer": str(entry["answer"]),
                        "metadata": entry["metadata"]})
        if len(records) == num:
            return records
    raise ValueError(f"only {len(records)} distinct {max_digits}-digit {task} prompts left for {num}; ask for "
                     "fewer or raise max_digits")


def write_prompts_jsonl(records: list[dict[str, Any]], path: str | Path) -> None:
    """Write prompt records as JSONL, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, default=str) + "\n")
    os.replace(tmp, path)


@functools.cache
def _score_fn(task_name: str) -> Callable[[str | None, dict[str, Any]], float]:
    return _reasoning_gym().get_score_answer_fn(task_name)


def score_answer(task_name: str, entry: Mapping[str, Any], answer: str | None) -> float:
    """Reward in [0, 1] of ``answer`` for a reasoning-gym ``entry`` (a record from :func:`generate_prompts`).

    A completion that puts its answer in ``<answer>...</answer>`` tags is scored on the last tagged answer;
    otherwise the whole (stripped) text is the answer.
    """
    if answer is not None:
        from reasoning_gym.utils import extract_answer

        tagged = extract_answer(answer)
        answer = answer.strip() if tagged is None else tagged
    full_entry = {"question": entry.get("prompt"), "metadata": {}, **entry}
    return float(_score_fn(task_name)(answer, full_entry))
