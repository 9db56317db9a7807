"""Export a megatron-core dist_checkpointing checkpoint of our GPT model to a Hugging Face directory.

    python tools/export_mcore_to_hf.py CKPT_DIR OUT_DIR
    python tools/export_mcore_to_hf.py TRAIN_CKPT OUT_DIR --meta-dir CONVERTED_DIR
    torchrun --nproc-per-node 2 tools/export_mcore_to_hf.py CKPT_DIR OUT_DIR --tp 2
    torchrun --nproc-per-node 2 tools/export_mcore_to_hf.py MOE_CKPT OUT_DIR --ep 2

The checkpoint loads under any TP/PP/EP (it reshards); OUT_DIR gets config.json, model.safetensors (or shards
and an index), the tokenizer files and generation_config.json: ``AutoModelForCausalLM.from_pretrained`` loads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_xopd.convert.cli import add_parallel_args, main_guard, model_parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--meta-dir", type=Path, help="directory with model_config.yaml, hf_config.json, tokenizer")
    add_parallel_args(parser)
    args = parser.parse_args()

    def run() -> None:
        from megatron_xopd.convert.checkpoint import MODEL_CONFIG, export_mcore_to_hf, load_model_config

        meta = args.meta_dir or args.ckpt_dir
        load_model_config(meta).validate_parallel(args.tp, args.pp, args.ep)
        if not (args.ckpt_dir / "metadata.json").is_file():
            raise FileNotFoundError(f"{args.ckpt_dir} is not a dist_checkpointing checkpoint (no metadata.json)")
        with model_parallel(args.tp, args.pp, args.ep) as rank:
            export_mcore_to_hf(args.ckpt_dir, args.out_dir, meta_dir=meta)
            if rank == 0:
                print(f"wrote {args.out_dir} (from {args.ckpt_dir}, {meta / MODEL_CONFIG})")

    main_guard(parser, run)


if __name__ == "__main__":
    main()
