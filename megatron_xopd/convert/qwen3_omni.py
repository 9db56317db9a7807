"""Qwen3-Omni HF directories <-> our :class:`~megatron_xopd.models.qwen3_omni.Qwen3OmniStudent`.

Two HF layouts hold a thinker: the full ``Qwen3OmniMoeForConditionalGeneration`` (Qwen's published
checkpoints: ``config.json`` with ``thinker_config``, tensors ``thinker.*``, ``talker.*``, ``code2wav.*``) and
a ``Qwen3OmniMoeThinkerForConditionalGeneration`` alone (tensors without the ``thinker.`` prefix). Below the
prefix both name the LLM exactly as ``Qwen3MoeForCausalLM`` does (``model.layers.N...``, ``lm_head.weight``;
one tensor per expert on disk), so the LLM goes through the Qwen3-MoE mapping of :mod:`.hf`; ``audio_tower.*``
loads into transformers' audio tower unchanged; ``visual.*`` is not converted (logged).

Export writes the original directory back with the thinker's LLM (and audio tower) tensors replaced by the
student's and every other tensor and file copied unchanged, in the same shard files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml
from megatron.core import dist_checkpointing, parallel_state
from safetensors.torch import load_file, save_file

from ..models.config import GPTModelConfig
from ..models.qwen3_omni import OmniPerceptionConfig, Qwen3OmniAudioPerception, Qwen3OmniStudent
from ..models.sharding import canonical_layout, iter_canonical_tensors, load_canonical_state_dict
from ..runtime import set_seed

from .checkpoint import (MODEL_CONFIG, _barrier, _rank, _tokenizer_size, load_mcore_checkpoint, needed_canonical_keys,
                         raise_together, save_mcore_checkpoint)
from .hf import (
    SAFETENSORS_INDEX,
    CanonicalToHF,
    ConversionError,
    HFCheckpoint,
    LazyTensors,
    SafetensorsPatcher,
    check_hf_expert_count,
    check_hf_keys,
    copy_tokenizer_files,
    hf_config_to_model_config,
    hf_to_canonical,
    read_json,
    read_safetensors_header,
)

log = logging.getLogger(__name__)

ARCHITECTURES = ("Qwen3OmniMoeForConditionalGeneration", "Qwen3OmniMoeThinkerForConditionalGeneration")
PERCEPTION_CONFIG = "perception_config.yaml"
STUDENT_CONFIG = "student.yaml"
PERCEPTION_WEIGHTS = "perception.safetensors"
OMNI_CONFIG = "omni_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
_LLM_PREFIXES = ("model.", "lm_head.")


@dataclasses.dataclass
class OmniCheckpoint:
    """An HF directory holding a Qwen3-Omni thinker: its config, the thinker's config and tensor prefix."""

    reader: HFCheckpoint
    thinker_config: dict[str, Any]
    prefix: str  # "thinker." in the full model, "" for a thinker saved alone

    @property
    def path(self) -> Path:
        return self.reader.path

    def llm_tensors(self) -> LazyTensors:
        """The LLM's tensors under ``Qwen3MoeForCausalLM`` names, read lazily."""
        names = [k[len(self.prefix):] for k in self.reader if k.startswith(self.prefix)]
        return LazyTensors({n: (lambda k=self.prefix + n: self.reader[k]) for n in names if n.startswith(_LLM_PREFIXES)})

    def tower_tensors(self) -> dict[str, str]:
        """audio-tower parameter name -> tensor name."""
        head = f"{self.prefix}audio_tower."
        return {k[len(head):]: k for k in self.reader if k.startswith(head)}


def read_omni(hf_dir: str | Path) -> OmniCheckpoint:
    reader = HFCheckpoint(hf_dir)
    archs = list(reader.config.get("architectures") or [])
    if not set(archs) & set(ARCHITECTURES):
        raise ConversionError(f"{reader.path}/config.json architectures={archs}: not a Qwen3-Omni model "
                              f"(expected one of {list(ARCHITECTURES)})")
    if "thinker_config" in reader.config:
        return OmniCheckpoint(reader, reader.config["thinker_config"], "thinker.")
    return OmniCheckpoint(reader, reader.config, "")


def text_config_as_qwen3_moe(thinker: dict[str, Any]) -> dict[str, Any]:
    """The thinker's ``text_config`` as a ``Qwen3MoeForCausalLM`` config dict (same layers; mRoPE is 1D RoPE on
    audio+text prompts, see :mod:`megatron_xopd.models.qwen3_omni`)."""
    text = dict(thinker["text_config"])
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    for key in ("mrope_section", "mrope_interleaved", "interleaved"):
        rope.pop(key, None)
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope["rope_type"] = "default"
    text.pop("rope_scaling", None)
    text["rope_parameters"] = {**rope, "rope_theta": rope.get("rope_theta", text.get("rope_theta", 1e6))}
    text.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                tie_word_embeddings=bool(thinker.get("tie_word_embeddings", text.get("tie_word_embeddings", False))))
    return text


def omni_student_configs(
    omni: OmniCheckpoint, *, perception_source: str = "audio", params_dtype: str | None = None
) -> tuple[GPTModelConfig, OmniPerceptionConfig, dict[str, Any]]:
    """(LLM config, perception config, student metadata) of the student that holds this thinker.

    The audio tokens (``audio_start_token_id``, ``audio_token_id``) and every id after them are not text:
    ``text_vocab_size`` is the smallest of those and the tokenizer's size, so no loss or sampler emits them, and
    it equals the Qwen3 text teacher's vocabulary when the Omni tokenizer adds its audio tokens after Qwen3's.
    """
    thinker = omni.thinker_config
    audio_token = int(thinker["audio_token_id"])
    audio_start = int(thinker.get("audio_start_token_id", audio_token))
    text = text_config_as_qwen3_moe(thinker)
    tokens = _tokenizer_size(omni.path) or int(text["vocab_size"])
    llm_cfg = hf_config_to_model_config(text, params_dtype=params_dtype, text_vocab_size=min(tokens, audio_start, audio_token))
    if not llm_cfg.num_moe_experts:
        raise ConversionError(f"{omni.path}/config.json text_config.num_experts: the thinker's LLM must be an MoE")
    audio = {k: v for k, v in thinker["audio_config"].items() if k not in ("model_type", "architectures")}
    # the tower's config and feature extractor are kept with either source: tools/cache_audio_features.py and a
    # run with model.student.perception.source=audio build the tower from them
    pcfg = OmniPerceptionConfig(source=perception_source, audio_config=audio,
                                feature_extractor=read_json(omni.path / PREPROCESSOR_CONFIG)
                                if (omni.path / PREPROCESSOR_CONFIG).is_file() else {})
    meta = {"audio_token_id": audio_token, "prefix": omni.prefix, "perception_source": perception_source,
            "n_window": int(audio.get("n_window", 50))}
    if thinker.get("vision_config") is not None:
        log.warning("Qwen3-Omni: the vision tower (visual.*) is not part of the speech student; it is dropped "
                    "here and copied back unchanged on export")
    return llm_cfg, pcfg, meta


def prepare_omni_conversion(hf_dir: str | Path, tp: int = 1, pp: int = 1, ep: int = 1, *,
                            perception_source: str = "audio", params_dtype: str | None = None):
    """Check the directory before any process group exists: architecture, LLM tensors, expert count, layout."""
    omni = read_omni(hf_dir)
    llm_cfg, pcfg, meta = omni_student_configs(omni, perception_source=perception_source, params_dtype=params_dtype)
    llm = omni.llm_tensors()
    check_hf_expert_count(llm.keys(), text_config_as_qwen3_moe(omni.thinker_config))
    check_hf_keys(llm.keys(), llm_cfg)
    llm_cfg.validate_parallel(tp, pp, ep)
    return omni, llm_cfg, pcfg, meta


def _config_dict(cfg: OmniPerceptionConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def convert_qwen3_omni_to_mcore(
    hf_dir: str | Path, out_dir: str | Path, *, perception_source: str = "audio", params_dtype: str | None = None,
    seed: int = 0,
) -> Qwen3OmniStudent:
    """HF Qwen3-Omni directory -> ``dist_checkpointing`` checkpoint of the student (every rank calls it, under
    the current TP/PP/EP layout). Rank 0 also writes ``model_config.yaml``, ``perception_config.yaml``,
    ``student.yaml``, ``omni_config.json`` (the source ``config.json``), the tokenizer files and
    ``perception.safetensors`` (the frozen tower; empty with ``perception_source="features"``). The
    dist_checkpointing files hold the LLM alone, as a checkpoint of ``tools/convert_hf_to_mcore.py`` does."""
    omni, llm_cfg, pcfg, meta = prepare_omni_conversion(
        hf_dir, parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_expert_model_parallel_world_size(),
        perception_source=perception_source, params_dtype=params_dtype)
    set_seed(seed)  # megatron's RNG tracker must exist to build; the weights are overwritten
    student = Qwen3OmniStudent(llm_cfg, pcfg, meta["audio_token_id"])
    canonical = hf_to_canonical(omni.llm_tensors(), llm_cfg, keys=needed_canonical_keys(student.language_model))
    load_canonical_state_dict(student.language_model, canonical)
    names = omni.tower_tensors()
    if student.perception is not None and student.perception.audio_tower is not None:
        tower = student.perception.audio_tower
        missing = sorted(set(tower.state_dict()) - set(names))
        if missing:
            raise ConversionError(f"{omni.path}: the audio tower lacks tensor(s) {missing[:5]}")
        tower.load_state_dict({n: omni.reader[names[n]] for n in tower.state_dict()}, strict=True)
    # The LLM alone in dist_checkpointing (what the trainer's model.student.mcore_path loads); the frozen tower
    # beside it as safetensors, with either perception source (the cache tool and source=audio runs read it).
    save_mcore_checkpoint(student.language_model, out_dir)
    if _rank() == 0:
        out = Path(out_dir)
        if student.perception is not None and student.perception.audio_tower is not None:
            perception = student.perception.state_dict()
        else:
            perception = {f"audio_tower.{n}": omni.reader[k] for n, k in names.items()}
        save_file({k: v.contiguous() for k, v in perception.items()}, str(out / PERCEPTION_WEIGHTS),
                  metadata={"format": "pt"})
        llm_cfg.save(out / MODEL_CONFIG)
        (out / PERCEPTION_CONFIG).write_text(yaml.safe_dump(_config_dict(pcfg)))
        (out / STUDENT_CONFIG).write_text(yaml.safe_dump(meta))
        (out / OMNI_CONFIG).write_text(json.dumps(omni.reader.config, indent=2) + "\n")
        copy_tokenizer_files(omni.path, out)
        if (omni.path / PREPROCESSOR_CONFIG).is_file():
            shutil.copyfile(omni.path / PREPROCESSOR_CONFIG, out / PREPROCESSOR_CONFIG)
    _barrier()
    return student


def is_omni_student_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory tools/convert_qwen3_omni_to_mcore.py wrote (the student knows its family)."""
    return (Path(path) / STUDENT_CONFIG).is_file() and (Path(path) / PERCEPTION_CONFIG).is_file()


def load_omni_student_configs(ckpt_dir: str | Path, perception_source: str | None = None
                              ) -> tuple[GPTModelConfig, OmniPerceptionConfig, dict[str, Any]]:
    """The converted directory's configs; ``perception_source`` (``audio``/``features``) overrides the source it
    was converted with (``audio`` needs the tower's config, which conversions since the cache tool keep)."""
    ckpt = Path(ckpt_dir)
    for name in (MODEL_CONFIG, PERCEPTION_CONFIG, STUDENT_CONFIG):
        if not (ckpt / name).is_file():
            raise FileNotFoundError(f"{ckpt / name} not found: not a directory tools/convert_qwen3_omni_to_mcore.py wrote")
    llm_cfg = GPTModelConfig.load(ckpt / MODEL_CONFIG)
    values = yaml.safe_load((ckpt / PERCEPTION_CONFIG).read_text())
    if perception_source is not None:
        if perception_source == "audio" and not values.get("audio_config"):
            raise ConversionError(f"{ckpt / PERCEPTION_CONFIG} has no audio_config (converted with --perception "
                                  f"features by an older version): convert the checkpoint again")
        values["source"] = perception_source
    pcfg = OmniPerceptionConfig(**values)
    return llm_cfg, pcfg, yaml.safe_load((ckpt / STUDENT_CONFIG).read_text())


def load_omni_perception(perception: Qwen3OmniAudioPerception | None, path: str | Path) -> None:
    """The frozen tower from ``perception.safetensors`` (nothing to load when the student takes cached outputs)."""
    if perception is None or perception.audio_tower is None:
        return
    weights = load_file(str(path))
    if not weights:
        raise ConversionError(f"{path} holds no audio tower (converted with --perception features by an older "
                              f"version): convert the checkpoint again")
    perception.load_state_dict(weights, strict=True)


def _load_llm(student: Qwen3OmniStudent, ckpt: Path) -> None:
    """The LLM from a converted checkpoint (the LLM alone) or from a trainer's step checkpoint
    (``{"model": the student's sharded state dict, "optimizer": ...}``, of which only the LLM is read)."""
    if (ckpt / MODEL_CONFIG).is_file():
        load_mcore_checkpoint(student.language_model, ckpt)
        return
    if not (ckpt / "metadata.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a megatron dist_checkpointing checkpoint (no metadata.json)")
    prefix = "language_model."
    state = dist_checkpointing.load({"model": student.language_model.sharded_state_dict(prefix=prefix)}, str(ckpt))
    student.language_model.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items()}, strict=True)


def build_omni_student_from_mcore(ckpt_dir: str | Path, meta_dir: str | Path | None = None, *,
                                  perception_source: str | None = None,
                                  **llm_overrides: Any) -> tuple[Qwen3OmniStudent, dict[str, Any]]:
    """Build this rank's student shard from a converted (or trained) checkpoint and load it (caller sets the seed).
    ``llm_overrides``: :class:`GPTModelConfig` fields that change no weight (e.g. ``moe_token_dispatcher_type``)."""
    meta_dir = Path(meta_dir or ckpt_dir)
    llm_cfg, pcfg, meta = load_omni_student_configs(meta_dir, perception_source)
    for key, value in llm_overrides.items():
        setattr(llm_cfg, key, value)
    student = Qwen3OmniStudent(llm_cfg, pcfg, meta["audio_token_id"])
    _load_llm(student, Path(ckpt_dir))
    load_omni_perception(student.perception, meta_dir / PERCEPTION_WEIGHTS)
    return student, meta


def export_student_to_qwen3_omni(student: Qwen3OmniStudent, hf_dir: str | Path, out_dir: str | Path, prefix: str) -> Path:
    """Write ``hf_dir`` again into ``out_dir`` with the thinker's LLM (and audio tower, when the student holds
    it) replaced by ``student``'s weights; every other tensor and file is copied, in the same shard files.

    Every rank calls it; rank 0 writes. The shard files are byte copies in which the student's tensors are then
    overwritten in place, each gathered to rank 0 alone as it comes (:func:`iter_canonical_tensors`): no rank holds
    more than its own shard and one full tensor. Names and shapes are checked against the original's headers on
    every rank before anything is sent."""
    src, out = Path(hf_dir), Path(out_dir)
    reader = HFCheckpoint(src)
    files = sorted(set(reader.weight_map.values()))
    shapes = {name: tuple(entry["shape"]) for f in files for name, entry in read_safetensors_header(src / f)[1].items()}
    layout = canonical_layout(student.language_model, student.llm_cfg.vocab_size)
    to_hf = CanonicalToHF(student.llm_cfg)
    to_hf.check(entry.name for entry in layout)
    planned = {prefix + n: shape for entry in layout for n, shape, _ in to_hf.plan(entry.name, entry.shape, entry.dtype)}
    unknown = sorted(set(planned) - set(reader.weight_map))
    if unknown:
        raise ConversionError(f"{src}: the student's tensors {unknown[:5]} are not in the original checkpoint")
    wrong = [f"{n} {planned[n]} vs {shapes[n]}" for n in planned if planned[n] != shapes[n]]
    if wrong:
        raise ConversionError(f"the student's shapes differ from the original's: {wrong[:5]}")
    if out.resolve() == src.resolve():
        raise FileExistsError(f"export into the source directory {src} would overwrite it; choose another OUT_DIR")
    tower = {}
    if student.perception is not None and student.perception.audio_tower is not None:
        tower = {f"{prefix}audio_tower.{n}": t for n, t in student.perception.audio_tower.state_dict().items()}
    missing = sorted(set(tower) - set(reader.weight_map))
    raise_together(ConversionError(f"{src}: the student's tensors {missing[:5]} are not in the original checkpoint")
                   if missing else None)
    patchers: dict[str, SafetensorsPatcher] = {}
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        weight_files = set(files) | {SAFETENSORS_INDEX}
        for path in src.iterdir():
            if path.name not in weight_files:
                (shutil.copytree if path.is_dir() else shutil.copyfile)(path, out / path.name)
        if (src / SAFETENSORS_INDEX).is_file():
            shutil.copyfile(src / SAFETENSORS_INDEX, out / SAFETENSORS_INDEX)
        patchers = {f: SafetensorsPatcher(src / f, out / f) for f in files}
    for entry, tensor in iter_canonical_tensors(student.language_model, layout):
        if patchers:
            for name, part in to_hf(entry.name, tensor):
                patchers[reader.weight_map[prefix + name]].write(prefix + name, part)
        del tensor
    if patchers:
        for name, t in tower.items():
            patchers[reader.weight_map[name]].write(name, t)
        for patcher in patchers.values():
            patcher.close()
    _barrier()
    return out


def export_mcore_student_to_qwen3_omni(ckpt_dir: str | Path, hf_dir: str | Path, out_dir: str | Path, *,
                                       meta_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Converted or trained student checkpoint -> Qwen3-Omni HF directory, under the current layout (any: it
    reshards). ``meta_dir``: the converted directory when ``ckpt_dir`` holds only dist_checkpointing files."""
    set_seed(seed)
    student, meta = build_omni_student_from_mcore(ckpt_dir, meta_dir)
    return export_student_to_qwen3_omni(student, hf_dir, out_dir, meta["prefix"])
