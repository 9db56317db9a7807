"""Write a copy of an HF model whose attention heads split evenly over a TP size (same function).

    python tools/pad_attention_heads.py --hf builtin:smollm2 --tp 2 --out runs/smollm2-tp2
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF model directory, or builtin:smollm2")
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel size the heads must split over")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    from megatron_xopd.convert.heads import write_padded_copy
    from megatron_xopd.convert.sources import resolve_path

    print(write_padded_copy(resolve_path(args.hf), args.out, args.tp))


if __name__ == "__main__":
    main()
