"""One single-rank training process, for the kill -9 test: ``python -m tests._kill_driver CONFIG.json WEIGHTS.safetensors``.

Trains the run of the JSON config (a :func:`tests._trainer_setup.run_config` dict), resuming from its checkpoints,
and writes the student's final weights (LLM and perception) to a safetensors file.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path


def main(config: str, weights: str) -> None:
    warnings.filterwarnings("ignore")
    from safetensors.torch import save_file

    from megatron_xopd.trainer import XOPDTrainer, to_run_config
    from tests._trainer_setup import snapshot

    trainer = XOPDTrainer(to_run_config(json.loads(Path(config).read_text())))
    trainer.train()
    flat = {f"{group}/{k}": v.contiguous() for group, tensors in snapshot(trainer).items() for k, v in tensors.items()}
    save_file(flat, weights)


if __name__ == "__main__":  # dist_checkpointing's writer may spawn processes: keep the guard
    main(*sys.argv[1:])
