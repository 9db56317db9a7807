"""Seeding of every RNG a run touches."""

from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int, *, model_parallel: bool = True) -> None:
    """Seed Python, NumPy and torch, and Megatron's model-parallel RNG tracker.

    The tracker gives tensor-parallel ranks distinct dropout/initialisation streams (offset by the TP rank),
    which is what Megatron's ``model_parallel_cuda_manual_seed`` does; on CPU it runs on the CPU tracker
    installed by :mod:`megatron_xopd.runtime.cpu_compat`.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if model_parallel:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        if parallel_state.model_parallel_is_initialized():
            model_parallel_cuda_manual_seed(seed)
