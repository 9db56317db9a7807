"""The section loop of the GPU scripts (``gpu_trainer.py``, ``gpu_decode.py``): each section runs, a failure is
recorded with its traceback and the next section still runs, and the JSON line is rewritten to ``--out`` after each
section, so a run killed by its timeout still leaves what it measured."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Callable

import torch


def device_header() -> dict:
    """The start of a result: ``ok``, the device and torch's version, no sections yet."""
    return {"ok": True, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "sections": {}}


def run_sections(result: dict, sections: dict[str, Callable[[int], dict]], skip: str, out: str | None,
                 after_failure: Callable[[], None] = lambda: None) -> int:
    """Run ``sections`` not named in ``skip`` (comma-separated) in order; each is called with the number of
    sections left (itself included), to share a time budget. Prints the JSON line; exit code 0 when all passed."""
    todo = [name for name in sections if name not in set(filter(None, skip.split(",")))]
    for i, name in enumerate(todo):
        start = time.perf_counter()
        try:
            section = sections[name](len(todo) - i)
        except Exception as exc:  # recorded, and the next section still runs
            section = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
            after_failure()
        section["wall_s"] = round(time.perf_counter() - start, 1)
        result["sections"][name] = section
        result["ok"] = result["ok"] and section["ok"]
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0 if result["ok"] else 1
