"""NeMo exp_manager-style run directories: <exp_dir>/<name>/<version>, hparams.yaml, TensorBoard, Weights & Biases.
(The whole layout written by a real training run is checked in tests/test_nemo_salm.py.)"""

from __future__ import annotations

import json
import re
import sys

import pytest
from omegaconf import OmegaConf

from megatron_xopd.trainer import config


def to_run_config(cfg: dict):
    return config.to_run_config({"data": {"train": "cuts.jsonl.gz"}, **cfg})
from megatron_xopd.trainer.metrics import MetricsLogger
from megatron_xopd.trainer.run_dir import CMD_ARGS, HPARAMS, prepare_run_dir, run_dir_of


def test_run_dir_names_follow_exp_manager(tmp_path):
    base = {"logging": {"exp_dir": str(tmp_path), "name": "salm_xopd"}}
    # checkpoint.resume (exp_manager's resume_if_exists): one fixed directory, no version level
    assert run_dir_of(to_run_config(base)) == tmp_path / "salm_xopd"
    fresh = to_run_config({**base, "checkpoint": {"resume": False}})
    version = run_dir_of(fresh).relative_to(tmp_path / "salm_xopd").as_posix()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", version)
    fixed = to_run_config({"logging": {**base["logging"], "version": "v3"}, "checkpoint": {"resume": False}})
    assert run_dir_of(fixed) == tmp_path / "salm_xopd" / "v3"
    assert run_dir_of(to_run_config({"logging": {"dir": str(tmp_path / "plain")}})) == tmp_path / "plain"


def test_prepare_run_dir_saves_the_resolved_config(tmp_path):
    cfg = to_run_config({"logging": {"exp_dir": str(tmp_path), "name": "n", "version": "v1"},
                         "data": {"train": {"manifest_filepath": "train.json"}}, "xopd": {"lam": 0.25}})
    run = prepare_run_dir(cfg)
    run_dir = tmp_path / "n" / "v1"
    assert run.logging.dir == str(run_dir) and run.checkpoint.dir == str(run_dir / "checkpoints")
    saved = to_run_config(OmegaConf.load(run_dir / HPARAMS))
    assert saved == run  # every default filled in, and it reads back as the same config
    assert saved.xopd.lam == 0.25 and saved.data.train == {"manifest_filepath": "train.json"}
    assert (run_dir / CMD_ARGS).read_text().strip() == " ".join(sys.argv)
    given = prepare_run_dir(to_run_config({"logging": {"exp_dir": str(tmp_path), "name": "n", "version": "v2"},
                                           "checkpoint": {"dir": str(tmp_path / "elsewhere")}}))
    assert given.checkpoint.dir == str(tmp_path / "elsewhere")  # an explicit checkpoint.dir is kept


def test_metrics_go_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=True, wandb={"mode": "offline", "project": "xopd-test"},
                           hparams={"xopd": {"lam": 0.5}})
    logger.log(1, {"kl_cm": 0.5, "note": "text is skipped"})
    logger.log(2, {"kl_cm": 0.25})
    run = logger._wandb
    assert run.config["xopd"] == {"lam": 0.5}
    # wandb commits a step when the next one starts (the last one at finish): step 1 is in the summary now
    assert run.summary["_step"] == 1 and run.summary["kl_cm"] == 0.5 and "note" not in dict(run.summary)
    logger.close()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run.id}/run-{run.id}.wandb"))
    assert (tmp_path / "wandb_run_id").read_text().strip() == run.id  # a resumed run continues this W&B run
    resumed = MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume_step=2, wandb={"mode": "offline"})
    assert resumed._wandb.id == run.id
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("kl_cm")] == [(1, 0.5), (2, 0.25)]
    assert [json.loads(line)["kl_cm"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0.5, 0.25]


def test_wandb_asked_for_but_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RuntimeError, match="logging.wandb is set but Weights & Biases is not installed"):
        MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb={"project": "p"})


def _prepared_dir(exp_dir: str) -> str:
    import time

    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(1.1)  # rank 1's own clock would name another date-time version
    cfg = to_run_config({"logging": {"exp_dir": exp_dir}, "checkpoint": {"resume": False}})
    return prepare_run_dir(cfg).logging.dir


@pytest.mark.parity
def test_every_rank_gets_rank_zeros_run_dir(tmp_path):
    from megatron_xopd.testing import run_distributed

    dirs = run_distributed(_prepared_dir, 2, str(tmp_path))
    assert dirs[0] == dirs[1] and [p.name for p in (tmp_path / "xopd").iterdir()] == [dirs[0].rsplit("/", 1)[1]]
