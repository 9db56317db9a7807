"""Run a function on a group of local gloo (CPU) or NCCL processes: the harness of the parallel tests.

Each process initialises ``torch.distributed`` and, when ``tp``/``pp`` are given, Megatron's
``parallel_state``, calls ``fn(*args)``, and sends its return value back to the parent. The CPU
compatibility layer is switched on in each child when CUDA is absent, so real megatron-core code runs.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .runtime import ParallelConfig, init_distributed, initialize_model_parallel


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world_size: int, port: int, tp: int | None, pp: int, split: dict | None, fn: Callable,
           args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        init_distributed(timeout_minutes=5)
        if tp is not None:
            initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                     **(split or {})))
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)  # bytes, not shared-memory handles that die with this process
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the child's traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, tp: int | None = None, pp: int = 1,
    split: dict | None = None, timeout_s: float = 600.0,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh processes and return their results, ordered by rank.

    ``fn`` must be importable (a module-level function). With ``tp`` set, Megatron's model parallel state
    is initialised with that TP size and ``pp`` pipeline stages (split as ``split`` says: ``ParallelConfig``'s
    uneven-split fields); the data-parallel size is what remains.
    A failure on any rank raises ``RuntimeError`` carrying that rank's traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, port, tp, pp, split, fn, args, queue), daemon=False)
        for rank in range(world_size)
    ]
    # Children inherit the environment at start: silence megatron's "Apex/TE not installed" notes there.
    saved = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = "ignore"
    try:
        for proc in procs:
            proc.start()
    finally:
        if saved is None:
            os.environ.pop("PYTHONWARNINGS")
        else:
            os.environ["PYTHONWARNINGS"] = saved
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout_s)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for proc in procs:
            proc.join(timeout=5 if errors else timeout_s)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[rank] for rank in range(world_size)]
