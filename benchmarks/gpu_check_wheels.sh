#!/usr/bin/env bash
# Wheels that let benchmarks/gpu_check.sh run its DeepSpeed sections on a device machine, whose image has
# torch, timm, ninja, psutil, py-cpuinfo, msgpack, einops and packaging but not deepspeed (nor hjson,
# pydantic). Run here (with network), from the repository root, before the device call:
#
#   bash benchmarks/gpu_check_wheels.sh [DIR]     # DIR defaults to .whl (about 5 MiB)
#
# then pass carry [".whl"] to the device run; gpu_check.sh installs them when deepspeed is missing.
# DeepSpeed ships only a source archive: it is built here into a pure-Python wheel (DS_BUILD_OPS=0,
# needs torch, so the project's .venv). pydantic-core is compiled: fetched for the device's Python
# (PYVER, default 3.12, x86-64 manylinux).
set -eu
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
PYVER="${PYVER:-3.12}"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
DS_VERSION="$($PY -c 'import importlib.metadata as m; print(m.version("deepspeed"))' 2>/dev/null || echo 0.19.8)"
mkdir -p "$DIR"
tmp="$(mktemp -d)"
$PY -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "deepspeed==$DS_VERSION"
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$tmp"/deepspeed-*.tar.gz
rm -rf "$tmp"
ver() { $PY -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null; }
pins=()
for p in hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions; do
  v="$(ver "$p" || true)"; pins+=("$p${v:+==$v}")
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" "${pins[@]}"
if [ "$DIR" = ".whl" ] && ex="$(git rev-parse --git-path info/exclude 2>/dev/null)"; then
  mkdir -p "$(dirname "$ex")"
  grep -qx '/.whl/' "$ex" 2>/dev/null || echo '/.whl/' >> "$ex"   # never committed; travels through carry
fi
ls -la "$DIR"
du -sh "$DIR"
