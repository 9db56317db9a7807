"""Compare a converted megatron-core checkpoint with the Hugging Face model it came from.

    python tools/compare_logits.py --hf HF_DIR --mcore MCORE_DIR [--prompt TEXT] [--json]
    torchrun --nproc-per-node 2 tools/compare_logits.py --hf HF_DIR --mcore MCORE_DIR --ep 2 --json

Runs both models on the same prompt (tokenised by the checkpoint's tokenizer; without ``--prompt``, a fixed
sequence of 12 ids) and prints one JSON line: ``max_abs_diff`` and ``mean_abs_diff`` of the logits over the
prompt, and ``greedy_equal`` (whether 16 greedy tokens agree), with both token lists. Dense and MoE GPTs, at
any ``--tp/--pp/--ep`` (the checkpoint reshards on load). Exit status 1 when greedy tokens differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_xopd.convert.cli import add_parallel_args, main_guard, model_parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", type=Path, required=True, help="the Hugging Face model directory")
    parser.add_argument("--mcore", type=Path, required=True, help="the converted dist_checkpointing directory")
    parser.add_argument("--prompt", help="text to run (needs a tokenizer in --mcore or --hf)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    add_parallel_args(parser)
    args = parser.parse_args()
    equal = True

    def run() -> None:
        nonlocal equal
        from megatron_xopd.convert.checkpoint import build_gpt_from_mcore, load_model_config
        from megatron_xopd.convert.compare import compare, hf_model, mcore_logits, prompt_ids
        from megatron_xopd.runtime import set_seed

        cfg = load_model_config(args.mcore)
        cfg.validate_parallel(args.tp, args.pp, args.ep)
        tokenizer_dir = args.mcore if (args.mcore / "tokenizer_config.json").is_file() else args.hf
        prompt = prompt_ids(tokenizer_dir, args.prompt, cfg.text_vocab_size)
        hf = hf_model(args.hf)
        with model_parallel(args.tp, args.pp, args.ep) as rank:
            set_seed(0)
            model, cfg = build_gpt_from_mcore(args.mcore)
            result = compare(lambda ids: hf(ids).logits[..., : cfg.vocab_size],
                             lambda ids: mcore_logits(model, ids, cfg.vocab_size), prompt)
            equal = result.greedy_equal
            if rank == 0:
                if not args.json:
                    print(f"{args.hf} vs {args.mcore} (TP={args.tp} PP={args.pp} EP={args.ep}):", file=sys.stderr)
                print(result.to_json())

    main_guard(parser, run)
    sys.exit(0 if equal else 1)


if __name__ == "__main__":
    main()
