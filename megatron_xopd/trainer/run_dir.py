"""The run directory, laid out as NeMo's ``exp_manager`` lays it out.

With ``logging.exp_dir`` set, the run lives in ``<exp_dir>/<name>/<version>``: ``version`` defaults to the start
date and time (``%Y-%m-%d_%H-%M-%S``), except when the run resumes from its checkpoints (``checkpoint.resume``,
exp_manager's ``resume_if_exists``), which needs one fixed directory: then there is no version level, as in
exp_manager. Checkpoints default to ``<run>/checkpoints``. Without ``exp_dir`` the run directory is ``logging.dir``.

In it, rank 0 writes ``hparams.yaml`` (the resolved run config, every default filled in), ``cmd-args.log`` (the
command line), ``metrics.jsonl`` and TensorBoard events (``tensorboard/``); with ``logging.wandb`` also a Weights
& Biases run (``wandb/``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch.distributed as dist

from .config import RunConfig

HPARAMS = "hparams.yaml"
CMD_ARGS = "cmd-args.log"
DATETIME_VERSION = "%Y-%m-%d_%H-%M-%S"


def run_dir_of(cfg: RunConfig, now: float | None = None) -> Path:
    """The run directory of ``cfg`` (see the module); ``now`` (seconds since the epoch) names a date-time version."""
    log = cfg.logging
    if log.exp_dir is None:
        return Path(log.dir)
    version = log.version
    if version is None and not cfg.checkpoint.resume:
        version = time.strftime(DATETIME_VERSION, time.localtime(now))
    return Path(log.exp_dir) / log.name / (version or "")


def prepare_run_dir(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``logging.dir`` (and, if unset, ``checkpoint.dir``) pointing into the run directory; rank 0
    creates it and writes ``hparams.yaml`` and ``cmd-args.log``. Every rank gets rank 0's directory (a date-time
    version is taken once)."""
    run_dir = run_dir_of(cfg)
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    checkpoint = cfg.checkpoint
    if cfg.logging.exp_dir is not None and checkpoint.dir is None:
        checkpoint = dataclasses.replace(checkpoint, dir=str(run_dir / "checkpoints"))
    resolved = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, dir=str(run_dir)), checkpoint=checkpoint)
    if not dist.is_initialized() or dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / HPARAMS).write_text(config_yaml(resolved))
        with (run_dir / CMD_ARGS).open("a") as f:
            f.write(" ".join(sys.argv) + "\n")
    return resolved


def config_yaml(cfg: RunConfig) -> str:
    """The run config as YAML (``to_run_config(OmegaConf.load(hparams.yaml))`` gives it back)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
