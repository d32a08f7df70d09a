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
D2_VERSION=0.7.2
D2_SHA256=491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561

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
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.10 \
    -d "$tmp" "sal-detectron2==$D2_VERSION"
  whl=$(ls "$tmp"/sal_detectron2-"$D2_VERSION"-*.whl)
  echo "$D2_SHA256  $whl" | sha256sum -c --quiet - || {
    echo "[setup] ERROR: sha256 of $whl does not match $D2_SHA256" >&2; exit 1; }
  # The wheel is tagged cp310 but is pure Python: retag it so pip accepts it on 3.11.
  mv "$whl" "$tmp/sal_detectron2-$D2_VERSION-py3-none-any.whl"
  $PIP install -q --no-deps "$tmp/sal_detectron2-$D2_VERSION-py3-none-any.whl"
  rm -rf "$tmp"
fi

echo "[setup] hiera_det (editable, dev extra) and Detectron2's runtime requirements"
$PIP install -q -e ".[dev]"
$PY -c "import torch, torchvision, detectron2, hiera_det; from torchvision.ops import nms; \
print('[setup] ok: torch', torch.__version__, 'torchvision', torchvision.__version__, \
'detectron2', detectron2.__version__, 'cuda', torch.cuda.is_available())"
