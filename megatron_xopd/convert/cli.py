"""Shared plumbing of the conversion scripts in ``tools/``: process groups and clear error exits."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch.distributed as dist

from ..runtime import ParallelConfig, destroy_model_parallel, init_distributed, initialize_model_parallel

# Errors that describe a bad input: printed as one line, not as a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError)


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under torchrun for > 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (run under torchrun for > 1)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size of an MoE model (run under torchrun for > 1)")


@contextlib.contextmanager
def model_parallel(tp: int, pp: int, ep: int = 1) -> Iterator[int]:
    """Initialise torch.distributed (torchrun, SLURM or a single process) and megatron's TP/PP/EP; yields the rank."""
    init_distributed()
    try:
        initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 expert_model_parallel_size=ep))
        yield dist.get_rank()
    finally:
        destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def main_guard(parser: argparse.ArgumentParser, main) -> None:
    """Run ``main``; a bad input (unsupported architecture, missing shard, TP that does not divide the heads...)
    prints ``<prog>: error: <type>: <message>`` and exits with status 2, argparse's convention."""
    try:
        main()
    except USER_ERRORS as err:
        parser.exit(2, f"{parser.prog}: error: {type(err).__name__}: {err}\n")
