"""CTC warm start of the speech student's adapter and projection (``megatron_xopd.prep.ctc_warmstart``).

    python tools/warmstart_adapter_ctc.py --cuts data/alignment_features.jsonl.gz \\
        --config examples/conf/mini_replication.yaml --out runs/ctc/perception.safetensors

Reads the perception, tokenizer and student LLM of a run config (``model.student.perception``, ``model.tokenizer``,
``model.student.hf_path``), trains the perception on the cuts' cached encoder features against their text prompts,
and writes its weights (NeMo names) for ``model.student.perception_weights``. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", required=True, help="lhotse manifest of prompt cuts with encoder_features")
    parser.add_argument("--config", required=True, type=Path, help="run config YAML (its model section is read)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from megatron_xopd.convert.hf import HFCheckpoint
    from megatron_xopd.data.cuts import load_encoder_features, load_prompt_cuts, text_prompt
    from megatron_xopd.data.tokenizer import load_tokenizer
    from megatron_xopd.models.speech import FeaturePerception, PerceptionConfig
    from megatron_xopd.convert.sources import resolve_path
    from megatron_xopd.prep.ctc_warmstart import CTCWarmStartConfig, ctc_warmstart

    start = time.perf_counter()
    model = OmegaConf.to_container(OmegaConf.load(args.config).model, resolve=True)
    student = model["student"]
    if not student.get("hf_path"):
        raise SystemExit(f"{args.config}: model.student.hf_path is required (the LLM whose embeddings are the targets)")
    perception_cfg = PerceptionConfig(**student["perception"])
    if perception_cfg.source != "features":
        raise SystemExit(f"{args.config}: model.student.perception.source must be 'features' (cached encoder outputs)")
    tokenizer = load_tokenizer(str(resolve_path(model["tokenizer"])), audio_locator=model.get("audio_locator"))
    examples = []
    for cut in load_prompt_cuts(args.cuts):
        features = torch.from_numpy(np.asarray(load_encoder_features(cut), dtype=np.float32))
        examples.append((features, tokenizer.encode(text_prompt(cut), add_special_tokens=False)))
    if not examples:
        raise SystemExit(f"{args.cuts}: no cuts")
    embeddings = HFCheckpoint(resolve_path(student["hf_path"]))["model.embed_tokens.weight"].float()
    torch.manual_seed(perception_cfg.init_seed)
    perception = FeaturePerception(perception_cfg, embeddings.shape[1])
    cfg = CTCWarmStartConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    result = ctc_warmstart(perception, embeddings, examples, cfg, progress=not args.no_progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".tmp-{args.out.name}")
    save_file({k: v.detach().contiguous() for k, v in perception.state_dict().items()}, str(tmp))
    os.replace(tmp, args.out)
    print(json.dumps({**result, "examples": len(examples), "out": str(args.out),
                      "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
