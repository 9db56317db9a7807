"""NeMo speech data configs, verbatim, as X-OPD prompt cuts.

``data.train`` / ``data.validation`` may be what NeMo's speechlm2 recipes give their lhotse dataloader: a mapping
with ``input_cfg`` (a weighted blend, nested groups, or a path to such a YAML list), or with ``manifest_filepath``
(a NeMo JSON manifest; with ``tarred_audio_filepaths``, a tarred one). It is read by NeMo's own
``read_cutset_from_config``; this module only sets two defaults and maps NeMo's entries to prompt pairs:

* ``shard_seed`` defaults to the run's seed (NeMo's default, ``"trng"``, would give every data-parallel rank a
  different stream; our sampler deals one common stream out to the ranks, and a resumed run replays it);
* ``force_finite`` defaults to true for validation data (NeMo's training streams repeat forever);
* an ASR-style entry (audio + transcript) is already a pair: S = the audio, T = the transcript (its supervision);
* a conversation (``type: multimodal_conversation``, lhotse ``NeMoMultimodalConversation``) gives S from the first
  user audio turn and T from its text: the audio's transcript when NeMo's reader attaches one, else the text turns
  of the same user message (the user turns around the audio); the next assistant text turn, if any, is kept as the
  reference answer.

Bad entries. Lines that would stop NeMo's reader itself (not JSON, no ``audio_filepath``/``duration``, a missing
local audio file) are found before reading, in non-tarred NeMo manifests: with ``on_bad_cut="raise"`` the first
one raises :class:`BadManifestEntry` naming manifest, line and field; with ``"skip"`` the manifest is read from a
copy in which each such line is a placeholder that the dataset skips and counts like any bad cut. Entries that
read but cannot be used (no audio turn, empty transcript, corrupt audio) become :class:`~.cuts.BadCutError` in
the dataset, whose message :func:`located` completes with the manifest and line the entry came from.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from lhotse import CutSet, MonoCut
from lhotse.serialization import open_best

from .cuts import BAD_ENTRY_FIELD, BadCutError

logger = logging.getLogger(__name__)

ORIGIN_TAG = "xopd_manifest"  # custom field: the manifest_filepath a (non-tarred) NeMo entry was read from
CONVERSATION_ID = "conversation_id"
_NEMO_KEYS = ("input_cfg", "manifest_filepath")
_CONVERSATION_TYPES = ("multimodal_conversation", "share_gpt")


class BadManifestEntry(ValueError):
    """A manifest line that NeMo's reader cannot read."""

    def __init__(self, manifest: str, line: int, field: str, reason: str) -> None:
        super().__init__(f"manifest {manifest}, line {line}, field {field!r}: {reason}")
        self.manifest, self.line, self.field, self.reason = manifest, line, field, reason


def is_nemo_config(cfg: Any) -> bool:
    """Whether a ``data.train``/``data.validation`` value is a NeMo dataloader config (``input_cfg`` or
    ``manifest_filepath``); plain paths and ``cuts_path``/``shar_path`` mappings are read by ``load_prompt_cuts``."""
    return isinstance(cfg, Mapping) and any(cfg.get(key) is not None for key in _NEMO_KEYS)


def read_nemo_cuts(cfg: Mapping[str, Any], *, seed: int = 0, finite: bool = False,
                   on_bad_cut: str = "skip") -> CutSet:
    """Prompt cuts of a NeMo dataloader config, read by NeMo's ``read_cutset_from_config`` (see the module)."""
    from nemo.collections.common.data.lhotse.cutset import read_cutset_from_config
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(OmegaConf.create(dict(cfg)), resolve=True)
    plain = copy.deepcopy(plain)
    plain.setdefault("shard_seed", seed)
    if finite:
        plain.setdefault("force_finite", True)
    tags = None
    if plain.get("input_cfg") is not None:
        plain["input_cfg"] = _prepare_items(plain["input_cfg"], on_bad_cut, tarred=False)
    else:  # NeMo applies ``tags`` to input_cfg items only: the origin tag of a top-level manifest is ours to add
        updates = _prepare_leaf(plain, on_bad_cut, tarred=plain.get("tarred_audio_filepaths") is not None)
        tags = updates.pop("tags", None)
        plain.update(updates)
    cuts, _ = read_cutset_from_config(plain)
    if tags:
        from nemo.collections.common.data.lhotse.cutset import attach_tags

        cuts = cuts.map(partial(attach_tags, tags=tags), apply_fn=None)
    return cuts.map(to_prompt_cut, apply_fn=None)


def _prepare_items(items: Any, on_bad_cut: str, *, tarred: bool) -> list[dict[str, Any]]:
    """``input_cfg`` items with origin tags and checked (or filtered) non-tarred manifests."""
    if isinstance(items, (str, Path)):  # a YAML file holding the list, as NeMo accepts
        from lhotse.serialization import load_yaml

        items = load_yaml(items)
    out = []
    for item in items:
        item = dict(item)
        if item.get("type") == "group":
            item["input_cfg"] = _prepare_items(item["input_cfg"], on_bad_cut, tarred=tarred)
        else:
            item.update(_prepare_leaf(item, on_bad_cut, tarred=item.get("type") == "nemo_tarred"
                                      or item.get("tarred_audio_filepaths") is not None))
        out.append(item)
    return out


def _prepare_leaf(item: dict[str, Any], on_bad_cut: str, *, tarred: bool) -> dict[str, Any]:
    """Keys to update a leaf source with: its origin tag and, for a plain NeMo manifest, a checked path."""
    manifest = item.get("manifest_filepath")
    if manifest is None:
        return {}
    updates: dict[str, Any] = {}
    kind = item.get("type", "nemo")
    if not tarred and kind == "nemo" and isinstance(manifest, (str, Path)):
        updates["manifest_filepath"] = _checked_manifest(str(manifest), on_bad_cut)
    tags = dict(item.get("tags") or {})
    tags.setdefault(ORIGIN_TAG, manifest if isinstance(manifest, str) else json.dumps(manifest))
    updates["tags"] = tags
    return updates


# ------------------------------------------------------------------------------------------- manifest checks


def _manifest_paths(manifest: str) -> list[str]:
    from nemo.collections.common.data.lhotse.nemo_adapters import expand_sharded_filepaths

    return [str(p) for p in expand_sharded_filepaths(manifest)]


def _lines(path: str) -> Iterator[tuple[int, str]]:
    with open_best(path, "r") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line


def _entry_problem(line: str, manifest: str) -> tuple[str, str, dict | None]:
    """(field, reason, entry) of a line NeMo's reader would stop at; field '' when the line is readable."""
    from nemo.collections.common.parts.preprocessing.manifest import get_full_path

    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        return "line", f"not JSON ({err.msg})", None
    if not isinstance(entry, dict):
        return "line", f"not a JSON object ({type(entry).__name__})", None
    for key in ("audio_filepath", "duration"):
        if key not in entry:
            return key, "missing", entry
    audio = get_full_path(str(entry["audio_filepath"]), manifest_file=manifest, force_cache=False)
    if "://" not in str(audio) and not Path(audio).is_file():
        return "audio_filepath", f"audio file missing: {audio}", entry
    entry["audio_filepath"] = str(audio)
    return "", "", entry


def _checked_manifest(manifest: str, on_bad_cut: str) -> str:
    """``manifest`` itself when every line is readable. Else raise (``on_bad_cut="raise"``) or return a copy (every
    shard, in a temporary directory, audio paths made absolute) in which each bad line is a placeholder entry that
    NeMo reads without touching audio and the dataset rejects, counted as ``data/skipped_<field>``."""
    paths = _manifest_paths(manifest)
    bad = False
    for path in paths:
        for number, line in _lines(path):
            field, reason, _ = _entry_problem(line, path)
            if field and on_bad_cut == "raise":
                raise BadManifestEntry(path, number, field, reason)
            bad = bad or bool(field)
    if not bad:
        return manifest
    if len({str(Path(p).parent) for p in paths}) > 1:
        raise BadManifestEntry(manifest, 0, "manifest_filepath", "has bad lines and shards in several directories; "
                               "fix the lines or set data.on_bad_cut=raise to list them")
    out_dir = Path(tempfile.mkdtemp(prefix="xopd_nemo_"))
    for path in paths:
        with (out_dir / Path(path).name).open("w") as f:
            for number, line in _lines(path):
                field, reason, entry = _entry_problem(line, path)
                if field:
                    logger.warning("bad manifest entry (skipped when drawn): manifest %s, line %d, field %r: %s",
                                   path, number, field, reason)
                    origin = f"manifest {path}, line {number}"
                    entry = {"audio_filepath": str(Path(path).resolve().parent / f"bad-line-{number}"), "duration": 0.0,
                             "sampling_rate": 16000, BAD_ENTRY_FIELD: {"field": field, "reason": reason, "origin": origin}}
                f.write(json.dumps(entry) + "\n")
    return str(out_dir / Path(manifest).name)


# ------------------------------------------------------------------------------------------- entries -> pairs


def to_prompt_cut(item: Any) -> Any:
    """A NeMo entry as a prompt cut (see the module); one that cannot be a pair is marked for the dataset to
    reject (``custom[BAD_ENTRY_FIELD]``), since raising here would stop the whole stream."""
    from nemo.collections.common.data.lhotse.text_adapters import AudioTurn, NeMoMultimodalConversation, TextTurn

    if isinstance(item, NeMoMultimodalConversation):
        custom = {**(item.custom or {}), CONVERSATION_ID: item.id}
        turns = item.turns
        for i, turn in enumerate(turns):
            if isinstance(turn, AudioTurn) and turn.role == "user":
                text = turn.text  # the audio's transcript, when NeMo's reader gives one (tarred, lhotse_as_conversation)
                if not text:  # else the text of the same user message (the user turns around the audio)
                    start, end = i, i + 1
                    while start > 0 and turns[start - 1].role == "user":
                        start -= 1
                    while end < len(turns) and turns[end].role == "user":
                        end += 1
                    text = " ".join(t.value for t in turns[start:end] if isinstance(t, TextTurn))
                if not text or not str(text).strip():
                    return _marked(item.id, f"conversations[{i}]", "the user audio turn has no text", custom)
                cut = turn.cut
                later = [t.value for t in turns[i + 1:] if isinstance(t, TextTurn) and t.role == "assistant"]
                cut.custom = {**(cut.custom or {}), **custom, "text_prompt": str(text),
                              **({"answer": later[0]} if later else {})}
                return cut
        return _marked(item.id, "conversations", "no user audio turn", custom)
    if isinstance(item, MonoCut):
        return item
    return _marked(getattr(item, "id", "?"), "type", f"{type(item).__name__} is not an audio entry",
                   dict(getattr(item, "custom", None) or {}))


def _marked(entry_id: str, field: str, reason: str, custom: dict[str, Any]) -> MonoCut:
    return MonoCut(id=str(entry_id), start=0.0, duration=0.0, channel=0,
                   custom={**custom, BAD_ENTRY_FIELD: {"field": field, "reason": reason}})


# ------------------------------------------------------------------------------------------- where from


def entry_origin(cut: Any) -> str | None:
    """``"manifest M, line N"`` for a cut read from a NeMo manifest, tarred manifest, conversation or Shar shard;
    ``None`` when it carries no origin. Reads the manifest, so call it for bad entries only."""
    custom = getattr(cut, "custom", None) or {}
    if "shard_origin" in custom:  # Lhotse Shar: the cut's line in its cuts shard
        return _find(str(custom["shard_origin"]), lambda e: e.get("id") == cut.id)
    manifest = custom.get("manifest_origin") or custom.get(ORIGIN_TAG)
    if manifest is None:
        return None
    manifest = str(manifest)
    paths = [p[0] if isinstance(p, list) else p for p in json.loads(manifest)] if manifest.startswith("[") else [manifest]
    if CONVERSATION_ID in custom:
        match = lambda e: e.get("id") == custom[CONVERSATION_ID]  # noqa: E731
    else:
        audio = _audio_key(cut)
        match = lambda e: audio is not None and _audio_key_of(e) == audio  # noqa: E731
    for pattern in paths:
        for path in _manifest_paths(pattern):
            found = _find(path, match)
            if found:
                return found + (f" (tar {custom['tar_origin']})" if "tar_origin" in custom else "")
    return f"manifest {manifest}"


def _audio_key(cut: Any) -> tuple[str, float] | None:
    if not getattr(cut, "has_recording", False):
        return None
    source = cut.recording.sources[0]
    name = source.source if source.type in ("file", "url") else cut.recording.id
    return Path(str(name)).name, round(float(cut.start), 3)


def _audio_key_of(entry: dict) -> tuple[str, float] | None:
    if "audio_filepath" not in entry:
        return None
    return Path(str(entry["audio_filepath"])).name, round(float(entry.get("offset") or 0.0), 3)


def _find(path: str, match: Any) -> str | None:
    try:
        for number, line in _lines(path):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and match(entry):
                return f"manifest {path}, line {number}"
    except OSError:
        return None
    return None


def located(error: BadCutError, cut: Any) -> BadCutError:
    """``error`` with the manifest and line of its entry in the message, when the cut carries its origin."""
    if error.origin is not None:
        return error
    origin = entry_origin(cut)
    return error if origin is None else BadCutError(error.cut_id, error.field, error.reason, origin=origin)
