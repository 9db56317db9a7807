"""Convert a Hugging Face Llama / Qwen2 / Qwen3 (or Qwen2-MoE / Qwen3-MoE) causal LM into a megatron-core
dist_checkpointing checkpoint.

    python tools/convert_hf_to_mcore.py HF_DIR OUT_DIR
    torchrun --nproc-per-node 4 tools/convert_hf_to_mcore.py HF_DIR OUT_DIR --tp 2 --pp 2
    torchrun --nproc-per-node 2 tools/convert_hf_to_mcore.py MOE_DIR OUT_DIR --ep 2

Each rank builds its TP/PP shard and reads only its HF tensors; the checkpoint reshards at load time
(``megatron_xopd.convert.checkpoint.load_mcore_checkpoint``). OUT_DIR also gets model_config.yaml,
hf_config.json and the tokenizer files.
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
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: the checkpoint's dtype")
    args = parser.parse_args()

    def run() -> None:
        from megatron_xopd.convert.checkpoint import convert_hf_to_mcore, prepare_hf_conversion

        # fail before any process group
        prepare_hf_conversion(args.hf_dir, args.tp, args.pp, args.ep, params_dtype=args.dtype)
        with model_parallel(args.tp, args.pp, args.ep) as rank:
            cfg = convert_hf_to_mcore(args.hf_dir, args.out_dir, params_dtype=args.dtype)
            if rank == 0:
                experts = f", {cfg.num_moe_experts} experts" if cfg.num_moe_experts else ""
                print(f"wrote {args.out_dir} ({cfg.family}, {cfg.num_layers} layers{experts}, "
                      f"TP={args.tp} PP={args.pp} EP={args.ep})")

    main_guard(parser, run)


if __name__ == "__main__":
    main()
