"""Save time and size of a checkpoint (model + optimizer) in the distributed optimizer's bucket format
(``dp_reshardable``, before issue 25) and the parameter-keyed one (``fully_reshardable``, now), on 2 gloo ranks at
EP2 x DP2 with a MoE GPT, median of 3 saves (docs/robustness.md).

    python benchmarks/bench_checkpoint_format.py
"""

import shutil
import tempfile
import time
from pathlib import Path


def run(root: str, hidden: int, experts: int, layers: int) -> dict:
    """On each rank: a MoE GPT and its distributed optimizer at EP2 x DP2, saved 3 times in each format."""
    import torch.distributed as dist

    from megatron_xopd.models import build_gpt_model
    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel, set_seed
    from megatron_xopd.trainer import checkpoint
    from megatron_xopd.trainer.build import build_optimizer, wrap_ddp
    from megatron_xopd.trainer.config import OptimSection
    from tests._models import tiny_gpt_config

    layout = ParallelConfig(expert_model_parallel_size=2)
    initialize_model_parallel(layout)
    set_seed(0)
    cfg = tiny_gpt_config("qwen3", num_layers=layers, hidden_size=hidden, ffn_hidden_size=2 * hidden,
                          num_moe_experts=experts, moe_ffn_hidden_size=hidden, moe_router_topk=2, padded_vocab_size=512)
    model = build_gpt_model(cfg)
    ddp = wrap_ddp(model, layout)
    opt, _ = build_optimizer(ddp, OptimSection(lr=1e-3), 10)
    opt.step()  # zero gradients: Adam's state exists, as after a step
    out = {}
    for name, meta in (("dp_reshardable", {"distrib_optim_sharding_type": "dp_reshardable"}),
                       ("fully_reshardable", checkpoint.OPTIMIZER_METADATA)):
        times = []
        for i in range(3):
            checkpoint.OPTIMIZER_METADATA = meta
            dist.barrier()
            t0 = time.perf_counter()
            checkpoint.save_checkpoint(f"{root}/{name}_{i}", 1, model, opt, {})
            dist.barrier()
            times.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in Path(f"{root}/{name}_0").rglob("*") if f.is_file())
        out[name] = {"save_s": sorted(times)[1], "bytes": size}
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def main() -> None:
    from megatron_xopd.testing import run_distributed

    for hidden, experts, layers in ((32, 4, 2), (256, 8, 4)):
        root = f"{tempfile.gettempdir()}/bench_checkpoint_format_{hidden}"
        shutil.rmtree(root, ignore_errors=True)
        result = run_distributed(run, 2, root, hidden, experts, layers, timeout_s=600)[0]
        print(f"layers {layers}, hidden {hidden}, experts {experts}:", result, flush=True)


if __name__ == "__main__":
    main()
