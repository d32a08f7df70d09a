#!/usr/bin/env bash
# Download, on a machine with network, the wheels that tools/gpu_check.py installs on a GPU machine
# without network, e.g. a cluster node (Python 3.12, x86-64, PyTorch/torchvision/timm/numpy/scipy/
# matplotlib/opencv already there). They land in .gpu_wheels/ (git-ignored); copy them along with
# the repository:
#
#   bash tools/gpu_wheels.sh            # ~15 MB; re-running it re-downloads nothing present
#
# Versions are the ones the project's CPU set-up (tools/setup.sh) installs and tests with.
# gpu_check.py installs a wheel only where its distribution is missing on the GPU machine, so the
# insurance wheels (pytest, tensorboard, PyYAML, tqdm, ...) cost nothing where the image has them.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=${DEST:-.gpu_wheels}
source tools/detectron2_wheel.sh  # D2_VERSION, D2_SHA256, fetch_detectron2_wheel
mkdir -p "$DEST"
PIP="$PY -m pip --disable-pip-version-check"

# Pure Python: `pip wheel` builds the few that PyPI ships only as sources (fvcore, antlr4).
PURE=(
  fvcore==0.1.5.post20221221 iopath==0.1.9 omegaconf==2.3.1 hydra-core==1.3.8
  antlr4-python3-runtime==4.9.3 yacs==0.1.8 termcolor==3.3.0 tabulate==0.10.0
  cloudpickle==3.1.3 portalocker==4.4.2 hiera-transformer==0.1.4
  # insurance: needed by train_net.py's writers / the test run, maybe already on the image
  tqdm==4.70.1 tensorboard==2.21.0 absl-py==2.5.1
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 packaging==26.4
  # Detectron2's model_zoo imports pkg_resources, gone from setuptools 81
  setuptools==80.10.2
)
# Compiled: the CPython 3.12 manylinux builds.
COMPILED=(pycocotools==2.0.11 shapely==2.2.0 PyYAML==6.0.4 protobuf==7.36.2 pysimdjson==7.0.2)

$PIP wheel -q --no-deps -w "$DEST" "${PURE[@]}"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST" "${COMPILED[@]}"

# Detectron2: the sal-detectron2 wheel, sha256-checked and retagged py3-none-any.
fetch_detectron2_wheel "$PIP" "$DEST" > /dev/null
ls "$DEST"
du -sh "$DEST"
