"""The mini replication's prompts: disjoint splits of reasoning-gym arithmetic, spoken, plus a text-only SFT set.

    python examples/mini_replication/prepare_data.py [--out-dir runs/mini_table1/data] [--seed 0]

Spoken splits (espeak-ng, a voice and speed drawn per prompt; frozen Whisper-base features cached,
``megatron_xopd.prep.paired_features``):

* ``test``   (100): ``basic_arithmetic``, two operands 0-10, ``+`` or ``-``; held out, read only by the final table;
* ``val``    (32):  the same kind; the learning-rate grid is decided on it (never on ``test``);
* ``train``  (64):  the same kind; the data of every compared method (one epoch = 8 steps of 8 prompts);
* ``align``  (160): operands 0-100; the adapter's speech alignment only (it reads ``align`` + ``train``:
  ``alignment_features.jsonl.gz``);
* ``forget`` (40):  another generator, reasoning-gym ``products`` (``a * b``, operands 0-10), asked and spoken the
  same way; no stage trains on it: the forgetting check (the paper's Table 3 in miniature).

Text-only (no speech, ``data.speech_input=none``):

* ``llm_sft`` (1200): ``basic_arithmetic`` with operands 0-100, disjoint from every split above; the supervised
  fine-tuning of the text teacher and of the student's LLM (``llm_sft_text.jsonl.gz``).

Every cut carries ``answer`` (scored: the last number of a response) and ``response``, the reference response in
the model's own most common form ``"a op b = N"`` that ``xopd.responses=reference`` trains on. No prompt appears
in two splits. Reruns reuse the spoken and encoded files that exist.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_xopd.prep.paired_features import ESPEAK_MISSING, prepare_feature_splits
from megatron_xopd.prep.reasoning_gym_prompts import arithmetic_prompts

DEFAULT_OUT_DIR = Path(__file__).resolve().parents[2] / "runs" / "mini_table1" / "data"
OPERATORS = ("+", "-")
SPOKEN = ("test", "val", "train", "align", "forget")


@dataclass
class Sizes:
    """Prompts per split (the study's plan sets them; a test shrinks them)."""

    test: int = 100
    val: int = 32
    train: int = 64
    align: int = 160
    forget: int = 40
    llm_sft: int = 1200


def study_prompts(seed: int, sizes: Sizes = Sizes()) -> dict[str, list[dict]]:
    """The disjoint prompt splits, each record with its reference ``response``."""
    test = arithmetic_prompts(sizes.test, seed, operators=OPERATORS)
    train = arithmetic_prompts(sizes.train, seed + 1, operators=OPERATORS, exclude={r["prompt"] for r in test})
    used = {r["prompt"] for r in test + train}
    align = arithmetic_prompts(sizes.align, seed + 2, max_digits=2, operators=OPERATORS, exclude=used)
    val = arithmetic_prompts(sizes.val, seed + 3, operators=OPERATORS, exclude=used | {r["prompt"] for r in align})
    used |= {r["prompt"] for r in align + val}
    llm_sft = arithmetic_prompts(sizes.llm_sft, seed + 4, max_digits=2, operators=OPERATORS, exclude=used)
    forget = arithmetic_prompts(sizes.forget, seed + 5, task="products")
    splits = {"test": test, "val": val, "train": train, "align": align, "forget": forget, "llm_sft": llm_sft}
    for records in splits.values():
        for r in records:
            r["response"] = f"{r['metadata']['expression']} = {r['answer']}"
    return splits


def _write_atomic(cuts, out: Path) -> Path:
    tmp = out.with_name(f".tmp-{out.name}")
    cuts.to_file(tmp)
    tmp.replace(out)
    return out


def with_responses(manifest: Path, records: list[dict]) -> Path:
    """Add each record's reference ``response`` to its cut (the features manifest is rewritten in place)."""
    from lhotse import CutSet

    response = {r["id"]: r["response"] for r in records}

    def add(cut):
        cut.custom["response"] = response[cut.id]
        return cut

    return _write_atomic(CutSet.from_cuts(add(c) for c in CutSet.from_file(manifest)), manifest)


def text_manifest(records: list[dict], out: Path) -> Path:
    """Text-only prompt cuts (no recording, no features) for ``data.speech_input=none``."""
    from lhotse import CutSet, MonoCut

    cuts = [MonoCut(id=r["id"], start=0.0, duration=1.0, channel=0,
                    custom={"text_prompt": r["prompt"], "answer": r["answer"], "response": r["response"]})
            for r in records]
    out.parent.mkdir(parents=True, exist_ok=True)
    return _write_atomic(CutSet.from_cuts(cuts), out)


def combine(manifests: list[Path], out: Path) -> Path:
    """One manifest holding the cuts of ``manifests`` (written atomically)."""
    from lhotse import CutSet

    return _write_atomic(CutSet.from_cuts(cut for path in manifests for cut in CutSet.from_file(path)), out)


def prepare(out_dir: Path, seed: int = 0, sizes: Sizes = Sizes(), *, threads: int = 2,
            progress: bool = False) -> dict[str, Path]:
    """Write every split under ``out_dir``; returns ``{name: manifest}``."""
    splits = study_prompts(seed, sizes)
    spoken = {name: splits[name] for name in SPOKEN}
    manifests = prepare_feature_splits(spoken, out_dir, seed=seed, num_threads=threads, progress=progress)
    for name, path in manifests.items():
        with_responses(path, splits[name])
    manifests["alignment"] = combine([manifests["align"], manifests["train"]], out_dir / "alignment_features.jsonl.gz")
    manifests["llm_sft"] = text_manifest(splits["llm_sft"], out_dir / "llm_sft_text.jsonl.gz")
    return manifests


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
        manifests = prepare(args.out_dir, args.seed, threads=args.threads, progress=not args.no_progress)
    except RuntimeError as err:
        if str(err) == ESPEAK_MISSING:
            sys.exit(f"error: {err}")
        raise
    for split, path in manifests.items():
        print(f"{split}: {path}")
    print(f"sizes: {asdict(Sizes())}; done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
