"""Faults and bad input (issue 15): the finite-step guard, checkpoints that verify and fall back, pickle-free trainer
state, metrics repair, strict config, and a training run killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
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

TIMING = {"time_rollout_s", "time_teacher_s", "time_train_s", "time_step_s", "peak_mem_mb", "tokens_per_s", "save_s",
          "save_share"}


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
    assert all(verify_checkpoint(ckpt / name) is None for name in saved)


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
                     checkpoint={"save_every": 1, "keep_last": 2, "async_save": True})
    first, messages = run_distributed(_train_logged, 1, cfg)[0]
    # no CUDA here: asynchronous saving is declined, once, and the saves are synchronous and timed
    assert sum("async_save" in m and "saving synchronously" in m for m in messages) == 1
    assert first[0]["save_s"] == 0.0 and all(r["save_s"] > 0.0 and 0.0 < r["save_share"] < 1.0 for r in first[1:])
    ckpt = tmp_path / "run" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_0000002", "step_0000003"]  # keep_last=2
    assert verify_checkpoint(ckpt / "step_0000003") is None
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

    # A pickle planted as the newest checkpoint's trainer state, its completion record forged to match: resuming
    # stops with an error naming the file, and nothing is unpickled.
    marker = tmp_path / "pwned"
    newest = ckpt / "step_0000004"
    planted = newest / "trainer_state" / "rank0.json"
    planted.write_bytes(pickle.dumps(_Planted(marker)))
    record = json.loads((newest / "complete.json").read_text())
    record["files"]["trainer_state/rank0.json"] = planted.stat().st_size
    (newest / "complete.json").write_text(json.dumps(record))
    cfg["trainer"]["max_steps"] = 5
    with pytest.raises(RuntimeError, match=r"step_0000004/trainer_state/rank0\.json is not JSON trainer state"):
        run_distributed(train, 1, cfg)
    assert not marker.exists()


def test_verification_names_the_real_cause(tmp_path):
    """A deleted rank file is reported as missing; no good checkpoint is an error. (Another world size is not a
    verification failure: checkpoints reshard, tests/test_reshard.py.)"""
    root = tmp_path / "ckpt"
    good = root / "step_0000001"
    (good / "trainer_state").mkdir(parents=True)
    (good / "__0_0.distcp").write_bytes(b"x" * 10)
    (good / "trainer_state" / "rank0.json").write_text("{}")
    (good / "trainer_state" / "rank1.json").write_text("{}")
    record = {"world_size": 2, "files": {"__0_0.distcp": 10, "trainer_state/rank0.json": 2,
                                         "trainer_state/rank1.json": 2}}
    (good / "complete.json").write_text(json.dumps(record))
    assert verify_checkpoint(good) is None
    newer = root / "step_0000002"
    shutil.copytree(good, newer)
    (newer / "trainer_state" / "rank1.json").unlink()
    assert verify_checkpoint(newer) == f"{newer / 'trainer_state' / 'rank1.json'} is missing"
    assert find_resumable(root) == good
    (good / "complete.json").unlink()
    with pytest.raises(CheckpointError, match=r"no resumable checkpoint: .*rank1\.json is missing; .*complete\.json "
                                              r"is missing"):
        find_resumable(root)
    assert find_resumable(tmp_path / "nothing") is None


# -------------------------------------------------------------------------------------------------- kill -9
REPO = Path(__file__).resolve().parents[1]


def _start(config: Path, weights: Path) -> subprocess.Popen:
    """A training process in its own process group (so that SIGKILL takes any writer it spawned with it)."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "tests._kill_driver", str(config), str(weights)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tmp_dirs(ckpt: Path) -> set[tuple[str, int, int]]:
    """The temporary (being written) checkpoint directories, told apart when one is removed and made again."""
    out = set()
    for p in ckpt.glob(".tmp_step_*"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        out.add((p.name, st.st_ino, st.st_ctime_ns))
    return out


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _kill_when(proc: subprocess.Popen, ready, timeout_s: float = 300.0) -> bool:
    """SIGKILL the process group as soon as ``ready()``; False if the process ended first."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    assert proc.poll() is not None, "training process hung"
    return False


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow
def test_three_kill9s_one_during_a_save_then_resume_equal_an_uninterrupted_run(tmp_path):
    manifest = write_feature_cuts(tmp_path)
    steps = 8
    runs = {}
    for name in ("full", "killed"):
        cfg = run_config(tmp_path / name, manifest, trainer={"max_steps": steps},
                         checkpoint={"save_every": 1, "keep_last": 2})
        runs[name] = tmp_path / f"{name}.json"
        runs[name].write_text(json.dumps(cfg))
    full = _start(runs["full"], tmp_path / "full.safetensors")  # alongside the killed one (2 cores)

    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    metrics, ckpt = tmp_path / "killed" / "logs" / "metrics.jsonl", tmp_path / "killed" / "ckpt"
    moments = ["save", "random", "random"]
    rng.shuffle(moments)
    for moment in moments:
        start, before = _lines(metrics), _tmp_dirs(ckpt)
        proc = _start(runs["killed"], tmp_path / "killed.safetensors")
        if moment == "save":  # while a checkpoint is being written: a temporary directory made by this process
            ready = lambda: bool(_tmp_dirs(ckpt) - before)  # noqa: E731
        else:  # after 0 or 1 more logged steps, plus up to 3 s
            target, delay, reached = start + rng.randint(0, 1), rng.uniform(0.0, 3.0), []

            def ready(target=target, delay=delay, reached=reached) -> bool:
                if not reached and _lines(metrics) >= target:
                    reached.append(time.monotonic())
                return bool(reached) and time.monotonic() - reached[0] >= delay
        assert _kill_when(proc, ready), f"the run ended before the {moment!r} kill (seed {seed})"
        assert _lines(metrics) < steps, f"seed {seed}"
    _finish(_start(runs["killed"], tmp_path / "killed.safetensors"))
    _finish(full)

    rows = {name: [json.loads(line) for line in (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()]
            for name in ("full", "killed")}
    assert [r["step"] for r in rows["killed"]] == list(range(1, steps + 1))
    strip = [[{k: v for k, v in r.items() if k not in TIMING} for r in rows[name]] for name in ("full", "killed")]
    assert strip[0] == strip[1], f"seed {seed}"
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "killed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"seed {seed}"


# ------------------------------------------------------------------------------------------ metrics and config
def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    from megatron_xopd.trainer.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 0.5 * s}) for s in (1, 2, 3)]
    path.write_text("\n".join(good) + '\n{"step": 4, "lo')
    with caplog.at_level(logging.WARNING, logger="megatron_xopd"):
        MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume_step=2).close()
    assert path.read_text().splitlines() == good[:2]
    assert any("torn last line 4" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    path.write_text(good[0] + "\n{oops\n" + good[2] + "\n")  # damage elsewhere is not guessed at
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2"):
        MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume_step=3)


def test_hydra_plus_keys_are_checked_against_the_schema(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf.errors import ConfigKeyError

    from megatron_xopd.trainer import register_schema, to_run_config

    register_schema()
    with initialize_config_dir(config_dir=str(REPO / "examples" / "conf"), version_base=None):
        typo = compose("quickstart", overrides=["+trainer.max_stepz=3"])
        assert typo.trainer.max_stepz == 3  # Hydra itself lets it in
        with pytest.raises(ConfigKeyError, match=r"max_stepz"):
            to_run_config(typo)
        assert to_run_config(compose("quickstart", overrides=["trainer.max_steps=3"])).trainer.max_steps == 3


def test_config_values_are_checked_naming_the_key(tmp_path):
    from megatron_xopd.trainer import to_run_config

    manifest = write_feature_cuts(tmp_path)
    cases = {"data.speech_input=none .* needs xopd.lam=1.0": {"data": {"speech_input": "none"}},
             "trainer.max_bad_steps must be >= 1": {"trainer": {"max_bad_steps": 0}},
             "checkpoint.keep_last must be >= 0": {"checkpoint": {"keep_last": -1}},
             "data.speech_input: 'video'": {"data": {"speech_input": "video"}}}
    for message, sections in cases.items():
        with pytest.raises(ValueError, match=message):
            to_run_config(run_config(tmp_path, manifest, **sections))


# --------------------------------------------------------------------------------------------------- bad input
def _build_each(cfgs: list[dict]) -> list:
    """Build the models of each config in this rank: the padded vocabularies, or the error text."""
    from megatron_xopd.convert.sources import resolve_path
    from megatron_xopd.data.tokenizer import load_tokenizer
    from megatron_xopd.runtime import set_seed
    from megatron_xopd.trainer import to_run_config
    from megatron_xopd.trainer.build import build_models

    out = []
    for cfg in cfgs:
        run = to_run_config(cfg)
        set_seed(0)
        try:
            models = build_models(run, load_tokenizer(str(resolve_path(run.model.tokenizer))))
            out.append((models.student_cfg.padded_vocab_size, models.teacher_cfg.padded_vocab_size))
        except Exception as err:  # noqa: BLE001 - the text is what is checked
            out.append(str(err))
    return out


def _teacher_with_tokenizer(path: Path, permuted: int) -> Path:
    """A tiny HF teacher that ships SmolLM2's tokenizer with ``permuted`` ids of its vocabulary reversed."""
    from megatron_xopd.convert.sources import resolve_path
    from megatron_xopd.data.tokenizer import load_tokenizer
    from tests._trainer_setup import write_tiny_hf

    write_tiny_hf(path, seed=2)
    load_tokenizer(str(resolve_path("builtin:smollm2"))).save_pretrained(path)
    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted((t for t, i in vocab.items() if 1000 <= i < 1000 + permuted), key=vocab.get)
    for token, new_id in zip(tokens, reversed([vocab[t] for t in tokens])):
        vocab[token] = new_id
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return path


@pytest.mark.slow
def test_teacher_tokenizer_and_padded_vocab_are_checked(tmp_path):
    manifest = write_feature_cuts(tmp_path)
    same = _teacher_with_tokenizer(tmp_path / "same", permuted=0)
    permuted = _teacher_with_tokenizer(tmp_path / "permuted", permuted=200)

    def cfg(teacher: Path | None = None, **student_llm) -> dict:
        model = {"student": {"llm": student_llm}}
        if teacher is not None:
            model["teacher"] = {"llm": {}, "hf_path": str(teacher)}
        return run_config(tmp_path / "run", manifest, model=model)

    results = run_distributed(_build_each, 1, [cfg(same), cfg(permuted), cfg(padded_vocab_size=49408),
                                               cfg(padded_vocab_size=49000), cfg()], tp=1)[0]
    assert results[0] == (49280, 49280)  # the teacher's own tokenizer agrees: built
    assert "unequal vocab: model.tokenizer vs model.teacher.hf_path=" in results[1] and "200 ids differ" in results[1]
    assert results[2] == (49408, 49408)  # the user's padding, for both models
    assert "model.student.llm.padded_vocab_size=49000 must be >= 49153" in results[3] and "divisible" in results[3]
    assert results[4] == (49280, 49280)


def _text_cuts(root: Path, prompts: list[str]) -> Path:
    """A manifest of text-only prompt cuts: no recording, no features."""
    from lhotse import CutSet, MonoCut

    cuts = [MonoCut(id=f"text{i}", start=0.0, duration=1.0, channel=0, custom={"text_prompt": p, "answer": str(i)})
            for i, p in enumerate(prompts)]
    path = root / "text_cuts.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(path)
    return path


@pytest.mark.slow
def test_text_only_mode_and_bad_data_and_zero_steps(tmp_path):
    """lam=1 with data.speech_input=none trains on cuts without speech and a student without perception; an epoch
    without a usable cut names the manifest; a missing manifest names its key; max_steps=0 writes no checkpoint."""
    manifest = _text_cuts(tmp_path, PROMPTS)
    cfg = run_config(tmp_path / "text", manifest, trainer={"max_steps": 2, "eval_every": 2, "eval_max_new_tokens": 3},
                     xopd={"lam": 1.0}, data={"speech_input": "none", "validation": str(manifest)})
    cfg["model"]["student"]["perception"] = {}
    rows = run_distributed(train, 1, cfg)[0]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["data/cuts_skipped"] == 0
    assert rows[0]["response_len_im"] > 0 and rows[0]["kl_im"] == rows[0]["kl_im"]  # finite, on text prompts
    assert rows[1]["eval/prompts"] == len(PROMPTS) and "eval/acc_speech" not in rows[1]

    (tmp_path / "empty").mkdir()
    empty = _text_cuts(tmp_path / "empty", ["   "] * 4)
    with pytest.raises(RuntimeError, match=rf"data.train={empty}: epoch 0 has no usable cut .*skipped_text_prompt"):
        run_distributed(train, 1, run_config(tmp_path / "empty", empty, data={"speech_input": "none"},
                                             xopd={"lam": 1.0}))
    with pytest.raises(RuntimeError, match=r"FileNotFoundError: data.train: prompt manifest not found: .*nowhere"):
        run_distributed(train, 1, run_config(tmp_path / "missing", tmp_path / "nowhere.jsonl.gz"))
    zero = run_config(tmp_path / "zero", manifest, trainer={"max_steps": 0}, xopd={"lam": 1.0},
                      data={"speech_input": "none"})
    assert run_distributed(train, 1, zero)[0] == []
    assert not list((tmp_path / "zero" / "ckpt").glob("*step_*"))
