"""Process-group initialisation from the torchrun or the SLURM environment."""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def first_host_in_nodelist(nodelist: str) -> str:
    """First host name of a SLURM node list, e.g. ``"gpu[003-005,009],cpu1"`` -> ``"gpu003"``.

    ``scontrol show hostnames`` does this on a login node, but compute nodes may lack ``scontrol`` in
    containers, so the (small) bracket grammar is parsed here.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_NODELIST / SLURM_JOB_NODELIST is empty")
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def read_dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Read rank, world size and rendezvous address from torchrun's or SLURM's variables.

    torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` win when both are present (``srun torchrun ...``).
    Under plain ``srun``, ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` give the ranks and the master
    is the first node of the allocation. Without either, this is a single process.
    """
    env = os.environ if environ is None else environ
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        addr = env.get("MASTER_ADDR") or first_host_in_nodelist(nodelist)
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", port, "single")


def init_distributed(timeout_minutes: float = 30.0, backend: str | None = None) -> DistEnv:
    """Initialise the default process group: NCCL when CUDA is present, gloo otherwise.

    Idempotent: an already initialised group is kept. A single process without launcher variables gets a
    world of one (so the same entry point runs under ``python`` and ``torchrun``).
    """
    env = read_dist_env()
    if dist.is_initialized():
        return env
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return env
