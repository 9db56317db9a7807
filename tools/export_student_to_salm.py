"""Export our speech student (a megatron-core dist_checkpointing checkpoint) to a NeMo SALM directory.

    python tools/export_student_to_salm.py CKPT_DIR OUT_DIR
    python tools/export_student_to_salm.py TRAIN_CKPT OUT_DIR --meta-dir CONVERTED_DIR

``--meta-dir``: the directory tools/convert_salm_to_mcore.py wrote (configs, tokenizer, frozen perception
weights), when CKPT_DIR holds only the dist_checkpointing files. ``SALM.from_pretrained(OUT_DIR)`` loads the
result offline (LLM config in llm_backbone/, tokenizer at the root; LoRA merged into the weights).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_xopd.convert.cli import add_parallel_args, main_guard, model_parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--meta-dir", type=Path)
    add_parallel_args(parser)
    args = parser.parse_args()

    def run() -> None:
        from megatron_xopd.convert.salm import export_mcore_student_to_salm, load_student_configs

        meta = args.meta_dir or args.ckpt_dir
        load_student_configs(meta)[0].validate_parallel(args.tp, args.pp)
        with model_parallel(args.tp, args.pp) as rank:
            export_mcore_student_to_salm(args.ckpt_dir, args.out_dir, meta_dir=meta)
            if rank == 0:
                print(f"wrote {args.out_dir}")

    main_guard(parser, run)


if __name__ == "__main__":
    main()
