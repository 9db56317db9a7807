"""Runtime: launcher environments, seeding, and the CPU compatibility layer (real megatron code, no mocks)."""

import pytest
import torch

from megatron_xopd.runtime import read_dist_env
from megatron_xopd.runtime.distributed import first_host_in_nodelist
from megatron_xopd.testing import run_distributed


def test_torchrun_env_wins_over_slurm():
    env = read_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "SLURM_PROCID": "0",
                         "SLURM_NTASKS": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (3, 8, 1, "h", "torchrun")


def test_slurm_env_gives_ranks_and_first_node_as_master():
    env = read_dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                         "SLURM_JOB_NODELIST": "gpu[003-005,009],cpu1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        5, 16, 1, "gpu003", 1234, "slurm")


@pytest.mark.parametrize("nodelist,host", [("n1", "n1"), ("a[10-12]", "a10"), ("x-y[7,9]", "x-y7"), ("p1,p2", "p1")])
def test_first_host_in_nodelist(nodelist, host):
    assert first_host_in_nodelist(nodelist) == host


def test_no_launcher_is_single_process():
    assert read_dist_env({}).world_size == 1


def _compat_checks() -> dict:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron.core.utils import GlobalMemoryBuffer

    from megatron_xopd.runtime import cpu_compat_enabled, set_seed

    set_seed(7)
    tracker = get_cuda_rng_tracker()
    outer_before = torch.get_rng_state()
    with tracker.fork():
        tp_draw = torch.rand(3)
    with tracker.fork():
        tp_draw_next = torch.rand(3)
    buf = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x")
    return {
        "enabled": cpu_compat_enabled(),
        "outer_untouched": torch.equal(outer_before, torch.get_rng_state()),
        "tp_draw": tp_draw,
        "stream_advances": not torch.equal(tp_draw, tp_draw_next),
        "cuda_zeros_device": torch.zeros(2, device="cuda").device.type,
        "int_device": torch.ones(1, device=torch.cuda.current_device()).device.type,
        "buffer": (buf.shape, buf.device.type),
        "type_name": torch.zeros(1).type(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
    }


@pytest.mark.parity
def test_cpu_compat_layer_on_two_tp_ranks():
    a, b = run_distributed(_compat_checks, 2, tp=2)
    for r in (a, b):
        assert r["enabled"] and r["outer_untouched"] and r["stream_advances"]
        assert r["cuda_zeros_device"] == "cpu" and r["int_device"] == "cpu"
        assert r["buffer"] == (torch.Size([2, 3]), "cpu")
        assert r["type_name"] == "torch.cuda.FloatTensor"  # megatron's optimizer asserts CUDA type names
    # megatron's model-parallel stream is seeded by the TP rank: distinct across TP ranks.
    assert not torch.equal(a["tp_draw"], b["tp_draw"])


def test_cpu_compat_refuses_cuda(monkeypatch):
    from megatron_xopd.runtime import cpu_compat

    monkeypatch.setattr(cpu_compat, "_ENABLED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu_compat.enable_cpu_compat()


def test_megatron_overrides_match_the_installed_megatron_core():
    """Every megatron-core internal we override still exists with the parameters we rely on."""
    from megatron_xopd.runtime.mcore_overrides import check_overrides

    assert check_overrides() == []


def test_override_check_reports_a_changed_signature(monkeypatch):
    """A recorded parameter list that differs from the installed method is reported with the target named."""
    from megatron_xopd.runtime import mcore_overrides

    changed = mcore_overrides.Override("megatron.core.utils.GlobalMemoryBuffer.get_tensor", "replaced", "x.py", "y",
                                       ("self", "tensor_shape", "dtype"))
    monkeypatch.setattr(mcore_overrides, "OVERRIDES", (changed,))
    [problem] = mcore_overrides.check_overrides()
    assert "GlobalMemoryBuffer.get_tensor" in problem and "mem_alloc_context" in problem


def test_offloaded_module_is_copied_to_host_once_and_keeps_a_taken_head_in_place():
    """``resident(offload=True)`` (the offloaded teacher): host buffers made once, reused by every phase, the
    module pointed back at them on exit (no copy back: the weights are frozen), the values unchanged; a tensor
    taken inside the block (the head shard the loss reads) keeps the storage it had there. On CPU the device copy
    is the host buffer itself, so this checks the bookkeeping; the copies are the GPU check's."""
    from megatron_xopd.runtime.device import resident

    module = torch.nn.Linear(4, 3)
    module.register_buffer("scale", torch.arange(3.0))
    want = {k: v.clone() for k, v in module.state_dict().items()}
    with resident(module, offload=False):
        pass
    assert "_xopd_host_copy" not in module.__dict__
    storages = []
    for _ in range(2):
        with resident(module, offload=True):
            head = module.weight.detach()
            inside = head.untyped_storage().data_ptr()
        storages.append(module.weight.untyped_storage().data_ptr())
        assert head.untyped_storage().data_ptr() == inside
        assert all(torch.equal(v, want[k]) for k, v in module.state_dict().items())
    host = module.__dict__["_xopd_host_copy"].host
    assert storages[0] == storages[1] == host["weight"].untyped_storage().data_ptr()
    assert set(host) == {"weight", "bias", "scale"}
