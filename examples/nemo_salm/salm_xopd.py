"""SALM in, X-OPD, SALM out: one command from a NeMo speechlm2 SALM checkpoint to a distilled one.

    torchrun --nproc-per-node 8 examples/nemo_salm/salm_xopd.py --salm canary-qwen-2.5b --teacher Qwen/Qwen3-8B \\
        --out runs/nemo_salm data.train.manifest_filepath=train_manifest.json trainer.parallel.tensor_model_parallel_size=2

1. converts the SALM (``SALM.save_pretrained``'s layout, LoRA merged) into our speech student, once, in
   ``<out>/student_init`` (``tools/convert_salm_to_mcore.py``);
2. trains it with X-OPD: the SALM's LLM as the student's LLM, its perception as the student's (on waveforms,
   frozen by default), ``--teacher`` (an HF text LLM with the SALM LLM's tokenizer) as teacher; the data is a
   NeMo dataloader config (``data.train``: a NeMo manifest, tarred manifest, Shar or ``input_cfg`` blend);
   run directory ``<out>/<logging.name>/`` as NeMo's exp_manager lays it out (hparams.yaml, checkpoints/,
   TensorBoard; resumes when run again);
3. writes the trained student as a SALM directory, ``<run dir>/salm``, which ``SALM.from_pretrained`` loads.

Other arguments are dotted overrides of ``salm_xopd.yaml`` (the run config's schema: megatron_xopd/trainer/config.py).
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")

from omegaconf import OmegaConf  # noqa: E402

HERE = Path(__file__).resolve().parent
log = logging.getLogger("megatron_xopd.nemo_salm")


def salm_overrides(converted: Path, teacher: str) -> dict[str, Any]:
    """The config that points the run at the converted SALM (student) and the text LLM (teacher)."""
    import yaml

    from megatron_xopd.convert.checkpoint import load_model_config
    from megatron_xopd.convert.salm import PERCEPTION_CONFIG, STUDENT_CONFIG

    meta = yaml.safe_load((converted / STUDENT_CONFIG).read_text())
    if meta["perception_source"] != "audio":
        raise ValueError(f"{converted}: converted with perception_source={meta['perception_source']!r}; this recipe "
                         "trains on waveforms through the SALM's whole perception ('audio')")
    teacher_tokenizer = teacher if (Path(teacher) / "tokenizer_config.json").is_file() else None
    return {
        "model": {
            "tokenizer": str(converted),
            "teacher_tokenizer": teacher_tokenizer,
            "audio_locator": meta["audio_locator"],
            "student": {"llm": load_model_config(converted).to_dict(),
                        "perception": yaml.safe_load((converted / PERCEPTION_CONFIG).read_text())},
            "teacher": {"hf_path": teacher},
        },
        "checkpoint": {"init_from": str(converted)},
    }


def run(salm: str | Path, teacher: str, out: str | Path, overrides: list[str] = (),
        config: str | Path = HERE / "salm_xopd.yaml") -> tuple[Any, Path]:
    """Convert (once), train, export; every rank calls it. Returns the trainer and the exported SALM directory."""
    from megatron_xopd.convert.salm import convert_salm_to_mcore, export_student_to_salm
    from megatron_xopd.runtime import init_distributed, initialize_model_parallel
    from megatron_xopd.trainer import XOPDTrainer, to_run_config

    out = Path(out)
    user = OmegaConf.merge(OmegaConf.load(config), OmegaConf.from_dotlist(list(overrides)))
    converted = out / "student_init"
    init_distributed()
    if not (converted / "metadata.json").is_file():
        initialize_model_parallel(to_run_config({**OmegaConf.to_container(user), "data": {"train": "-"}}).trainer.parallel)
        convert_salm_to_mcore(salm, converted, perception_source="audio")
    salm_cfg = OmegaConf.create(salm_overrides(converted, teacher))
    # The SALM's perception config under the user's fields (freezing); the rest of the user's config wins.
    user_perception = OmegaConf.select(user, "model.student.perception", default={}) or {}
    merged = OmegaConf.merge(salm_cfg, {"logging": {"exp_dir": str(out)}}, user)
    merged.model.student.perception = OmegaConf.merge(salm_cfg.model.student.perception, user_perception)
    trainer = XOPDTrainer(to_run_config(merged))
    trainer.train()
    export_dir = Path(trainer.cfg.logging.dir) / "salm"
    export_student_to_salm(trainer.student, converted, export_dir)
    log.info("wrote %s (SALM.from_pretrained loads it)", export_dir)
    return trainer, export_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--salm", required=True, help="a SALM directory (config.json + model.safetensors)")
    parser.add_argument("--teacher", required=True, help="an HF text LLM directory with the SALM LLM's tokenizer")
    parser.add_argument("--out", required=True, help="the experiment directory (NeMo's exp_dir)")
    parser.add_argument("--config", default=str(HERE / "salm_xopd.yaml"))
    args, overrides = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    run(args.salm, args.teacher, args.out, overrides, args.config)


if __name__ == "__main__":  # dist_checkpointing's writer spawns processes: keep the guard
    main()
