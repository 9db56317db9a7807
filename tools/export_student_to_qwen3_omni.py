"""Write our Qwen3-Omni student back into the original HF directory layout.

    python tools/export_student_to_qwen3_omni.py CKPT_DIR HF_DIR OUT_DIR
    python tools/export_student_to_qwen3_omni.py TRAIN_CKPT HF_DIR OUT_DIR --meta-dir CONVERTED_DIR

HF_DIR is the directory tools/convert_qwen3_omni_to_mcore.py converted. OUT_DIR gets every file of HF_DIR, with
the thinker's LLM tensors (and the audio tower, when the student holds it) replaced by the student's, in the same
shard files: transformers loads it as it loads HF_DIR. ``--meta-dir``: the converted directory (configs) when
CKPT_DIR (e.g. a training checkpoint) holds only the dist_checkpointing files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_xopd.convert.cli import add_parallel_args, main_guard, model_parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir", type=Path)
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--meta-dir", type=Path)
    add_parallel_args(parser)
    args = parser.parse_args()

    def run() -> None:
        from megatron_xopd.convert.qwen3_omni import export_mcore_student_to_qwen3_omni, load_omni_student_configs

        load_omni_student_configs(args.meta_dir or args.ckpt_dir)[0].validate_parallel(args.tp, args.pp, args.ep)
        with model_parallel(args.tp, args.pp, args.ep) as rank:
            export_mcore_student_to_qwen3_omni(args.ckpt_dir, args.hf_dir, args.out_dir, meta_dir=args.meta_dir)
            if rank == 0:
                print(f"wrote {args.out_dir}")

    main_guard(parser, run)


if __name__ == "__main__":
    main()
