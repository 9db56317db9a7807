"""Crash-safe, self-verifying checkpoints: megatron ``dist_checkpointing`` for model and optimizer, per-rank
trainer state without pickle.

Layout of ``<dir>/step_0000042/``: the dist checkpoint (model + optimizer, resharding-capable);
``trainer_state/rank<r>.json`` (step, data position, LR schedule, counters, Python and NumPy RNG) and
``trainer_state/rank<r>.safetensors`` (the torch RNG states), per rank because the data position and the RNG
streams differ per rank; and ``complete.json``, written last: every file with its size, and the world size.

Everything is written under ``<dir>/.tmp_step_0000042`` and renamed once all ranks are done, so a crash never
leaves a ``step_*`` directory. On resume, :func:`find_resumable` takes the newest ``step_*`` whose files match
its completion record; a truncated or missing file is reported by path and the run falls back to the one before.
Trainer state is read with ``json`` and ``safetensors`` only: a pickle planted in a checkpoint directory is never
unpickled (it would run code).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .guard import check_finite_weights

log = logging.getLogger("megatron_xopd")

_STEP_DIR = re.compile(r"^step_(\d{7})$")
# The distributed optimizer's checkpoint format: its bucket buffers as saved, resharded over DP at load (megatron-core
# 0.16.1's default, "fully_sharded_model_space", is deprecated; "fully_reshardable" fails to load with KeyError 'step').
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
COMPLETE = "complete.json"
STATE_DIR = "trainer_state"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from, with the path and file at fault."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def _step_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(root: str | Path | None) -> Path | None:
    """The newest renamed (fully written) ``step_*`` directory under ``root``; temporary ones are ignored."""
    if root is None or not Path(root).is_dir():
        return None
    steps = _step_dirs(Path(root))
    return steps[-1] if steps else None


# ------------------------------------------------------------------------------------------ completion record
def _write_record(path: Path, world_size: int) -> None:
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    record = path / COMPLETE
    tmp = path / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps({"world_size": world_size, "files": files}, indent=1))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.rename(record)


def verify_checkpoint(path: str | Path, world_size: int | None = None) -> str | None:
    """Why ``path`` cannot be resumed from (naming the file), or ``None`` when its files match ``complete.json``.

    With ``world_size``, a checkpoint written by another number of ranks is reported as such (its per-rank
    trainer state does not fit this run)."""
    path = Path(path)
    record = path / COMPLETE
    if not record.is_file():
        return f"{record} is missing (the save did not finish, or the checkpoint predates completion records)"
    try:
        content = json.loads(record.read_text())
        files, written_world = dict(content["files"]), int(content["world_size"])
    except (ValueError, KeyError, TypeError) as err:
        return f"{record} is unreadable ({err})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, {COMPLETE} records {size} (truncated or overwritten)"
    if world_size is not None and written_world != world_size:
        return (f"{path} was written by {written_world} ranks and this run has {world_size}; its per-rank trainer "
                "state does not fit (start from its weights with checkpoint.init_from)")
    return None


def find_resumable(root: str | Path | None, world_size: int) -> Path | None:
    """The newest verified checkpoint under ``root``; each newer one that fails verification is logged with the
    file at fault. Raises :class:`CheckpointError` when checkpoints exist but none verifies (rather than
    silently training from scratch next to them)."""
    if root is None or not Path(root).is_dir():
        return None
    problems = []
    for path in reversed(_step_dirs(Path(root))):
        problem = verify_checkpoint(path, world_size)
        if problem is None:
            for bad in problems if not dist.is_initialized() or dist.get_rank() == 0 else ():
                log.warning("checkpoint not resumable, skipped: %s; falling back to %s", bad, path)
            return path
        problems.append(problem)
    if problems:
        raise CheckpointError(f"checkpoint.dir={root}: no resumable checkpoint: " + "; ".join(problems)
                              + " (set checkpoint.resume=false to start afresh)")
    return None


# ------------------------------------------------------------------------------------------------ trainer state
def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The RNG states as JSON-able values and tensors."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch": torch.get_rng_state()}
    tensors.update({f"tracker/{k}": v.clone().cpu() for k, v in get_cuda_rng_tracker().get_states().items()})
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return plain, tensors


def _set_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    tracker = get_cuda_rng_tracker()
    tracker.set_states({k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("tracker/")})
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def save_trainer_state(directory: Path, rank: int, state: dict[str, Any]) -> None:
    """This rank's trainer state (JSON-able values) and RNG states, as JSON and safetensors."""
    plain, tensors = _rng_state()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rank{rank}.json").write_text(json.dumps({**state, "rng": plain}))
    save_file(tensors, str(directory / f"rank{rank}.safetensors"))


def load_trainer_state(directory: Path, rank: int) -> dict[str, Any]:
    """Read (never unpickle) this rank's trainer state, restore the RNG states, and return the rest."""
    json_file, tensor_file = directory / f"rank{rank}.json", directory / f"rank{rank}.safetensors"
    for f in (json_file, tensor_file):
        if not f.is_file():
            legacy = directory / f"rank{rank}.pt"
            hint = (f"; {legacy.name} is a pickle (an older format) and is not loaded, since unpickling can run "
                    "code: start from its weights with checkpoint.init_from" if legacy.exists() else "")
            raise CheckpointError(f"{f} is missing{hint}")
    try:
        state = json.loads(json_file.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{json_file} is not JSON trainer state ({err})") from err
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{tensor_file} is not a safetensors file ({err})") from err
    _set_rng_state(state.pop("rng"), tensors)
    return state


# -------------------------------------------------------------------------------------------------- save / load
def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    trainer_state: dict[str, Any],
    *,
    keep_last: int = 0,
    async_queue: Any = None,
) -> Path:
    """Write a complete checkpoint of ``step`` (collective: every rank calls it); keep the newest ``keep_last``.

    With ``async_queue`` (megatron-core's ``AsyncCallsQueue``, CUDA only) the shards are written in the background
    and the checkpoint is published (completion record, rename, retention) when the queue finalizes the call."""
    from megatron.core import dist_checkpointing

    check_finite_weights(model, f"checkpoint of step {step}")
    root = Path(root)
    final, tmp = step_dir(root, step), root / f".tmp_step_{step:07d}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)}
    request = dist_checkpointing.save(state, str(tmp), async_sharded_save=async_queue is not None)
    save_trainer_state(tmp / STATE_DIR, rank, trainer_state)

    def publish() -> None:
        dist.barrier()
        if rank == 0:
            _write_record(tmp, dist.get_world_size())
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            if keep_last > 0:
                for old in _step_dirs(root)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    if async_queue is None:
        publish()
    else:
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(request)
    return final


class CheckpointSaver:
    """Saves a run's checkpoints, synchronously or (``checkpoint.async_save`` on CUDA) through megatron-core's
    asynchronous path; on CPU an asynchronous save is not available and it says so once."""

    def __init__(self, root: str | Path, keep_last: int, async_save: bool) -> None:
        self.root, self.keep_last = root, keep_last
        self.queue = None
        if async_save and torch.cuda.is_available():
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue()
        elif async_save and dist.get_rank() == 0:
            log.info("checkpoint.async_save: megatron-core's asynchronous save needs CUDA; saving synchronously")

    def save(self, step: int, model: torch.nn.Module, optimizer: Any, trainer_state: dict[str, Any]) -> None:
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)  # publish the saves that have finished
        save_checkpoint(self.root, step, model, optimizer, trainer_state, keep_last=self.keep_last,
                        async_queue=self.queue)

    def finish(self) -> None:
        """Wait for the asynchronous saves still running, and publish them."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)


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


@torch.no_grad()
def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """Load model and optimizer (resharding if the layout changed) and return this rank's trainer state."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    path = Path(path)
    _create_optimizer_state(optimizer)
    model_sd = model.sharded_state_dict()
    optim_sd = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)  # creates the state to load into
    try:
        state = dist_checkpointing.load({"model": model_sd, "optimizer": optim_sd}, str(path))
    except (CheckpointingException, OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"checkpoint {path}: the model/optimizer shards do not load: {err}") from err
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return load_trainer_state(path / STATE_DIR, dist.get_rank())
