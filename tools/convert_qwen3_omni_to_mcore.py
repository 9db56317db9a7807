"""Convert a Qwen3-Omni HF directory (the full model or its thinker) into our speech student (megatron-core).

    python tools/convert_qwen3_omni_to_mcore.py HF_DIR OUT_DIR
    torchrun --nproc-per-node 4 tools/convert_qwen3_omni_to_mcore.py HF_DIR OUT_DIR --tp 2 --ep 2

The thinker's MoE LLM becomes an MCore MoE GPT, its audio tower the frozen perception (``--perception
features``: no tower, the student takes cached tower outputs); the vision tower is dropped (logged).
OUT_DIR: the LLM's dist_checkpointing files (the trainer's model.student.mcore_path), perception.safetensors
(the frozen tower: model.student.perception_weights), model_config.yaml, perception_config.yaml, student.yaml,
omni_config.json and the tokenizer. tools/export_student_to_qwen3_omni.py writes it back into the original HF layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_xopd.convert.cli import add_parallel_args, main_guard, model_parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    add_parallel_args(parser)
    parser.add_argument("--perception", choices=("audio", "features"), default="audio",
                        help="audio: the thinker's audio tower on mel features; features: cached tower outputs")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args()

    def run() -> None:
        from megatron_xopd.convert.qwen3_omni import convert_qwen3_omni_to_mcore, prepare_omni_conversion

        # fail on a bad directory or layout before any process group exists
        prepare_omni_conversion(args.hf_dir, args.tp, args.pp, args.ep, perception_source=args.perception)
        with model_parallel(args.tp, args.pp, args.ep) as rank:
            convert_qwen3_omni_to_mcore(args.hf_dir, args.out_dir, perception_source=args.perception,
                                        params_dtype=args.dtype)
            if rank == 0:
                print(f"wrote {args.out_dir} (TP={args.tp} PP={args.pp} EP={args.ep}, perception={args.perception})")

    main_guard(parser, run)


if __name__ == "__main__":
    main()
