"""NeMo speechlm2 SALM checkpoints (the Canary-Qwen layout) <-> our speech student.

The layout, from NeMo's ``SALM`` (``models/salm.py``) and its ``HFHubMixin`` (``parts/hf_hub.py``):

* ``config.json``: the SALM config dict (``pretrained_llm``, ``audio_locator_tag``, ``perception`` with its
  ``preprocessor``/``encoder``/``modality_adapter``/``output_dim``, optional ``lora`` (a PEFT ``LoraConfig``), ...);
* ``model.safetensors``: ``SALM.state_dict()`` in one file: ``perception.*`` (NeMo's ``AudioPerceptionModule``),
  ``embed_tokens.weight`` (SALM moves the LLM's input embedding out of the LLM) and ``llm.*``, the HF causal LM
  without its embedding (``llm.model.layers...``, ``llm.lm_head.weight`` unless tied). With LoRA the LLM is a
  PEFT model: ``llm.base_model.model.model.layers.N.self_attn.q_proj.base_layer.weight`` plus
  ``...q_proj.lora_A.default.weight`` / ``lora_B``;
* optionally ``llm_backbone/config.json`` (the LLM's HF config) and the tokenizer files at the root:
  ``SALM.from_pretrained`` then points ``pretrained_llm``/``tokenizer_path`` at them, so nothing is fetched.

Import (:func:`convert_salm_to_mcore`): the LLM goes through the HF mapping of :mod:`.hf` with LoRA merged
(``W + (B @ A) * lora_alpha / r``, as PEFT's ``merge_and_unload``); the perception weights load unchanged into
:class:`SpeechStudent`'s NeMo perception (``source="audio"``), or only ``modality_adapter``/``proj`` with
``source="features"`` (the frozen preprocessor/encoder weights are kept aside for the export).

Export (:func:`export_student_to_salm`): a SALM directory *without* LoRA (the student's LLM weights are full
weights), with ``llm_backbone/config.json`` and the tokenizer, which ``SALM.from_pretrained`` loads offline.

The student's vocabulary: SALM adds the audio-locator tag to the tokenizer but not to the embedding (it embeds
locator positions as id 0 and replaces them); our student needs the locator id inside its vocabulary
(``[text_vocab_size, vocab_size)``), so when the LLM has no spare row the student gets one more (zero) row,
dropped again on export.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.config import GPTModelConfig
from ..models.sharding import canonical_layout, iter_canonical_tensors, load_canonical_state_dict
from ..models.speech import PerceptionConfig, SpeechStudent
from ..runtime import set_seed

from .checkpoint import (
    HF_CONFIG,
    MODEL_CONFIG,
    _barrier,
    _rank,
    load_mcore_checkpoint,
    needed_canonical_keys,
    raise_together,
    save_mcore_checkpoint,
)
from .hf import (
    SAFETENSORS_DTYPES,
    CanonicalToHF,
    ConversionError,
    LazyTensors,
    SafetensorsFiles,
    StreamingSafetensorsWriter,
    check_hf_keys,
    copy_tokenizer_files,
    hf_config_to_model_config,
    hf_to_canonical,
    read_json,
)

SALM_WEIGHTS = "model.safetensors"
LLM_BACKBONE_DIR = "llm_backbone"
# Files of a converted student checkpoint besides the dist_checkpointing ones and model_config.yaml.
PERCEPTION_CONFIG = "perception_config.yaml"
STUDENT_CONFIG = "student.yaml"
SALM_CONFIG = "salm_config.json"
FROZEN_PERCEPTION = "perception_frozen.safetensors"
_LORA_TRAINABLE_PATTERN = r"^.+\.lora_.+$"  # what NeMo's maybe_install_lora appends to prevent_freeze_params
_PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass
class SALMCheckpoint:
    """A SALM directory: its config, its LLM's HF config, where its tokenizer is, and its lazily read weights."""

    path: Path
    config: dict[str, Any]
    llm_config: dict[str, Any]
    tokenizer_source: str
    weights: LazyTensors


def read_salm(path: str | Path) -> SALMCheckpoint:
    """Open a SALM directory (``config.json`` + ``model.safetensors``; ``llm_backbone/`` and tokenizer optional).

    Without ``llm_backbone/config.json`` the LLM config comes from ``pretrained_llm`` (a local directory or a
    model id already in the HF cache), as in ``SALM.__init__``.
    """
    root = Path(path)
    config = read_json(root / "config.json")
    lacking = [key for key in ("pretrained_llm", "perception", "audio_locator_tag") if key not in config]
    if lacking:
        raise ConversionError(f"{root}/config.json is not a NeMo SALM config: it lacks {lacking}")
    if not (root / SALM_WEIGHTS).is_file():
        raise FileNotFoundError(f"{root}: {SALM_WEIGHTS} is missing")
    if (root / LLM_BACKBONE_DIR / "config.json").is_file():
        llm_config = read_json(root / LLM_BACKBONE_DIR / "config.json")
    else:
        from transformers import AutoConfig

        llm_config = AutoConfig.from_pretrained(config["pretrained_llm"]).to_dict()
    if (root / "tokenizer_config.json").is_file():
        tokenizer_source = str(root)
    else:
        tokenizer_source = str(config.get("tokenizer_path") or config["pretrained_llm"])
    files = SafetensorsFiles(root)
    weights = LazyTensors({key: (lambda k=key: files.get(SALM_WEIGHTS, k)) for key in files.keys(SALM_WEIGHTS)})
    return SALMCheckpoint(root, config, llm_config, tokenizer_source, weights)


def _lora_scaling(lora: dict[str, Any], rank: int) -> float:
    for field in ("use_dora", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if lora.get(field):
            raise ConversionError(f"SALM config lora.{field} is not supported")
    if lora.get("bias", "none") != "none":
        raise ConversionError(f"SALM config lora.bias={lora['bias']!r} is not supported")
    alpha = float(lora.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if lora.get("use_rslora") else alpha / rank


def salm_split(salm: SALMCheckpoint) -> tuple[LazyTensors, dict[str, str]]:
    """(the LLM's HF-named tensors with LoRA merged, lazily; perception name -> SALM tensor name)."""
    weights = salm.weights
    llm: dict[str, str] = {}
    perception: dict[str, str] = {}
    lora: dict[str, dict[str, str]] = defaultdict(dict)
    for key in weights:
        if key == "embed_tokens.weight":
            llm["model.embed_tokens.weight"] = key
        elif key.startswith("perception."):
            perception[key[len("perception.") :]] = key
        elif key.startswith("llm."):
            name = key[len("llm.") :]
            name = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
            if ".lora_A." in name or ".lora_B." in name:
                module, rest = name.split(".lora_", 1)
                part, adapter = rest.split(".")[:2]
                if adapter != "default":
                    raise ConversionError(f"SALM tensor {key}: only the PEFT adapter 'default' is supported")
                lora[module][part] = key
            elif ".lora_" in name or ".modules_to_save." in name or ".original_module." in name:
                raise ConversionError(f"SALM tensor {key}: this kind of PEFT tensor is not supported")
            else:
                llm[name.replace(".base_layer.", ".")] = key
        else:
            raise ConversionError(f"SALM checkpoint has an unexpected tensor {key!r} (not llm.*, embed_tokens.*, perception.*)")
    if lora and not salm.config.get("lora"):
        raise ConversionError("SALM checkpoint has LoRA tensors but config.json has no 'lora' section")
    loaders = {name: (lambda k=key: weights[k]) for name, key in llm.items()}
    for module, parts in lora.items():
        target = f"{module}.weight"
        if set(parts) != {"A", "B"} or target not in llm:
            raise ConversionError(f"SALM LoRA adapter of {module} is incomplete (found {sorted(parts)}; base in checkpoint: {target in llm})")

        def merged(base=llm[target], a=parts["A"], b=parts["B"]) -> torch.Tensor:
            lora_a, lora_b = weights[a], weights[b]
            # PEFT's LoraLayer.get_delta_weight + merge, in the same order of operations.
            return weights[base] + (lora_b @ lora_a) * _lora_scaling(salm.config["lora"], lora_a.shape[0])

        loaders[target] = merged
    return LazyTensors(loaders), perception


def _base_tokenizer(source: str, tag: str):
    """The LLM tokenizer and its size without the audio-locator tag."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    size = len(tokenizer)
    if tag in tokenizer.get_vocab():
        locator = tokenizer.convert_tokens_to_ids(tag)
        if locator != size - 1:
            raise ConversionError(f"the tokenizer in {source} has {tag!r} at id {locator}, not as its last token")
        size -= 1
    return tokenizer, size


def salm_student_configs(
    salm: SALMCheckpoint, *, perception_source: str = "audio", params_dtype: str | None = None
) -> tuple[GPTModelConfig, PerceptionConfig, dict[str, Any]]:
    """(LLM config, perception config, student metadata) of the student that holds this SALM."""
    tag = salm.config["audio_locator_tag"]
    tokenizer, text_vocab = _base_tokenizer(salm.tokenizer_source, tag)
    rows = int(salm.llm_config["vocab_size"])
    locator = tokenizer.convert_tokens_to_ids(tag) if tag in tokenizer.get_vocab() else text_vocab
    if text_vocab > rows:
        raise ConversionError(f"the tokenizer has {text_vocab} tokens but the SALM LLM only {rows} embedding rows")
    llm_cfg = hf_config_to_model_config(
        salm.llm_config, params_dtype=params_dtype, text_vocab_size=text_vocab, vocab_size=max(rows, locator + 1)
    )
    nemo = {k: v for k, v in salm.config["perception"].items() if k != "target"}
    if perception_source == "audio":
        pcfg = PerceptionConfig(source="audio", nemo=nemo)
    elif perception_source == "features":
        encoder = nemo.get("encoder") or {}
        feat_out = encoder.get("feat_out", -1)
        feature_dim = feat_out if feat_out and feat_out > 0 else encoder.get("d_model")
        if feature_dim is None:
            raise ConversionError("SALM config perception.encoder.d_model is needed for perception_source='features'")
        pcfg = PerceptionConfig(source="features", feature_dim=int(feature_dim), nemo={"modality_adapter": nemo["modality_adapter"]})
    else:
        raise ConversionError(f"perception_source {perception_source!r} is not 'audio' or 'features'")
    meta = {"audio_locator": tag, "audio_locator_id": int(locator), "salm_vocab_rows": rows, "perception_source": perception_source}
    return llm_cfg, pcfg, meta


def _perception_config_dict(cfg: PerceptionConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # plain lists/dicts for YAML


def convert_salm_to_mcore(
    salm_dir: str | Path,
    out_dir: str | Path,
    *,
    perception_source: str = "audio",
    params_dtype: str | None = None,
    seed: int = 0,
) -> SpeechStudent:
    """SALM directory -> ``dist_checkpointing`` checkpoint of a :class:`SpeechStudent` (every rank calls it).

    Besides the checkpoint, rank 0 writes ``model_config.yaml`` (the LLM), ``perception_config.yaml``,
    ``student.yaml`` (audio locator, SALM vocabulary rows), ``salm_config.json``, ``llm_backbone/config.json``,
    ``hf_config.json`` and the tokenizer files; with ``perception_source="features"`` also the perception
    weights the student does not hold (``perception_frozen.safetensors``). Returns the built student.
    """
    salm = read_salm(salm_dir)
    llm_cfg, pcfg, meta = salm_student_configs(salm, perception_source=perception_source, params_dtype=params_dtype)
    llm_cfg.validate_parallel(
        parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size()
    )
    llm, perception_keys = salm_split(salm)
    check_hf_keys(llm.keys(), llm_cfg)
    set_seed(seed)
    student = SpeechStudent(llm_cfg, pcfg, meta["audio_locator_id"])
    canonical = hf_to_canonical(llm, llm_cfg, keys=needed_canonical_keys(student.language_model))
    load_canonical_state_dict(student.language_model, canonical)
    held: set[str] = set()
    if student.perception is not None:
        names = list(student.perception.state_dict())
        missing = [n for n in names if n not in perception_keys]
        if missing:
            raise ConversionError(f"SALM checkpoint lacks perception tensor(s) {missing[:5]}")
        student.perception.load_state_dict({n: salm.weights[perception_keys[n]] for n in names}, strict=True)
        held = set(names)
        if perception_source == "audio" and set(perception_keys) - held:
            raise ConversionError(f"SALM perception tensors unknown to NeMo's perception module: {sorted(set(perception_keys) - held)[:5]}")
    save_mcore_checkpoint(student, out_dir)
    if _rank() == 0:
        out = Path(out_dir)
        llm_cfg.save(out / MODEL_CONFIG)
        (out / PERCEPTION_CONFIG).write_text(yaml.safe_dump(_perception_config_dict(pcfg)))
        (out / STUDENT_CONFIG).write_text(yaml.safe_dump(meta))
        (out / SALM_CONFIG).write_text(json.dumps(salm.config, indent=2) + "\n")
        (out / LLM_BACKBONE_DIR).mkdir(exist_ok=True)
        for path in (out / LLM_BACKBONE_DIR / "config.json", out / HF_CONFIG):
            path.write_text(json.dumps(salm.llm_config, indent=2) + "\n")
        tokenizer, _ = _base_tokenizer(salm.tokenizer_source, meta["audio_locator"])
        tokenizer.save_pretrained(str(out))
        if perception_source == "features":
            # Rank 0 holds the first stage, hence the perception: keep what the student does not hold.
            frozen = {f"perception.{n}": salm.weights[k].contiguous() for n, k in perception_keys.items() if n not in held}
            save_file(frozen, str(out / FROZEN_PERCEPTION), metadata={"format": "pt"})
    _barrier()
    return student


def load_student_configs(ckpt_dir: str | Path) -> tuple[GPTModelConfig, PerceptionConfig, dict[str, Any]]:
    ckpt = Path(ckpt_dir)
    llm_cfg = GPTModelConfig.load(ckpt / MODEL_CONFIG)
    pcfg = PerceptionConfig(**yaml.safe_load((ckpt / PERCEPTION_CONFIG).read_text()))
    meta = yaml.safe_load((ckpt / STUDENT_CONFIG).read_text())
    return llm_cfg, pcfg, meta


def build_student_from_mcore(ckpt_dir: str | Path) -> tuple[SpeechStudent, dict[str, Any]]:
    """Build this rank's student shard from a converted checkpoint and load its weights (caller sets the seed)."""
    llm_cfg, pcfg, meta = load_student_configs(ckpt_dir)
    student = SpeechStudent(llm_cfg, pcfg, meta["audio_locator_id"])
    load_mcore_checkpoint(student, ckpt_dir)
    return student, meta


def export_student_to_salm(student: SpeechStudent, student_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``student`` as a SALM directory that ``SALM.from_pretrained`` loads (every rank calls it).

    ``student_dir`` is the checkpoint :func:`convert_salm_to_mcore` wrote (SALM config, LLM config, tokenizer,
    frozen perception weights). LoRA is not re-created: the LLM weights are written as full weights and the
    ``lora`` section is dropped from the config.
    """
    src, out = Path(student_dir), Path(out_dir)
    llm_cfg = student.llm_cfg
    meta = yaml.safe_load((src / STUDENT_CONFIG).read_text())
    rows = meta["salm_vocab_rows"]
    layout = canonical_layout(student.language_model, llm_cfg.vocab_size)
    to_hf = CanonicalToHF(llm_cfg)
    to_hf.check(entry.name for entry in layout)

    def salm_name(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        if name == "model.embed_tokens.weight":
            return "embed_tokens.weight", tensor[:rows]
        return f"llm.{name}", tensor[:rows] if name == "lm_head.weight" else tensor

    writer = None
    frozen = src / FROZEN_PERCEPTION
    raise_together(RuntimeError("export_student_to_salm: global rank 0 must hold the first pipeline stage")
                   if _rank() == 0 and student.perception is None else None)
    if _rank() == 0:
        planned = []
        for entry in layout:
            for name, shape, dtype in to_hf.plan(entry.name, entry.shape, entry.dtype):
                meta_name, meta_tensor = salm_name(name, torch.empty(shape, dtype=dtype, device="meta"))
                planned.append((meta_name, tuple(meta_tensor.shape), dtype))
        if frozen.is_file():
            with safe_open(str(frozen), framework="pt") as handle:
                slices = {k: handle.get_slice(k) for k in handle.keys()}
                planned += [(k, tuple(v.get_shape()), SAFETENSORS_DTYPES[v.get_dtype()]) for k, v in slices.items()]
        perception = {f"perception.{n}": t for n, t in student.perception.state_dict().items()}
        planned += [(k, tuple(t.shape), t.dtype) for k, t in perception.items()]
        config = read_json(src / SALM_CONFIG)
        config.pop("lora", None)
        if "prevent_freeze_params" in config:
            config["prevent_freeze_params"] = [p for p in config["prevent_freeze_params"] if p != _LORA_TRAINABLE_PATTERN]
        config.setdefault("model_type", "nemo_speechlm")  # as NeMo's HFHubMixin.save_pretrained
        config.setdefault("architectures", ["NeMoSpeechLMForConditionalGeneration"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        writer = StreamingSafetensorsWriter(out, planned, max_shard_bytes=1 << 62)  # one file, as SALM reads it
    # streamed: each LLM tensor reaches rank 0 alone, one at a time (no rank holds the whole model)
    for entry, tensor in iter_canonical_tensors(student.language_model, layout):
        if writer is not None:
            for name, part in to_hf(entry.name, tensor):
                writer.write(*salm_name(name, part))
        del tensor
    if writer is not None:
        if frozen.is_file():
            with safe_open(str(frozen), framework="pt") as handle:
                for key in handle.keys():
                    writer.write(key, handle.get_tensor(key))
        for key, tensor in perception.items():
            writer.write(key, tensor)
        writer.close()
        (out / LLM_BACKBONE_DIR).mkdir(exist_ok=True)
        (out / LLM_BACKBONE_DIR / "config.json").write_text((src / LLM_BACKBONE_DIR / "config.json").read_text())
        copy_tokenizer_files(src, out, generation_config=False)
    _barrier()
    return out


def export_mcore_student_to_salm(
    ckpt_dir: str | Path, out_dir: str | Path, *, meta_dir: str | Path | None = None, seed: int = 0
) -> Path:
    """Converted (or trained) student checkpoint -> SALM directory, under the current TP/PP layout.

    ``meta_dir``: the directory :func:`convert_salm_to_mcore` wrote, when ``ckpt_dir`` (e.g. a training
    checkpoint) holds only the ``dist_checkpointing`` files; defaults to ``ckpt_dir``.
    """
    meta_dir = ckpt_dir if meta_dir is None else meta_dir
    set_seed(seed)
    llm_cfg, pcfg, meta = load_student_configs(meta_dir)
    student = SpeechStudent(llm_cfg, pcfg, meta["audio_locator_id"])
    load_mcore_checkpoint(student, ckpt_dir)
    return export_student_to_salm(student, meta_dir, out_dir)
