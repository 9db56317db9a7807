"""Compare a converted megatron-core checkpoint with the Hugging Face model it came from.

    python tools/compare_logits.py --hf HF_DIR --mcore MCORE_DIR [--prompt TEXT] [--json]
    torchrun --nproc-per-node 2 tools/compare_logits.py --hf HF_DIR --mcore MCORE_DIR --ep 2 --json
    torchrun --nproc-per-node 2 tools/compare_logits.py --hf QWEN3_OMNI_DIR --mcore ckpt/student --audio prompt.wav --ep 2

Runs both models on the same prompt (tokenised by the checkpoint's tokenizer; without ``--prompt``, a fixed
sequence of 12 ids) and prints one JSON line: ``max_abs_diff`` and ``mean_abs_diff`` of the logits over the
prompt, and ``greedy_equal`` (whether 16 greedy tokens agree), with both token lists. Dense and MoE GPTs, at
any ``--tp/--pp/--ep`` (the checkpoint reshards on load). Exit status 1 when greedy tokens differ.

A Qwen3-Omni student (MCORE_DIR written by tools/convert_qwen3_omni_to_mcore.py, or a training checkpoint with
``--meta-dir`` that directory) is compared with transformers' thinker: with ``--audio WAV`` the prompt is the
processor's audio layout (``<|audio_start|>``, one ``<|audio_pad|>`` per tower output, ``<|audio_end|>``) then the
prompt's ids; transformers gets the HF directory's log-mel features, the student the waveform (its frozen tower,
from the converted directory, makes its own).
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
    parser.add_argument("--audio", type=Path, help="a WAV file: the spoken part of a Qwen3-Omni student's prompt")
    parser.add_argument("--meta-dir", type=Path, help="the converted Qwen3-Omni directory when --mcore is a "
                                                      "training checkpoint")
    add_parallel_args(parser)
    args = parser.parse_args()
    equal = True

    def run() -> None:
        nonlocal equal
        from megatron_xopd.convert.checkpoint import build_gpt_from_mcore, load_model_config
        from megatron_xopd.convert.compare import compare, hf_model, mcore_logits, prompt_ids
        from megatron_xopd.convert.qwen3_omni import is_omni_student_dir
        from megatron_xopd.runtime import set_seed

        meta_dir = args.meta_dir or args.mcore
        if is_omni_student_dir(meta_dir):
            run_omni(meta_dir)
            return
        if args.audio is not None:
            parser.error(f"--audio needs a Qwen3-Omni student: {meta_dir} has no student.yaml (give --meta-dir?)")
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

    def run_omni(meta_dir: Path) -> None:
        nonlocal equal
        from megatron_xopd.convert.compare import compare_omni, prompt_ids
        from megatron_xopd.convert.qwen3_omni import build_omni_student_from_mcore, load_omni_student_configs
        from megatron_xopd.runtime import set_seed

        source = "audio" if args.audio is not None else "features"
        cfg = load_omni_student_configs(meta_dir, source)[0]
        cfg.validate_parallel(args.tp, args.pp, args.ep)
        if args.audio is not None and not args.audio.is_file():
            raise FileNotFoundError(f"--audio {args.audio}: no such file")
        tokenizer_dir = meta_dir if (meta_dir / "tokenizer_config.json").is_file() else args.hf
        text = prompt_ids(tokenizer_dir, args.prompt, cfg.text_vocab_size)
        with model_parallel(args.tp, args.pp, args.ep) as rank:
            set_seed(0)
            student, meta = build_omni_student_from_mcore(args.mcore, meta_dir, perception_source=source)
            result = compare_omni(args.hf, student, meta, args.audio, text)
            equal = result.greedy_equal
            if rank == 0:
                if not args.json:
                    print(f"{args.hf} vs {args.mcore} (TP={args.tp} PP={args.pp} EP={args.ep}, audio={args.audio}):",
                          file=sys.stderr)
                print(result.to_json())

    main_guard(parser, run)
    sys.exit(0 if equal else 1)


if __name__ == "__main__":
    main()
