"""Make megatron-core 0.16 run on CPU (gloo): the CPU-only patches of megatron-core (all overrides, CPU or not,
are listed in ``runtime/mcore_overrides.py``).

megatron-core hard-codes CUDA in a few places that are on the path of a ``GPTModel`` forward/backward,
the pipeline schedules, ``dist_checkpointing``, activation recompute and the MoE layer. These shims make the
*real* megatron code run on CPU processes, which is how the project's parallel tests check TP/PP against single-process references:

1. RNG tracker. ``megatron/core/tensor_parallel/random.py``: ``CudaRNGStatesTracker.add``/``fork`` call
   ``torch.cuda.get_rng_state``/``manual_seed`` and ``torch.cuda.default_generators``. We install
   :class:`CPURNGStatesTracker`, which keeps named CPU generator states, by replacing
   ``initialize_rng_tracker`` (``get_cuda_rng_tracker`` and ``model_parallel_cuda_manual_seed`` look it up
   at call time).
2. ``megatron/core/utils.py``: ``GlobalMemoryBuffer.get_tensor`` allocates with
   ``device=torch.cuda.current_device()`` (used by sequence-parallel all-gathers); replaced with a CPU
   allocation of the same contract.
3. Device arguments. ``torch.zeros(..., device="cuda")`` (``pipeline_parallel/schedules.py``,
   ``forward_backward_*``: ``total_num_tokens``), ``device=torch.cuda.current_device()`` (p2p shape
   exchange in ``pipeline_parallel/p2p_communication.py``, ``tensor_parallel/layers.py``,
   ``transformer/attention.py``, ``models/gpt/gpt_model.py``) and ``Tensor.cuda()``: a
   :class:`~torch.overrides.TorchFunctionMode` maps CUDA devices (``"cuda"``, ``"cuda:i"``, ints) to CPU,
   and ``torch.cuda.current_device``/``synchronize`` become harmless (the CPU device and a no-op), since
   ``parallel_state.py`` and ``p2p_communication.py`` call them unconditionally. ``current_device`` returns
   the CPU device rather than ``0`` because torch function modes are not active inside the autograd engine's
   backward calls: the sequence-parallel backward of ``tensor_parallel/layers.py`` allocates there with
   ``device=torch.cuda.current_device()``. The same mode answers
   ``Tensor.type()`` (no arguments) with the CUDA type name, because the optimizer asserts it:
   ``optimizer/clip_grads.py`` (``clip_grad_by_total_norm_fp32``: ``param.grad.type() ==
   'torch.cuda.FloatTensor'``) and ``optimizer/optimizer.py`` (``Float16OptimizerWithFloat16Params``
   sorts parameters by ``param.type()``). The rollout engine's forwards suspend the mode
   (:func:`device_mode_suspended`): its Python hook on every torch call costs them ~10%.

4. Activation recompute. megatron's ``CheckpointFunction`` (``tensor_parallel/random.py``) saves and restores
   the CUDA RNG state with ``_get_cuda_rng_state``/``_set_cuda_rng_state``; on CPU they read and set the CPU
   generator. The recomputed forward runs inside the autograd engine, where the device mode of 3. is not
   active, so ``get_default_causal_mask`` (``transformer/utils.py``, imported by ``fusions/fused_softmax.py``),
   which builds its mask with ``device="cuda"``, is replaced with a CPU one.

5. MoE (``transformer/moe``), without Transformer Engine: ``moe_utils.RouterGatingLinearFunction`` tests
   ``te_general_gemm is not None``, a name only bound when TE imports (NameError otherwise): we bind it to
   ``None`` so the torch ``mm`` path runs. ``MoEAlltoAllTokenDispatcher.__init__`` creates a class-wide
   ``torch.cuda.Stream`` for device-to-host copies of the split sizes, and ``_maybe_dtoh_and_synchronize``
   moves them there with stream/event calls: we set the class attribute to a CPU placeholder (so no stream
   is made) and replace the method with its CPU meaning (the tensors are on the host already, so nothing is
   copied and nothing waits; the split sizes become numpy arrays, as the original makes them). The all-to-all
   itself is gloo's ``all_to_all_single``. (The allgather dispatcher's backward calls an accelerator-only API;
   on CPU the alltoall dispatcher is the one that runs.)
   With experts split over tensor parallelism (expert_tensor_parallel_size > 1) the dispatcher gathers and
   reduce-scatters *uneven* token counts over the expert-TP group (``tensor_parallel/mappings.py``:
   ``_gather_along_first_dim``/``_reduce_scatter_along_first_dim`` with split sizes), which gloo cannot do
   (its all-gather needs equal sizes; it has no list reduce-scatter): with split sizes, we gather padded
   blocks and trim them, and all-reduce then keep this rank's block. Without split sizes megatron's code runs.

Enable with :func:`enable_cpu_compat`; it refuses to run when CUDA is available.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: "CudaToCpuMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # torch reads a bare int as a CUDA ordinal
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA device arguments of torch calls to CPU; ``Tensor.cuda()`` returns the tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CPURNGStatesTracker:
    """CPU counterpart of megatron's ``CudaRNGStatesTracker``: named RNG streams on the CPU generator.

    Same interface (``reset``, ``get_states``, ``set_states``, ``add``, ``fork``, ``is_initialized``), so
    megatron's weight initialisation and dropout under ``get_cuda_rng_tracker().fork()`` draw from
    per-TP-rank streams as they do on GPU.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
    """``GlobalMemoryBuffer.get_tensor`` with a CPU allocation (same reuse-by-name contract)."""
    required = 1
    for dim in tensor_shape:
        required *= dim
    buf = self.buffer.get((name, dtype))
    if buf is None or buf.numel() < required:
        buf = torch.empty(required, dtype=dtype, device="cpu")
        self.buffer[(name, dtype)] = buf
    return buf[:required].view(*tensor_shape)


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """``tensor_parallel.random._get_cuda_rng_state`` on CPU: the CPU generator's state (a new tensor)."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """``tensor_parallel.random._set_cuda_rng_state`` on CPU."""
    torch.set_rng_state(new_state)


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """``transformer.utils.get_default_causal_mask`` on CPU: True above the diagonal (masked)."""
    return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()


class _HostStream:
    """Stands in for ``MoEAlltoAllTokenDispatcher.cuda_dtoh_stream`` on CPU: never used, only not None."""


def _host_dtoh_and_synchronize(self, point: str, tokens_per_expert: torch.Tensor | None = None) -> torch.Tensor | None:
    """``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize`` on CPU: the tensors already live on the host, so
    nothing is copied or waited for; the split sizes become numpy arrays at the same point, as the original's
    ``maybe_move_tensor_to_cpu(..., as_numpy=True)`` makes them (the all-to-all takes sequences of ints)."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert


def _uneven_gather_along_first_dim(original):
    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        blocks = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(blocks, padded.contiguous(), group=group)
        return torch.cat([block[:size] for block, size in zip(blocks, output_split_sizes)])

    return gather


def _uneven_reduce_scatter_along_first_dim(original):
    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        total = input_.clone()
        torch.distributed.all_reduce(total, group=group)
        return torch.split(total, list(input_split_sizes), dim=0)[group.rank()].contiguous()

    return reduce_scatter


def _install_moe_shims() -> None:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    mappings._gather_along_first_dim = _uneven_gather_along_first_dim(mappings._gather_along_first_dim)
    mappings._reduce_scatter_along_first_dim = _uneven_reduce_scatter_along_first_dim(
        mappings._reduce_scatter_along_first_dim
    )
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _HostStream()
    token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _host_dtoh_and_synchronize


def enable_cpu_compat() -> None:
    """Install the shims (idempotent). Raises if CUDA is available: use the real code there."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("enable_cpu_compat() is for CPU-only processes; CUDA is available here")

    from megatron.core import utils as mcore_utils
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import utils as transformer_utils

    tracker = CPURNGStatesTracker()

    def initialize_rng_tracker(*args: Any, force_reset: bool = False, **kwargs: Any) -> None:
        if force_reset or not isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker):
            mcore_random._CUDA_RNG_STATE_TRACKER = tracker
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mcore_random.initialize_rng_tracker = initialize_rng_tracker
    mcore_random.CudaRNGStatesTracker = CPURNGStatesTracker
    initialize_rng_tracker()
    mcore_utils.GlobalMemoryBuffer.get_tensor = _cpu_get_tensor
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    transformer_utils.get_default_causal_mask = fused_softmax.get_default_causal_mask = _cpu_causal_mask
    _install_moe_shims()

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True


@contextlib.contextmanager
def device_mode_suspended() -> Iterator[None]:
    """Run a block without the device mode of 3. (when it is the innermost torch function mode).

    Every torch call under the mode goes through its Python ``__torch_function__``: about a tenth of a CPU
    rollout's decode step on a 135M model. The rollout engine's generation loop needs none of it: megatron's
    inference path names the device through ``torch.cuda.current_device()``, which stays patched.
    """
    if _MODE is None or torch.overrides._get_current_function_mode() is not _MODE:
        yield
        return
    _MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _MODE.__enter__()


def cpu_compat_enabled() -> bool:
    return _ENABLED


def maybe_enable_cpu_compat() -> bool:
    """Enable the CPU layer when CUDA is absent; return whether it is on."""
    if not torch.cuda.is_available():
        enable_cpu_compat()
    return _ENABLED
