"""Third-party start-up notes go to the debug log, not the console, in the trainer and every tool.

Why: NeMo's import builds nv_one_logger's callback, which warns "OneLogger: Setting error_handling_strategy ..." and
"No exporters were provided ..." on every rank, and megatron-core's import warns that Apex / Transformer Engine are
absent: notes about the libraries' set-up, not about the run, repeated once per process. They are re-logged at
DEBUG on the ``megatron_xopd.startup`` logger (seen with that logger at DEBUG, e.g. Hydra's
``hydra.verbose=megatron_xopd.startup``). Every other warning, ours and the libraries' others, shows as before.

Installed once by ``megatron_xopd/__init__.py``, which every entry point imports before megatron-core or NeMo.
"""

from __future__ import annotations

import logging
import re
import warnings

LOG = logging.getLogger("megatron_xopd.startup")

# loggers whose every record is a start-up note (nv_one_logger's own: its telemetry is off in this package)
NOTE_LOGGERS = ("nv_one_logger",)
# Python warnings that are start-up notes of megatron-core (module prefix, message pattern)
NOTE_WARNINGS = (
    ("megatron.core", re.compile(r"(Apex|Transformer Engine).*not installed")),
    ("megatron.core", re.compile(r"CUDA_DEVICE_MAX_CONNECTIONS")),
)


class _ToDebugLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        LOG.debug("%s: %s", record.name, record.getMessage())


def _is_note(message: Warning | str, filename: str) -> bool:
    text = str(message)
    module = filename.replace("/", ".").replace("\\", ".")
    return any(prefix in module and pattern.search(text) for prefix, pattern in NOTE_WARNINGS)


def install() -> None:
    """Route the notes above to the debug log (idempotent)."""
    for name in NOTE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _ToDebugLog) for h in logger.handlers):
            logger.addHandler(_ToDebugLog())
        logger.propagate = False
    show = warnings.showwarning
    if getattr(show, "_routes_notes", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _is_note(message, filename):
            LOG.debug("%s:%s: %s: %s", filename, lineno, category.__name__, message)
        else:
            show(message, category, filename, lineno, file, line)

    showwarning._routes_notes = True
    warnings.showwarning = showwarning
