"""Build the quickstart's small paired speech/text prompt set (CPU-sized).

    python examples/quickstart/prepare_data.py [--out-dir runs/quickstart/data] [--num-train 32] [--num-val 16]

OUT_DIR defaults to runs/quickstart/data (git-ignored).

Text prompts T are two-term additions of small numbers (0-10 by default) from reasoning-gym's ``basic_arithmetic``
("What is 5 + 3? Answer with only the number.", answer "8"), small enough that SmolLM2-135M-Instruct gets
some right. Each is spoken with espeak-ng (``megatron_xopd.prep.synthesis``; a voice and speed drawn per prompt,
no ASR filter by default) and its frozen Whisper-base encoder outputs are cached (pool 4: 12.5 Hz, 512-dim;
``megatron_xopd.prep.encoder_features``). Layout, per split (``train``, ``validation``)::

    OUT_DIR/<split>_features.jsonl.gz   the cuts with ``encoder_features`` (and audio): what the quickstart uses
    OUT_DIR/<split>/prompts.jsonl       the text prompts, answers and reasoning-gym metadata
    OUT_DIR/<split>/wavs/               16 kHz speech prompts
    OUT_DIR/<split>/cuts_audio.jsonl.gz the synthesised cuts (no features)
    OUT_DIR/<split>/features/           cached encoder outputs (.npy)

Validation and training prompts are distinct (``megatron_xopd.prep.paired_features`` writes them). Rerunning
reuses what exists (prompt ids are derived from the prompt text, so a changed prompt is never served a stale
WAV or feature file); a different ``--seed`` needs a fresh OUT_DIR.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from megatron_xopd.prep.paired_features import ESPEAK_MISSING, prepare_feature_splits
from megatron_xopd.prep.reasoning_gym_prompts import arithmetic_prompts

DEFAULT_OUT_DIR = Path(__file__).resolve().parents[2] / "runs" / "quickstart" / "data"  # runs/ is git-ignored


def prepare_quickstart_data(
    out_dir: str | Path = DEFAULT_OUT_DIR,
    num_train: int = 32,
    num_val: int = 16,
    seed: int = 0,
    *,
    max_digits: int = 1,
    **options: Any,
) -> dict[str, Path]:
    """Synthesise and encode the quickstart prompts; returns ``{"train": manifest, "validation": manifest}``.

    ``options`` go to :func:`~megatron_xopd.prep.paired_features.prepare_feature_splits` (``max_wer``, ``pool``,
    ``compute_type``, ``num_threads``, ``encoder``, ``progress``).
    """
    validation = arithmetic_prompts(num_val, seed, max_digits=max_digits)
    train = arithmetic_prompts(num_train, seed + 1, max_digits=max_digits, exclude={r["prompt"] for r in validation})
    return prepare_feature_splits({"train": train, "validation": validation}, out_dir, seed=seed, **options)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--num-train", type=int, default=32)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-digits", type=int, default=1, help="digits per operand (1: operands 0-10, 121 distinct prompts)")
    parser.add_argument("--max-wer", type=float, help="drop speech prompts Whisper-base mishears (WER above this)")
    parser.add_argument("--compute-type", default="float32",
                        help="Whisper encoder precision (int8: about 40%% less CPU time, features within ~4%%)")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="CPU threads for the Whisper encoder (default: the cores, at most 4; "
                             "0: CTranslate2's default, which follows OMP_NUM_THREADS)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifests = prepare_quickstart_data(args.out_dir, args.num_train, args.num_val, args.seed,
                                            max_digits=args.max_digits, max_wer=args.max_wer,
                                            compute_type=args.compute_type, num_threads=args.threads,
                                            progress=not args.no_progress)
    except RuntimeError as err:
        if str(err) == ESPEAK_MISSING:
            sys.exit(f"error: {err}")
        raise
    for split, path in manifests.items():
        print(f"{split}: {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
