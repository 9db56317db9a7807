"""Per-step metrics: ``metrics.jsonl``, TensorBoard and (optionally) Weights & Biases on rank 0."""

from __future__ import annotations

import json
import logging
import math
import secrets
from pathlib import Path
from typing import Any

log = logging.getLogger("megatron_xopd")


class MetricsLogger:
    """Appends one JSON object per step to ``<dir>/metrics.jsonl`` (flushed each step, so nothing is lost on a
    crash) and mirrors scalars to TensorBoard. Only the process created with ``enabled=True`` writes."""

    def __init__(self, log_dir: str | Path, *, enabled: bool, tensorboard: bool = True, resume_step: int = 0,
                 wandb: dict[str, Any] | None = None, hparams: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / "metrics.jsonl"
        if resume_step and self.path.exists():
            # Drop lines of steps after the checkpoint we resume from: they will be recomputed.
            kept = [line for line, record in _records(self.path) if record["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif not resume_step:
            self.path.write_text("")
        self._file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(log_dir / "tensorboard"))
        if wandb is not None:
            self._wandb = _wandb_run(log_dir, wandb, hparams, resume_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(log_dir: Path, kwargs: dict[str, Any], hparams: dict[str, Any] | None, resume_step: int) -> Any:
    """A Weights & Biases run in ``<log_dir>/wandb`` (``logging.wandb``: ``wandb.init`` arguments). Its id is kept
    in ``<log_dir>/wandb_run_id``, so a resumed training run continues the same W&B run."""
    try:
        import wandb
    except ImportError as err:
        raise RuntimeError("logging.wandb is set but Weights & Biases is not installed: pip install wandb") from err
    id_file = log_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if resume_step and id_file.exists() else secrets.token_hex(4)
    args = {"dir": str(log_dir), "name": log_dir.name, "config": hparams, "id": run_id, "resume": "allow", **kwargs}
    run = wandb.init(**args)
    id_file.write_text(run.id + "\n")
    return run


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The lines of a ``metrics.jsonl`` with their records. A torn last line (a kill or a full disk mid-write) is
    dropped with a warning; a bad line elsewhere is an error naming the file and line."""
    lines = path.read_text().splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a metrics record with an integer 'step'")
        except ValueError as err:
            if number == len(lines):
                log.warning("%s: dropping a torn last line %d (%s): %r", path, number, err, line[:80])
                continue
            raise ValueError(f"{path}, line {number}: {err}; fix or remove the line (logging.dir)") from err
        out.append((line, record))
    return out
