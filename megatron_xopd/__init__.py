"""Cross-modal on-policy distillation (X-OPD) on megatron-core."""

from . import quiet as _quiet

_quiet.install()  # third-party start-up notes to the debug log (megatron_xopd/quiet.py)
