"""Distributed runtime: process groups, Megatron parallel state, seeds, and the CPU compatibility layer."""

from .cpu_compat import cpu_compat_enabled, enable_cpu_compat, maybe_enable_cpu_compat
from .distributed import DistEnv, init_distributed, read_dist_env
from .parallel import ParallelConfig, destroy_model_parallel, initialize_model_parallel
from .seed import set_seed

__all__ = [
    "DistEnv",
    "ParallelConfig",
    "cpu_compat_enabled",
    "destroy_model_parallel",
    "enable_cpu_compat",
    "init_distributed",
    "initialize_model_parallel",
    "maybe_enable_cpu_compat",
    "read_dist_env",
    "set_seed",
]
