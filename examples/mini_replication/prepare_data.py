"""The mini replication's paired speech/text prompts: three disjoint splits of reasoning-gym ``basic_arithmetic``.

    python examples/mini_replication/prepare_data.py [--out-dir runs/mini_replication/data] [--seed 0]

* ``test``  (100 prompts): two-term additions/subtractions of operands 0-10, held out for evaluation;
* ``train`` (96 prompts):  the same kind, the data of every compared method;
* ``align`` (160 prompts): operands 0-100, for the speech-alignment stage only.

The alignment stage reads ``alignment_features.jsonl.gz``: ``align`` and ``train`` together (so it hears the small
numbers of the task too); ``test`` stays unheard until evaluation.

No prompt appears in two splits. Each prompt is spoken with espeak-ng (a voice and speed drawn per prompt) and its
frozen Whisper-base encoder outputs are cached (``megatron_xopd.prep.paired_features``); reruns reuse what exists.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from megatron_xopd.prep.paired_features import ESPEAK_MISSING, prepare_feature_splits
from megatron_xopd.prep.reasoning_gym_prompts import arithmetic_prompts

DEFAULT_OUT_DIR = Path(__file__).resolve().parents[2] / "runs" / "mini_replication" / "data"
OPERATORS = ("+", "-")


def study_prompts(seed: int, num_test: int = 100, num_train: int = 96, num_align: int = 160) -> dict[str, list[dict]]:
    """The three disjoint prompt splits."""
    test = arithmetic_prompts(num_test, seed, operators=OPERATORS)
    train = arithmetic_prompts(num_train, seed + 1, operators=OPERATORS, exclude={r["prompt"] for r in test})
    used = {r["prompt"] for r in test + train}
    align = arithmetic_prompts(num_align, seed + 2, max_digits=2, operators=OPERATORS, exclude=used)
    return {"test": test, "train": train, "align": align}


def combine(manifests: list[Path], out: Path) -> Path:
    """One manifest holding the cuts of ``manifests`` (written atomically)."""
    from lhotse import CutSet

    cuts = CutSet.from_cuts(cut for path in manifests for cut in CutSet.from_file(path))
    tmp = out.with_name(f".tmp-{out.name}")
    cuts.to_file(tmp)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="CPU threads for the Whisper encoder")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifests = prepare_feature_splits(study_prompts(args.seed), args.out_dir, seed=args.seed,
                                           num_threads=args.threads, progress=not args.no_progress)
    except RuntimeError as err:
        if str(err) == ESPEAK_MISSING:
            sys.exit(f"error: {err}")
        raise
    manifests["alignment"] = combine([manifests["align"], manifests["train"]], args.out_dir / "alignment_features.jsonl.gz")
    for split, path in manifests.items():
        print(f"{split}: {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
