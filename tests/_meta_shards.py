"""Build the paper recipe's student and teacher shards at full size on the ``meta`` device for chosen ranks of a
64-GPU world, with no memory and no real world (run as ``python -m tests._meta_shards RANK:ETP ...``; a JSON line per case).

What is real and what is not: ``torch.distributed`` runs on PyTorch's ``fake`` backend (``FakeStore``), a
single-process world of 64 where this process *is* the chosen rank and collectives do nothing; megatron-core's own
``parallel_state.initialize_model_parallel`` builds every group for that rank (without its gloo side groups, which
the fake backend cannot create); ``build_gpt_model`` builds megatron-core's ``GPTModel`` under ``torch.device
("meta")``. Grouped GEMM is turned off (it needs Transformer Engine and CUDA): the sequential experts hold the
same per-expert shapes. For the distributed optimizer, megatron's DDP lays out its gradient buffers (allocated on
the meta device: ``torch.cuda.current_device`` answers ``meta`` while it does) and ``DistributedOptimizer``'s own
range map (``_build_gbuf_range_map``) says which elements of each buffer this DP rank owns, i.e. how many fp32 main
parameters and Adam m, v it holds; the optimizer itself is not built (it checks for CUDA tensor types).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def split_dense_expert(model: torch.nn.Module) -> tuple[int, int]:
    """(dense, expert) parameters of a built model; the routed experts live under ``mlp.experts``."""
    dense = expert = 0
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            expert += param.numel()
        else:
            dense += param.numel()
    return dense, expert


def _optimizer_shard(ddp) -> int:
    """Elements of the fp32 main parameters (and of each Adam moment) this DP rank owns, by megatron's ranges."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    owned = 0
    for buffer in ddp.buffers + ddp.expert_parallel_buffers:
        for buckets in DistributedOptimizer._build_gbuf_range_map(buffer).values():
            owned += sum(r["param"].size for bucket in buckets for r in bucket["param_map"].values())
    return owned


def shards(rank: int, etp: int, teacher_preset: str | None, optimizer: bool) -> dict:
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_xopd.models import build_gpt_model
    from megatron_xopd.models.memory import Layout, rank_params
    from megatron_xopd.runtime.cpu_compat import maybe_enable_cpu_compat
    from megatron_xopd.trainer.build import wrap_ddp
    from megatron_xopd.trainer.memory_plan import run_model_configs
    from tools.plan_memory import compose

    overrides = [f"trainer.parallel.expert_tensor_parallel_size={etp}"]
    if teacher_preset:
        overrides.append(f"model.teacher.preset={teacher_preset}")
    run = compose("paper_qwen3_omni", overrides)
    par = run.trainer.parallel
    layout = Layout(par, 64)
    student, teacher = run_model_configs(run, layout.tp)
    dist.init_process_group("fake", rank=rank, world_size=64, store=FakeStore())
    maybe_enable_cpu_compat()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_parallel_size,
        create_gloo_process_groups=False,
    )
    stage = parallel_state.get_pipeline_model_parallel_rank()
    out = {"rank": rank, "stage": stage, "etp": parallel_state.get_expert_tensor_parallel_world_size(),
           "ep_rank": parallel_state.get_expert_model_parallel_rank()}
    for role, cfg in (("student", student), ("teacher", teacher)):
        cfg.moe_grouped_gemm = False
        with torch.device("meta"):
            model = build_gpt_model(cfg)
        planned = rank_params(cfg, layout, stage)
        out[role] = {"built": split_dense_expert(model), "planned": (planned.dense, planned.expert)}
        if optimizer and role == "student":
            real_device = torch.cuda.current_device
            torch.cuda.current_device = lambda: torch.device("meta")
            try:
                ddp = wrap_ddp(model, par)
            finally:
                torch.cuda.current_device = real_device
            grads = sum(b.grad_data.numel() for b in ddp.buffers + ddp.expert_parallel_buffers)
            dense_dp, expert_dp = layout.dp * layout.cp, layout.expert_dp
            out["optimizer"] = {"grad_elements": grads, "owned": _optimizer_shard(ddp),
                                "planned_owned": -(-planned.dense // dense_dp) + -(-planned.expert // expert_dp)}
        del model
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return out


if __name__ == "__main__":  # cases RANK:ETP[:TEACHER_PRESET][:optimizer] ...
    for case in sys.argv[1:]:
        rank, etp, *rest = case.split(":")
        teacher = next((r for r in rest if r != "optimizer"), None)
        print(json.dumps(shards(int(rank), int(etp), teacher, optimizer="optimizer" in rest)), flush=True)
