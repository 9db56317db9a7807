"""Crash-safe checkpoints: megatron ``dist_checkpointing`` for model and optimizer, per-rank trainer state.

Layout of ``<dir>/step_0000042/``: the dist checkpoint (model + optimizer, resharding-capable), and
``trainer_state/rank<r>.pt`` (step, LR scheduler, RNG states, data position; per rank because the data
position and the RNG streams differ per rank). Everything is written under ``<dir>/.tmp_step_0000042`` and
renamed once all ranks are done, so a crash never leaves a directory that :func:`latest_checkpoint` picks up.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{7})$")
# The distributed optimizer's checkpoint format: its bucket buffers as saved, resharded over DP at load (megatron-core
# 0.16.1's default, "fully_sharded_model_space", is deprecated; "fully_reshardable" fails to load with KeyError 'step').
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def latest_checkpoint(root: str | Path | None) -> Path | None:
    """The newest complete checkpoint under ``root`` (temporary, half-written ones are ignored)."""
    if root is None or not Path(root).is_dir():
        return None
    steps = sorted(p for p in Path(root).iterdir() if p.is_dir() and _STEP_DIR.match(p.name))
    return steps[-1] if steps else None


def rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    trainer_state: dict[str, Any],
    *,
    keep_last: int = 0,
) -> Path:
    """Write a complete checkpoint of ``step`` (collective: every rank calls it)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final, tmp = step_dir(root, step), root / f".tmp_step_{step:07d}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)}
    dist_checkpointing.save(state, str(tmp))
    (tmp / "trainer_state").mkdir(exist_ok=True)
    torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer_state" / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last > 0:
            steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
            for old in steps[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_model_weights(path: str | Path, model: torch.nn.Module) -> Path:
    """Only the model weights of a checkpoint (any TP/PP layout); optimizer, schedule and data position start fresh.

    ``path`` is a ``step_*`` directory or a run's checkpoint root (its newest complete step); returns the one loaded.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / "metadata.json").exists():
        newest = latest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"checkpoint.init_from: {path} is neither a checkpoint (no metadata.json) "
                                    "nor a directory of step_* checkpoints")
        path = newest
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(state["model"])
    return path


def _create_optimizer_state(optimizer: Any) -> None:
    """Give a distributed optimizer that never stepped its Adam state, which its load expects (one ``step`` per
    parameter group), as megatron-core does: a step on zero gradients (the loaded values replace it)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(part, DistributedOptimizer) and not part.optimizer.state:
            part._init_optimizer_states_with_dummy_values()


def _unshare_adam_steps(optimizer: Any) -> None:
    """Give every parameter's Adam state its own ``step`` tensor.

    Without Apex/TE (torch's Adam, as on CPU), megatron-core 0.16.1's ``DistributedOptimizer.load_state_dict``
    puts one shared ``step`` tensor into every parameter's state; torch's Adam increments ``step`` in place per
    parameter, so after a resume the bias correction used a step count inflated by the number of parameters
    (measured: every updated weight off by up to 0.4 x lr on the first step after resuming).
    """
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        for state in (inner.state.values() if inner is not None else ()):
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


@torch.no_grad()
def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """Load model and optimizer (resharding if the layout changed) and return this rank's trainer state."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    _create_optimizer_state(optimizer)
    model_sd = model.sharded_state_dict()
    # creates the state to load into
    optim_sd = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)
    state = dist_checkpointing.load({"model": model_sd, "optimizer": optim_sd}, str(path))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _unshare_adam_steps(optimizer)
    rank_file = path / "trainer_state" / f"rank{dist.get_rank()}.pt"
    if not rank_file.exists():
        raise FileNotFoundError(f"{rank_file}: checkpoint {path} was written with a different world size")
    trainer_state = torch.load(rank_file, weights_only=False)
    set_rng_state(trainer_state.pop("rng"))
    return trainer_state
