"""Memory plan of an X-OPD recipe: bytes per GPU and phase, whether it fits, and the smallest layout that does.

    python tools/plan_memory.py --config-name quickstart
    python tools/plan_memory.py --config-name paper_qwen3_omni --gpus 64 --gpu-mem-gb 80
    python tools/plan_memory.py --config-name paper_qwen3_omni --gpus 8 trainer.parallel.expert_model_parallel_size=4
    python tools/plan_memory.py --config-name paper_qwen3_omni --gpus 64 model.teacher.preset=qwen3_235b_a22b
    python tools/plan_memory.py --count qwen3_235b_a22b        # total / active parameters of a preset
    python tools/plan_memory.py --audio-tower                  # Qwen3-Omni's audio tower, built on the meta device

The recipe is composed as ``examples/train_xopd.py`` composes it (Hydra overrides after the options). Model shapes
come from the checkpoints when they are on this machine, else from the recipe's ``model.<role>.preset``
(``examples/conf/models/``); ``--student-model``/``--teacher-model`` name a preset that wins over both. Every
line's formula: ``docs/scaling.md`` (whose plans ``--write-doc docs/scaling.md`` regenerates).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
import shlex
import sys
import warnings
from dataclasses import replace
from pathlib import Path

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "examples" / "conf"


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from megatron_xopd.trainer import register_schema, to_run_config

    register_schema()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return to_run_config(hydra_compose(config_name=config_name, overrides=overrides))


def audio_tower_params() -> int:
    """Qwen3-Omni-30B-A3B's audio encoder (transformers' config defaults, output_dim = the LLM width 2048)."""
    import torch
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

    with torch.device("meta"):
        encoder = Qwen3OmniMoeAudioEncoder(Qwen3OmniMoeAudioEncoderConfig(output_dim=2048))
    return sum(p.numel() for p in encoder.parameters())


DOC_BLOCK = re.compile(r"(<!-- plan_memory: (?P<args>[^>]*?) -->\n)(?P<body>.*?)(<!-- /plan_memory -->)", re.S)


def write_doc(path: Path) -> int:
    """Rerun every ``<!-- plan_memory: ARGS -->`` block of a markdown file and put the tool's output in it, so the
    plans a doc shows are this code's output, not typed."""
    text = path.read_text()

    def run(match: re.Match) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(shlex.split(match["args"]))
        if code:
            raise SystemExit(f"{path}: plan_memory {match['args']} exited with {code}")
        command = f"python tools/plan_memory.py {match['args']}"
        return f"{match.group(1)}```text\n$ {command}\n{out.getvalue().rstrip()}\n```\n{match.group(4)}"

    new, count = DOC_BLOCK.subn(run, text)
    path.write_text(new)
    print(f"{path}: {count} plan(s) written")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", help="recipe in examples/conf (without .yaml)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="world size (default: the smallest the recipe's layout runs on)")
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU, GiB")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="fraction of the GPU left out of the plan: CUDA context, NCCL buffers, fragmentation")
    parser.add_argument("--student-model", help="preset (examples/conf/models) for model.student.llm, used even "
                                                 "when the checkpoint is here (default: model.student.preset)")
    parser.add_argument("--teacher-model", help="preset (examples/conf/models) for model.teacher.llm (default: "
                                                 "model.teacher.preset)")
    parser.add_argument("--recompute", choices=("selective", "full"), default=None,
                        help="plan with activation recompute (default: the recipe's)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    parser.add_argument("--no-suggest", action="store_true", help="skip the search for the smallest fitting layout")
    parser.add_argument("--count", metavar="PRESET", help="print a preset's total and active parameters and exit")
    parser.add_argument("--audio-tower", action="store_true", help="print Qwen3-Omni's audio-tower parameters and exit")
    parser.add_argument("--write-doc", metavar="MARKDOWN", type=Path,
                        help="rerun the plans a markdown file marks with <!-- plan_memory: ARGS --> and write them in")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
    args = parser.parse_args(argv)
    if args.write_doc:
        return write_doc(args.write_doc)

    from megatron_xopd.models import GPTModelConfig, ModelConfigError
    from megatron_xopd.models.memory import GiB, LayoutError, model_params, suggest_layout
    from megatron_xopd.trainer.memory_plan import format_plan, load_preset, plan_run

    if args.count:
        print(json.dumps(model_params(GPTModelConfig.from_dict(load_preset(args.count), where=args.count))))
        return 0
    if args.audio_tower:
        print(json.dumps({"qwen3_omni_audio_tower": audio_tower_params()}))
        return 0
    if not args.config_name:
        parser.error("--config-name is required")
    run = compose(args.config_name, args.overrides)
    par = run.trainer.parallel
    dense_grid = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
    expert_grid = ((par.expert_tensor_parallel_size or par.tensor_model_parallel_size)
                   * par.expert_model_parallel_size * par.pipeline_model_parallel_size)
    world = args.gpus or math.lcm(dense_grid, expert_grid)
    usable_gb = args.gpu_mem_gb * (1 - args.headroom)
    try:
        plan, student, teacher, work = plan_run(run, world, usable_gb, student_preset=args.student_model,
                                                teacher_preset=args.teacher_model, recompute=args.recompute)
    except (LayoutError, ModelConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    suggestions = {}
    if not args.no_suggest:  # with the recipe's recompute setting, and with full recompute
        for recompute in dict.fromkeys([work.recompute, "full"]):
            found = suggest_layout(student, teacher, replace(work, recompute=recompute), world, int(usable_gb * GiB))
            suggestions[str(recompute)] = found
    if args.json:
        out = {"recipe": args.config_name, "gpus": world, "plan": plan.to_dict(),
               "suggested": {k: v.to_dict() if v else None for k, v in suggestions.items()}}
        print(json.dumps(out))
        return 0
    print(f"recipe {args.config_name}: {work.prompts} prompts x {work.modalities} modalities x {work.n_samples} samples"
          f" = {work.rollouts} rollouts per DP rank, s = {work.prompt_tokens} + {work.new_tokens}, b = {work.micro_batch},"
          f" loss {work.loss}, offload_teacher {work.offload_teacher}")
    print(format_plan(plan))
    for recompute, found in suggestions.items():
        where = f"{world} x {args.gpu_mem_gb:.0f} GiB ({usable_gb:.0f} GiB usable), recompute={recompute}"
        if found is None:
            print(f"\nno layout fits on {where}")
        else:
            print(f"\nsmallest layout that fits on {where}: {found.layout.describe()} (peak {found.peak / GiB:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
