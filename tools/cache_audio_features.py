"""Cache the Qwen3-Omni audio tower's outputs for every cut of a manifest (a perception.source=features run).

    python tools/cache_audio_features.py --student ckpt/student --cuts data/pairs/cuts.jsonl.gz --out data/pairs/tower.jsonl.gz
    torchrun --nproc-per-node 8 tools/cache_audio_features.py --student ckpt/student --cuts CUTS --out OUT --skip-bad-cuts

--student is the directory tools/convert_qwen3_omni_to_mcore.py wrote (either --perception: the frozen tower is
kept in it). Each cut gets the custom field ``encoder_features``: the tower's outputs [tokens, hidden] for the
cut's audio turned into log-mel by the HF directory's own feature extractor, as Qwen3OmniMoeProcessor does (one
row per <|audio_pad|> of the prompt, unpooled). Under torchrun each rank encodes every WORLD_SIZE-th cut (on
cuda:LOCAL_RANK when there is a GPU); rank 0 writes the manifest. Rerunning the same command, at any world size,
resumes: cuts already encoded are not encoded again. A cut without usable audio is an error naming it, or, with
--skip-bad-cuts, left out and counted. (tools/cache_encoder_features.py caches Whisper-base features for the SALM
student; its options, CTranslate2 model and pooling, do not apply to this tower.)
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, required=True, help="converted Qwen3-Omni student directory")
    parser.add_argument("--cuts", required=True, help="input CutSet manifest (.jsonl/.jsonl.gz) or Shar directory")
    parser.add_argument("--out", type=Path, required=True, help="output manifest with encoder_features")
    parser.add_argument("--storage-dir", type=Path, help="where the .npy arrays go (default: OUT's dir/tower_features)")
    parser.add_argument("--batch-size", type=int, default=8, help="cuts through the tower at once")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--skip-bad-cuts", action="store_true", help="leave out (and count) cuts without usable audio")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from megatron_xopd.prep.audio_tower_features import cache_audio_tower_features

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, barrier, device = 0, None, "cpu"
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, barrier = dist.get_rank(), dist.barrier
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        out = cache_audio_tower_features(
            args.student, args.cuts, args.out, args.storage_dir or args.out.parent / "tower_features",
            batch_size=args.batch_size, device=device, dtype=getattr(torch, args.dtype),
            on_bad_cut="skip" if args.skip_bad_cuts else "raise", progress=not args.no_progress, rank=rank,
            world_size=world, barrier=barrier)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
