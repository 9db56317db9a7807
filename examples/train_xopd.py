"""X-OPD training entry point (Hydra), run under torchrun or srun.

    torchrun --nproc-per-node 2 examples/train_xopd.py --config-name quickstart
    torchrun --nproc-per-node 8 examples/train_xopd.py --config-name paper_qwen3_omni xopd.lam=1.0
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from megatron_xopd.trainer import XOPDTrainer, register_schema, to_run_config

register_schema()


@hydra.main(config_path="conf", config_name="quickstart", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    XOPDTrainer(to_run_config(cfg)).train()


if __name__ == "__main__":  # dist_checkpointing's writer spawns processes: keep the guard
    main()
