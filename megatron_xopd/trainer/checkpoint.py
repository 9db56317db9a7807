"""Crash-safe, self-verifying checkpoints: megatron ``dist_checkpointing`` for model and optimizer, per-rank
trainer state without pickle.

Layout of ``<dir>/step_0000042/``: the dist checkpoint (model + optimizer, resharding-capable);
``trainer_state/rank<r>.json`` (step, data position, LR schedule, counters, Python and NumPy RNG) and
``trainer_state/rank<r>.safetensors`` (the torch RNG states), per rank because the data position and the RNG
streams differ per rank; and ``complete.json``, written last: every file with its size, the world size and the
parallel layout.

Model and optimizer state are keyed by parameter (megatron-core's ``fully_reshardable`` format for the
distributed optimizer, the same keys as the plain optimizer's, without the chained optimizer's per-part prefix), so
a checkpoint resumes at any TP/PP/EP/ETP/DP layout the model can take, with or without the distributed optimizer
(docs/robustness.md).

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
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..runtime.device import current_device
from .guard import check_finite_weights

log = logging.getLogger("megatron_xopd")

_STEP_DIR = re.compile(r"^step_(\d{7})$")
# The optimizer's checkpoint format: one tensor per parameter and Adam moment, keyed by the parameter's own checkpoint
# key, the same with one optimizer or megatron's chain of a dense and an expert optimizer (EP > 1) and for the plain
# optimizer. The distributed optimizer gathers its DP shards for this ("fully_reshardable"); "dp_reshardable" (bucket
# buffers) reshards over DP only, and "fully_sharded_model_space" raises "ShardedTensor.flattened_range is not
# supported" in megatron-core 0.16.1 (docs/robustness.md: what each costs).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
ADAM_STEP = "optimizer_adam_step"  # the Adam step count, saved beside the tensors (the one layout-dependent value)
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


# ------------------------------------------------------------------------------------------------------ layout
def current_layout(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """This run's parallel layout as the completion record stores it (``dp_ranks``: each rank's DP rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    dp_ranks = [None] * dist.get_world_size()
    dist.all_gather_object(dp_ranks, ps.get_data_parallel_rank())
    return {
        "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(), "etp": ps.get_expert_tensor_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(), "dp": ps.get_data_parallel_world_size(),
        "sp": any(getattr(getattr(m, "config", None), "sequence_parallel", False) for m in model.modules()),
        "distributed_optimizer": any(isinstance(part, DistributedOptimizer)
                                     for part in getattr(optimizer, "chained_optimizers", [optimizer])),
        "dp_ranks": dp_ranks,
    }


def format_layout(layout: dict[str, Any] | None) -> str:
    """``TP2 PP2 EP2 ETP1 DP2 +SP, distributed optimizer``; records without a layout read as unknown."""
    if not layout:
        return "an unrecorded layout"
    text = " ".join(f"{k.upper()}{layout[k]}" for k in ("tp", "pp", "ep", "etp", "cp", "dp")
                    if k != "cp" or layout[k] > 1)
    return text + (" +SP" if layout["sp"] else "") + (", distributed optimizer" if layout["distributed_optimizer"]
                                                      else ", plain optimizer")


def same_layout(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    return a is not None and {k: v for k, v in a.items() if k != "distributed_optimizer"} == {
        k: v for k, v in b.items() if k != "distributed_optimizer"}


def saved_layout(path: str | Path) -> dict[str, Any] | None:
    """The layout a checkpoint was written with (``None`` for records that predate layouts)."""
    record = Path(path) / COMPLETE
    return json.loads(record.read_text()).get("layout") if record.is_file() else None


# ------------------------------------------------------------------------------------------ completion record
def _write_record(path: Path, world_size: int, layout: dict[str, Any]) -> None:
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    record = path / COMPLETE
    tmp = path / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps({"world_size": world_size, "layout": layout, "files": files}, indent=1))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.rename(record)


def verify_checkpoint(path: str | Path) -> str | None:
    """Why ``path`` cannot be resumed from (naming the file), or ``None`` when its files match ``complete.json``.

    A checkpoint written by another number of ranks or another layout verifies: it is resharded at load."""
    path = Path(path)
    record = path / COMPLETE
    if not record.is_file():
        return f"{record} is missing (the save did not finish, or the checkpoint predates completion records)"
    try:
        content = json.loads(record.read_text())
        files = dict(content["files"])
        int(content["world_size"])
    except (ValueError, KeyError, TypeError) as err:
        return f"{record} is unreadable ({err})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, {COMPLETE} records {size} (truncated or overwritten)"
    return None


def find_resumable(root: str | Path | None) -> Path | None:
    """The newest verified checkpoint under ``root``; each newer one that fails verification is logged with the
    file at fault. Raises :class:`CheckpointError` when checkpoints exist but none verifies (rather than
    silently training from scratch next to them)."""
    if root is None or not Path(root).is_dir():
        return None
    problems = []
    for path in reversed(_step_dirs(Path(root))):
        problem = verify_checkpoint(path)
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


def load_trainer_state(directory: Path, rank: int, *, restore_rng: bool = True) -> dict[str, Any]:
    """Read (never unpickle) rank ``rank``'s trainer state, restore the RNG states (unless ``restore_rng`` is false:
    another layout keeps the streams this run seeded), and return the rest."""
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
    rng = state.pop("rng")
    if restore_rng:
        _set_rng_state(rng, tensors)
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
    layout = current_layout(model, optimizer)
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA),
             ADAM_STEP: _adam_step(optimizer)}
    request = dist_checkpointing.save(state, str(tmp), async_sharded_save=async_queue is not None)
    save_trainer_state(tmp / STATE_DIR, rank, trainer_state)

    def publish() -> None:
        dist.barrier()
        if rank == 0:
            _write_record(tmp, dist.get_world_size(), layout)
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
    """Saves a run's checkpoints (none without ``checkpoint.dir``), each step once, synchronously or
    (``checkpoint.async_save`` on CUDA) through megatron-core's asynchronous path; on CPU an asynchronous save is
    not available and it says so once."""

    def __init__(self, root: str | Path | None, keep_last: int, async_save: bool) -> None:
        self.root, self.keep_last = root, keep_last
        self.saved_step: int | None = None  # the step of the checkpoint written or resumed from last
        self.queue = None
        if root and async_save and torch.cuda.is_available():
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue()
        elif root and async_save and dist.get_rank() == 0:
            log.info("checkpoint.async_save: megatron-core's asynchronous save needs CUDA; saving synchronously")

    def save(self, trainer: Any) -> float:
        """Checkpoint ``trainer`` (an ``XOPDTrainer``) at its step, unless that step is saved already; returns the
        seconds it took."""
        if not self.root or self.saved_step == trainer.step:
            return 0.0
        t0 = time.perf_counter()
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)  # publish the saves that have finished
        save_checkpoint(self.root, trainer.step, trainer.student, trainer.optimizer, trainer_state(trainer),
                        keep_last=self.keep_last, async_queue=self.queue)
        self.saved_step = trainer.step
        return time.perf_counter() - t0

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


def _inner_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    return [part.optimizer for part in getattr(optimizer, "chained_optimizers", [optimizer])
            if getattr(part, "optimizer", None) is not None]


def _adam_step(optimizer: Any) -> int:
    """Adam's step count (the same for every parameter; ranks without optimizer state read 0): a plain number
    saved once, since megatron-core keeps it in layout-dependent places (per parameter or per group)."""
    device = current_device()  # NCCL (the default group on GPUs) takes no CPU tensors
    steps = [torch.as_tensor(state["step"], dtype=torch.float32, device=device).reshape(1)
             for inner in _inner_optimizers(optimizer) for state in inner.state.values() if "step" in state]
    steps += [torch.tensor([float(g["step"])], device=device)
              for inner in _inner_optimizers(optimizer) for g in inner.param_groups if "step" in g]
    found = torch.cat(steps).max().reshape(1) if steps else torch.zeros(1, device=device)  # no host sync per parameter
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return int(found.item())


def _set_adam_step(optimizer: Any, step: int) -> None:
    """Give every parameter's (and group's) Adam state the saved step count, each its own tensor.

    Without Apex/TE (torch's Adam, as on CPU), megatron-core 0.16.1's ``DistributedOptimizer.load_state_dict``
    puts one shared ``step`` tensor into every parameter's state; torch's Adam increments ``step`` in place per
    parameter, so a shared tensor inflated the bias correction by the number of parameters (measured: every
    updated weight off by up to 0.4 x lr on the first step after resuming).
    """
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            if "step" in group:
                group["step"] = step
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = torch.full_like(state["step"], step)
            elif "step" in state:
                state["step"] = step


def _with_steps(state: Any, optimizer: Any, step: int) -> Any:
    """``state`` (for ``optimizer.load_state_dict``) with Adam's ``step`` in each parameter's state of the plain
    optimizers, which torch's Adam requires (megatron-core saves it once, and not at step 0)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    for part, part_state in zip(parts, [state] if len(parts) == 1 else [state[i] for i in range(len(parts))]):
        if not isinstance(part, DistributedOptimizer):
            inner = part_state.get("optimizer", part_state)  # the mixed-precision optimizer nests torch's
            for param_state in inner["state"].values():
                if isinstance(param_state, dict):
                    param_state.setdefault("step", torch.tensor(float(step)))
    return state


@contextmanager
def _adam_step_kept() -> Iterator[None]:
    """megatron-core 0.16.1's ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every key of a
    parameter's Adam state from the loaded tensors, torch Adam's ``step`` too, which the ``fully_reshardable`` format
    does not save: without Apex/TE every load raised ``KeyError: 'step'``. During a load the step is set aside (and
    set afterwards from :data:`ADAM_STEP`)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def without_step(self: Any, model_param: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = without_step
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original


def _fill(request: Any, loaded: Any) -> Any:
    """``request`` (an optimizer's sharded state dict for loading) with each sharded entry replaced by the tensor
    loaded for it; an entry not loaded keeps its own data."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase, ShardedTensorFactory

    if isinstance(request, (ShardedBase, ShardedTensorFactory)):
        return request.data if loaded is None else loaded
    if isinstance(request, LocalNonpersistentObject):
        return request.unwrap()
    if isinstance(request, dict):
        return {k: _fill(v, loaded.get(k) if isinstance(loaded, dict) else None) for k, v in request.items()}
    if isinstance(request, list):
        pick = (lambda i: loaded.get(i)) if isinstance(loaded, dict) else (
            lambda i: loaded[i] if isinstance(loaded, list) and i < len(loaded) else None)
        return [_fill(v, pick(i)) for i, v in enumerate(request)]
    return request


def _sharded_entries(tree: Any) -> list:
    """The tensors (not the objects: those are not in the checkpoint's tensor metadata) of a sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return [v for v in nested_values(tree) if isinstance(v, (ShardedTensor, ShardedTensorFactory))]


def _drop(tree: Any, keys: set[str]) -> Any:
    """``tree`` with the sharded entries whose key is in ``keys`` replaced by ``None`` (not requested)."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensorFactory

    if isinstance(tree, (ShardedBase, ShardedTensorFactory)):
        return None if tree.key in keys else tree
    if isinstance(tree, dict):
        return {k: _drop(v, keys) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_drop(v, keys) for v in tree]
    return tree


@torch.no_grad()
def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """Load model and optimizer, resharding them to this run's layout, and return this rank's trainer state (that
    of the saved rank :func:`trainer_state_rank` maps it to). Every failure is one :class:`CheckpointError` naming
    the checkpoint, the file or key, the saved layout and this one."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    written, layout = saved_layout(path), current_layout(model, optimizer)
    where = f"checkpoint {path} (written at {format_layout(written)}; this run is {format_layout(layout)})"
    carry = (f"; to start from its weights with a fresh optimizer, data position and schedule, set "
             f"checkpoint.init_from={path} and checkpoint.resume=false")
    try:
        _create_optimizer_state(optimizer)
        model_sd = model.sharded_state_dict()
        request = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)
        stored = dist_checkpointing.load_tensors_metadata(str(path))
        missing = sorted({e.key for e in _sharded_entries(model_sd) if e.key not in stored})
        if missing:
            raise CheckpointError(f"{where}: the model has weights the checkpoint lacks: {', '.join(missing[:3])}"
                                  + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
                                  + " (another model?)")
        absent = {e.key for e in _sharded_entries(request) if e.key not in stored}
        # fp32 main weights (the distributed optimizer's "param", the plain bf16 optimizer's "fp32_param"), absent
        # from the other's checkpoint, are copied from the loaded weights; any other absent key: the state cannot move
        main_only = {k for k in absent if k.startswith(("optimizer.state.param.", "optimizer.state.fp32_param."))}
        if absent - main_only:
            key = sorted(absent - main_only)[0]
            raise CheckpointError(f"{where}: the optimizer state cannot be carried to this layout: key {key} "
                                  f"(and {len(absent - main_only) - 1} more) is not in {path} (an optimizer saved "
                                  f"in a layout-dependent format, e.g. the bucket format of an older version)"
                                  + carry)
        loaded = dist_checkpointing.load({"model": model_sd, "optimizer": _drop(request, main_only)}, str(path))
        if ADAM_STEP not in loaded:
            raise CheckpointError(f"{where}: {ADAM_STEP} is not in its common state (a checkpoint of an older "
                                  "version)" + carry)
        # The loaded weights may be the parameters themselves (loaded in place), and fp32 main weights views of
        # them: main weights absent from the checkpoint (left as the request's uninitialised buffers) would overwrite
        # both, so the weights are kept aside and set again after the optimizer's load.
        weights = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in loaded["model"].items()} \
            if main_only else loaded["model"]
        with _adam_step_kept():
            optimizer.load_state_dict(_with_steps(_fill(request, loaded["optimizer"]), optimizer, loaded[ADAM_STEP]))
        model.load_state_dict(weights)
        if main_only:
            optimizer.reload_model_params()
        _set_adam_step(optimizer, int(loaded[ADAM_STEP]))
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - megatron's checkpointing raises many types; each is named here
        raise CheckpointError(f"{where}: the model/optimizer shards do not load: {type(err).__name__}: {err}"
                              + carry) from err
    source = trainer_state_rank(written, layout)
    return load_trainer_state(path / STATE_DIR, source, restore_rng=same_layout(written, layout))


def trainer_state_rank(written: dict[str, Any] | None, layout: dict[str, Any]) -> int:
    """The saved rank whose trainer state this rank reads: itself at the same layout; at another layout with the
    same DP size the first saved rank of its DP rank (whose data position it continues); at another DP size the
    first rank of DP rank 0 (its data position is rescaled by :func:`carry_data_position`)."""
    rank = dist.get_rank()
    if written is None or same_layout(written, layout):
        return rank
    dp_rank = layout["dp_ranks"][rank] if written["dp"] == layout["dp"] else 0
    return written["dp_ranks"].index(dp_rank)


def carry_data_position(loader_state: dict[str, Any], written_dp: int, dp: int, dp_rank: int) -> dict[str, Any]:
    """The data position saved by a DP rank at ``written_dp`` ranks, carried to DP rank ``dp_rank`` of ``dp``.

    lhotse deals the epoch's batches (an order fixed by seed and epoch, not by DP size) round-robin over the DP
    ranks, so ``K`` batches per rank at ``written_dp`` ranks are the first ``K * written_dp`` batches of the epoch;
    each new rank skips ``floor(K * written_dp / dp)`` of its own batches: nothing is skipped, and at most
    ``dp - 1`` batches dealt before the checkpoint are dealt again."""
    state = json.loads(json.dumps(loader_state))
    diagnostics = state["diagnostics"]
    epoch = state["diagnostics"]["stats_per_epoch"][str(diagnostics["current_epoch"])]
    epoch["kept_batches"] = (epoch["kept_batches"] + epoch["discarded_batches"]) * written_dp // dp
    epoch["discarded_batches"] = 0
    state["world_size"], state["rank"] = dp, dp_rank
    return state


def trainer_state(trainer: Any) -> dict[str, Any]:
    """This rank's position and counters, JSON-able (saved without pickle)."""
    return {"step": trainer.step, "epoch": trainer.epoch, "loader": trainer.loader.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "data_stats": trainer.data_stats.state_dict(),
            "guard": trainer.guard.state_dict(), "skipped_steps": trainer.skipped_steps}


def resume(trainer: Any) -> None:
    """Resume ``trainer`` (an ``XOPDTrainer``) from the newest complete checkpoint in ``checkpoint.dir``, at any
    layout: weights, optimizer state, LR schedule, step and counters, and the data position (carried to a new DP
    size by :func:`carry_data_position`); with nothing to resume, start from ``checkpoint.init_from`` if set."""
    from megatron.core import parallel_state

    from ..convert.sources import resolve_path
    from ..data.cuts import CutStats

    ckpt = trainer.cfg.checkpoint
    path = None
    if ckpt.resume:
        path = find_resumable(ckpt.dir)
        chosen = torch.tensor([int(path.name[5:]) if path else -1], device=current_device())
        low, high = chosen.clone(), chosen.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if low.item() != high.item():
            raise CheckpointError(f"checkpoint.dir={ckpt.dir}: the ranks see different newest valid checkpoints "
                                  f"(steps {low.item()} and {high.item()}); is it shared?")
    if path is None:
        if ckpt.init_from:
            loaded = load_model_weights(resolve_path(ckpt.init_from), trainer.student)
            if dist.get_rank() == 0:
                log.info("student initialised from %s", loaded)
        return
    written = saved_layout(path)
    state = load_checkpoint(path, trainer.student, trainer.optimizer)
    layout = current_layout(trainer.student, trainer.optimizer)
    loader = state["loader"]
    if written is not None and written["dp"] != layout["dp"]:
        loader = carry_data_position(loader, written["dp"], layout["dp"], parallel_state.get_data_parallel_rank())
    trainer.step, trainer.epoch = state["step"], state["epoch"]
    trainer.loader.load_state_dict(loader)
    trainer._restored_position = True
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.data_stats = CutStats.from_state_dict(state["data_stats"])
    trainer.guard.load_state_dict(state["guard"])
    trainer.saver.saved_step = trainer.step
    trainer.skipped_steps = state.get("skipped_steps", 0)
    if dist.get_rank() == 0:
        if same_layout(written, layout):
            log.info("resumed from %s at step %d", path, trainer.step)
        else:
            log.info("resuming step %d written at %s on a new layout %s (%s)", trainer.step, format_layout(written),
                     format_layout(layout), path)
