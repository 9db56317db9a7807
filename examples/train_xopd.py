"""X-OPD training entry point (Hydra), run under torchrun or srun.

    torchrun --nproc-per-node 2 examples/train_xopd.py --config-name quickstart
    torchrun --nproc-per-node 8 examples/train_xopd.py --config-name paper_qwen3_omni xopd.lam=1.0
"""

from __future__ import annotations

import logging
import warnings

# megatron-core notes, once per import, that apex/Transformer Engine are absent; the CPU path does not need them.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")
warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS.*")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from megatron_xopd.trainer import XOPDTrainer, register_schema, to_run_config  # noqa: E402

register_schema()


@hydra.main(config_path="conf", config_name="quickstart", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lists every parameter of every bucket
    XOPDTrainer(to_run_config(cfg)).train()


if __name__ == "__main__":  # dist_checkpointing's writer spawns processes: keep the guard
    main()
