# Detectron2 as this project installs it, sourced by tools/setup.sh and tools/gpu_wheels.sh.
#
# Detectron2 is not on PyPI under its own name. `sal-detectron2` 0.7.2 is upstream Detectron2 at
# commit a59f056 packaged as a pure-Python wheel tagged cp310; `fetch_detectron2_wheel PIP DEST`
# downloads it with PIP (e.g. ".venv/bin/python -m pip"), checks its sha256, retags it
# py3-none-any (so pip accepts it on any Python 3) and prints the path of the wheel in DEST.
D2_VERSION=0.7.2
D2_SHA256=491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561

fetch_detectron2_wheel() {
  local pip=$1 dest=$2 tmp src whl
  whl="$dest/sal_detectron2-$D2_VERSION-py3-none-any.whl"
  if [ ! -f "$whl" ]; then
    tmp=$(mktemp -d)
    $pip download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$tmp" \
      "sal-detectron2==$D2_VERSION" >&2
    src=$(ls "$tmp"/sal_detectron2-"$D2_VERSION"-*.whl)
    echo "$D2_SHA256  $src" | sha256sum -c --quiet - >&2 || {
      echo "ERROR: sha256 of $src does not match $D2_SHA256" >&2; rm -rf "$tmp"; return 1; }
    mkdir -p "$dest"
    mv "$src" "$whl"
    rm -rf "$tmp"
  fi
  echo "$whl"
}
