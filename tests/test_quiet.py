"""Third-party start-up notes go to the debug log (megatron_xopd/quiet.py); every other warning still shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging, sys, warnings
import megatron_xopd
import megatron.core.models.backends  # warns at import that Apex is absent
logging.getLogger("nv_one_logger.api.config").warning("OneLogger: Setting error_handling_strategy ...")
warnings.warn("our own warning")
logging.getLogger("megatron_xopd.test").warning("our own log warning")
print("--- debug log on ---", file=sys.stderr, flush=True)
logging.basicConfig(level=logging.DEBUG)
logging.getLogger("nv_one_logger.training_telemetry").warning("No exporters were provided.")
"""


def test_start_up_notes_leave_the_console_and_our_warnings_stay():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    console, debug = result.stderr.split("--- debug log on ---")
    assert "OneLogger" not in console and "Apex is not installed" not in console
    assert "our own warning" in console and "our own log warning" in console
    # with the debug log on, the note is there, named by its logger
    assert "megatron_xopd.startup" in debug and "nv_one_logger.training_telemetry: No exporters" in debug
