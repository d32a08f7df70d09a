#!/usr/bin/env bash
# One-command set-up for hiera_det on a fresh machine (CPU or GPU), Python 3.10/3.11.
#
#   bash tools/setup.sh            # creates ./.venv and installs everything
#
# What it does, in order:
#   1. creates a virtual environment in ./.venv (reused if present);
#   2. installs PyPI torch/torchvision at pinned, known-good versions;
#   3. installs Detectron2 from the `sal-detectron2` wheel (upstream Detectron2 at commit a59f056,
#      pure Python), checking its sha256, together with Detectron2's runtime requirements;
#   4. installs hiera_det itself in editable mode with its `dev` extra (pytest, ruff, the official
#      `hiera-transformer` reference used by the parity tests).
# Re-running it is cheap: every step is skipped when already satisfied.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
source tools/detectron2_wheel.sh  # D2_VERSION, D2_SHA256, fetch_detectron2_wheel

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check"
$PIP install -q --upgrade "pip>=23" wheel "setuptools<81"

echo "[setup] torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
$PIP install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

if ! $PY -c "import importlib.metadata as m, sys; sys.exit(m.version('sal-detectron2') != '')" 2>/dev/null; then
  echo "[setup] detectron2 (sal-detectron2==$D2_VERSION, sha256 checked)"
  tmp=$(mktemp -d)
  whl=$(fetch_detectron2_wheel "$PIP" "$tmp")
  $PIP install -q --no-deps "$whl"
  rm -rf "$tmp"
fi

echo "[setup] hiera_det (editable, dev extra) and Detectron2's runtime requirements"
$PIP install -q -e ".[dev]"
$PY -c "import torch, torchvision, detectron2, hiera_det; from torchvision.ops import nms; \
print('[setup] ok: torch', torch.__version__, 'torchvision', torchvision.__version__, \
'detectron2', detectron2.__version__, 'cuda', torch.cuda.is_available())"
