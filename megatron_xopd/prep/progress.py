"""Resumable jobs over cuts or prompts: a ``.progress`` file of JSON lines, one per finished item.

The first line records the job's settings; a rerun with other settings is refused rather than mixing outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_progress(path: Path, settings: dict[str, Any], restart_hint: str) -> dict[str, dict[str, Any]]:
    """Records of the items finished by earlier runs, by id; a line cut short by a crash is dropped from the file."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        os.truncate(path, len(complete))
    lines = complete.decode("utf-8").splitlines()
    if not lines:
        return {}
    if json.loads(lines[0]).get("settings") != settings:
        raise ValueError(f"{path} was written with other settings ({lines[0]}, now {json.dumps(settings)}); "
                         f"use the same settings to resume, or {restart_hint} to start over")
    return {(record := json.loads(line))["id"]: record for line in lines[1:]}
