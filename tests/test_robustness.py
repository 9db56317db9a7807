"""Faults and bad input (issue 15): the finite-step guard, checkpoints that verify and fall back, pickle-free trainer
state, metrics repair, strict config, and a training run killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from megatron_xopd.testing import run_distributed
from megatron_xopd.trainer.checkpoint import (
    CheckpointError,
    find_resumable,
    load_trainer_state,
    verify_checkpoint,
)
from tests._trainer_setup import PROMPTS, run_config, snapshot, train, write_feature_cuts

TIMING = {"time_rollout_s", "time_teacher_s", "time_train_s", "tokens_per_s", "save_s", "save_share"}


class _Messages(logging.Handler):
    """Collects the ``megatron_xopd`` log messages of a spawned rank."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        logging.getLogger("megatron_xopd").addHandler(self)
        logging.getLogger("megatron_xopd").setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _train_logged(cfg: dict) -> tuple[list[dict], list[str]]:
    messages = _Messages()
    return train(cfg), messages.lines


# --------------------------------------------------------------------------------------------- finite-step guard
def _train_recording_updates(cfg: dict) -> tuple[str | None, list[dict], list[dict]]:
    """Train; per step, whether the update was skipped and whether the weights changed or hold a non-finite."""
    from megatron_xopd.trainer import XOPDTrainer, to_run_config
    from megatron_xopd.trainer.guard import NonFiniteError

    run = to_run_config(cfg)
    trainer = XOPDTrainer(run)
    steps: list[dict] = []
    inner = trainer.train_step

    def recorded(batch):
        before = snapshot(trainer)
        metrics = inner(batch)
        after = snapshot(trainer)
        steps.append({
            "skipped": metrics["skipped_update"],
            "unchanged": all(torch.equal(before[g][k], after[g][k]) for g in before for k in before[g]),
            "finite": all(bool(torch.isfinite(v).all()) for g in after for v in after[g].values()),
        })
        return metrics

    trainer.train_step = recorded
    error = None
    try:
        trainer.train()
    except NonFiniteError as err:
        error = str(err)
    rows = [json.loads(line) for line in (Path(run.logging.dir) / "metrics.jsonl").read_text().splitlines()]
    return error, steps, rows


@pytest.mark.parity
@pytest.mark.slow
def test_nonfinite_steps_change_no_weight_on_any_rank_and_stop_the_run(tmp_path):
    """lr=1e30: the first update blows the weights up (finite), the next steps' loss/gradients are NaN."""
    manifest = write_feature_cuts(tmp_path)
    cfg = run_config(tmp_path / "run", manifest, trainer={"max_steps": 8, "max_bad_steps": 2,
                                                          "parallel": {"tensor_model_parallel_size": 2}},
                     optim={"lr": 1e30}, checkpoint={"save_every": 1, "keep_last": 0})
    results = run_distributed(_train_recording_updates, 2, cfg)
    for error, steps, _ in results:
        assert error is not None and "trainer.max_bad_steps=2" in error
        assert steps[0] == {"skipped": 0.0, "unchanged": False, "finite": True}  # a real update
        bad = [s for s in steps if s["skipped"]]
        assert len(bad) == 2 and steps[-2:] == bad  # stopped after 2 consecutive skipped updates
        assert all(s["unchanged"] and s["finite"] for s in bad)
    assert results[0][1] == results[1][1]  # both TP ranks skipped the same steps
    rows = results[0][2]
    assert [r["step"] for r in rows] == list(range(1, len(results[0][1]) + 1))
    assert [r["bad_steps"] for r in rows][-2:] == [1, 2] and rows[-1]["skipped_update"] == 1.0
    # no checkpoint past the stop; each one written verifies (and was checked finite before writing)
    ckpt = tmp_path / "run" / "ckpt"
    saved = sorted(p.name for p in ckpt.glob("step_*"))
    assert saved == [f"step_{s:07d}" for s in range(1, len(rows))]
    assert all(verify_checkpoint(ckpt / name, 2) is None for name in saved)


# -------------------------------------------------------------------------------------- pickle-free trainer state
class _Planted:
    """A pickle whose loading creates a file: what a crafted trainer-state file could do on resume."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_planted_as_trainer_state_executes_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Planted(marker))
    pickle.loads(payload).close()  # the payload does work when unpickled...
    assert marker.exists()
    marker.unlink()
    state = tmp_path / "step_0000001" / "trainer_state"
    state.mkdir(parents=True)
    (state / "rank0.pt").write_bytes(payload)  # the old pickle location
    with pytest.raises(CheckpointError, match=r"rank0\.json is missing; rank0\.pt is a pickle .* not loaded"):
        load_trainer_state(state, 0)
    for name in ("rank0.json", "rank0.safetensors"):  # ... and the new locations
        (state / name).write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"rank0\.json is not JSON trainer state"):
        load_trainer_state(state, 0)
    (state / "rank0.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"rank0\.safetensors is not a safetensors file"):
        load_trainer_state(state, 0)
    assert not marker.exists()  # ...and nothing above unpickled it


# ------------------------------------------------------------------------------- verified checkpoints, fallback
@pytest.mark.slow
def test_a_truncated_shard_of_the_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    manifest = write_feature_cuts(tmp_path)
    cfg = run_config(tmp_path / "run", manifest, trainer={"max_steps": 3},
                     checkpoint={"save_every": 1, "keep_last": 2})
    first = run_distributed(train, 1, cfg)[0]
    ckpt = tmp_path / "run" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_0000002", "step_0000003"]  # keep_last=2
    assert verify_checkpoint(ckpt / "step_0000003", 1) is None
    shard = max((ckpt / "step_0000003").glob("*.distcp"), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    with shard.open("r+b") as f:
        f.truncate(size // 2)

    cfg["trainer"]["max_steps"] = 4
    resumed, messages = run_distributed(_train_logged, 1, cfg)[0]
    warning = next(m for m in messages if "not resumable" in m)
    assert str(shard) in warning and f"{size // 2} bytes" in warning and "step_0000002" in warning
    assert any("resumed from" in m and m.split()[2].endswith("step_0000002") for m in messages)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    deterministic = [{k: v for k, v in r.items() if k not in TIMING} for r in resumed[:3]]
    assert deterministic == [{k: v for k, v in r.items() if k not in TIMING} for r in first]  # step 3 redone alike


def test_verification_names_the_real_cause(tmp_path):
    """A deleted rank file is reported as missing, not as another world size; no good checkpoint is an error."""
    root = tmp_path / "ckpt"
    good = root / "step_0000001"
    (good / "trainer_state").mkdir(parents=True)
    (good / "__0_0.distcp").write_bytes(b"x" * 10)
    (good / "trainer_state" / "rank0.json").write_text("{}")
    (good / "trainer_state" / "rank1.json").write_text("{}")
    record = {"world_size": 2, "files": {"__0_0.distcp": 10, "trainer_state/rank0.json": 2,
                                         "trainer_state/rank1.json": 2}}
    (good / "complete.json").write_text(json.dumps(record))
    assert verify_checkpoint(good, 2) is None
    assert "written by 2 ranks and this run has 4" in verify_checkpoint(good, 4)
    newer = root / "step_0000002"
    shutil.copytree(good, newer)
    (newer / "trainer_state" / "rank1.json").unlink()
    assert verify_checkpoint(newer, 2) == f"{newer / 'trainer_state' / 'rank1.json'} is missing"
    assert find_resumable(root, 2) == good
    (good / "complete.json").unlink()
    with pytest.raises(CheckpointError, match=r"no resumable checkpoint: .*rank1\.json is missing; .*complete\.json "
                                              r"is missing"):
        find_resumable(root, 2)
    assert find_resumable(tmp_path / "nothing", 2) is None
