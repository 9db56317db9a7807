"""Convert a NeMo speechlm2 SALM checkpoint (Canary-Qwen layout) into our speech student (megatron-core).

    python tools/convert_salm_to_mcore.py SALM_DIR OUT_DIR
    torchrun --nproc-per-node 2 tools/convert_salm_to_mcore.py SALM_DIR OUT_DIR --tp 2 --perception features

The LLM goes through the HF mapping (LoRA merged), the perception weights into NeMo's perception module.
OUT_DIR: dist_checkpointing files, model_config.yaml, perception_config.yaml, student.yaml, salm_config.json,
llm_backbone/config.json and the tokenizer (tools/export_student_to_salm.py writes it back).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_xopd.convert.cli import add_parallel_args, main_guard, model_parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("salm_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    add_parallel_args(parser)
    parser.add_argument("--perception", choices=("audio", "features"), default="audio",
                        help="audio: the whole NeMo perception; features: modality adapter + projection only")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args()

    def run() -> None:
        from megatron_xopd.convert.salm import convert_salm_to_mcore, read_salm, salm_student_configs

        llm_cfg, _, _ = salm_student_configs(read_salm(args.salm_dir), perception_source=args.perception)
        llm_cfg.validate_parallel(args.tp, args.pp)  # fail before any process group
        with model_parallel(args.tp, args.pp) as rank:
            convert_salm_to_mcore(args.salm_dir, args.out_dir, perception_source=args.perception, params_dtype=args.dtype)
            if rank == 0:
                print(f"wrote {args.out_dir} (TP={args.tp} PP={args.pp}, perception={args.perception})")

    main_guard(parser, run)


if __name__ == "__main__":
    main()
