#!/usr/bin/env bash
# Wheels for an offline (air-gapped) GPU install: megatron_xopd itself plus every package it imports that a CUDA
# image with torch and triton lacks (scripts/wheelhouse.txt), for one Python version, manylinux x86_64.
#   bash scripts/wheelhouse.sh OUT_DIR [--python 3.12]
#   bash scripts/setup.sh --wheelhouse OUT_DIR           # on the cluster, no network
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/wheelhouse.sh OUT_DIR [--python X.Y]}
shift
PY=$(python -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY=$2; shift 2 ;;
    *) echo "wheelhouse.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
PLATFORMS=""
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux1; do PLATFORMS="$PLATFORMS --platform ${p}_x86_64"; done
# Binary wheels, none of their requirements (the list is the closure); a package published only as an sdist is
# built here into a wheel, which must be pure Python (py3-none-any) to be valid for another interpreter.
for req in $(grep -v '^\s*#' scripts/wheelhouse.txt | grep .); do
  if ! python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PY" \
       --implementation cp $PLATFORMS --platform any -d "$OUT" "$req" 2>/dev/null; then
    python -m pip wheel -q --disable-pip-version-check --no-deps -w "$OUT" "$req"
    name=$(echo "$req" | sed 's/[=<>].*//; s/[-.]/_/g')
    if ls "$OUT" | grep -i "^${name}-" | grep -qv 'py3-none-any\|py2.py3-none-any'; then
      echo "wheelhouse.sh: $req has no wheel for Python $PY and is not pure Python" >&2; exit 1
    fi
  fi
done
python -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$OUT" .
echo "wheelhouse: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sm "$OUT" | cut -f1) MiB in $OUT (Python $PY)"
