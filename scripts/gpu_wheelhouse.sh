#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh needs on a GPU machine that reaches no package registry,
# on a machine that does (PyPI) and has the CUDA toolkit's headers (nvcc's include/):
#
#   .whl/     pycuda, built here for the GPU machine's Python, and its pure-Python needs;
#   .camvid/  CamVid's val split, for the GPU tests that run real frames (DILSEG_CAMVID).
#
#   TARGET_PYTHON=python3.12 bash scripts/gpu_wheelhouse.sh   # the GPU machine's Python version
#
# Both folders are git-ignored (.git/info/exclude) and travel to the GPU machine beside the
# checkout; gpu_check.sh installs .whl/ with pip --no-index into /tmp/site when it is there.
#
# pycuda has no binary wheel on PyPI: it is compiled against the toolkit's headers (without CURAND,
# which dilseg does not use) and linked
# against libcuda.so.1, which only a machine with an NVIDIA driver has. A stub library with that
# soname and no symbols stands in at link time (a shared object may leave symbols undefined);
# the GPU machine's driver provides the real one when pycuda is imported.
#
# TensorRT cannot travel this way: PyPI's tensorrt-cu12/cu13-libs is a source package that
# downloads libnvinfer from NVIDIA's own index at install time, and the libraries are over a
# gigabyte. Without a TensorRT install on the GPU machine, its tests skip with that reason and
# the pycuda tests (kernels, primary context) still run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${TARGET_PYTHON:-python3.12}
PYCUDA=${PYCUDA_VERSION:-2026.1}
CUDA=${CUDA_HOME:-/usr/local/cuda}
[ -f "$CUDA/include/cuda.h" ] || { echo "gpu_wheelhouse: no cuda.h under $CUDA/include (set CUDA_HOME)" >&2; exit 2; }
ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
work=$(mktemp -d -t dilseg-wheelhouse.XXXXXX)
trap 'rm -rf "$work"' EXIT
rm -rf .whl && mkdir -p .whl "$(git rev-parse --git-dir)/info"
grep -qxF "/.whl/" "$(git rev-parse --git-dir)/info/exclude" 2>/dev/null || echo "/.whl/" >> "$(git rev-parse --git-dir)/info/exclude"
grep -qxF "/.camvid/" "$(git rev-parse --git-dir)/info/exclude" 2>/dev/null || echo "/.camvid/" >> "$(git rev-parse --git-dir)/info/exclude"

echo "== pycuda $PYCUDA for Python $ver, against $CUDA"
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check numpy setuptools wheel pytools
"$work/venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps --no-binary=pycuda --no-build-isolation \
  -d "$work" "pycuda==$PYCUDA"
tar -xzf "$work"/pycuda-*.tar.gz -C "$work"
mkdir -p "$work/stub"
echo "" > "$work/stub/empty.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$work/stub/libcuda.so" "$work/stub/empty.c"
# --no-as-needed: the stub defines nothing, and libcuda.so.1 must still be recorded as needed.
(cd "$work"/pycuda-*/ && export LDFLAGS="-Wl,--no-as-needed ${LDFLAGS:-}" && "$work/venv/bin/python" configure.py --cuda-root="$CUDA" --cudadrv-lib-dir="$work/stub" --no-cuda-enable-curand \
   >/dev/null && "$work/venv/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w "$OLDPWD/.whl" .)

echo "== pycuda's own needs, as wheels for Python $ver"
# Names the GPU image lacks (numpy and typing-extensions it has); one version of each.
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$ver" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl pytools platformdirs siphash24 mako
ls -la .whl
unzip -o -q -d "$work/check" .whl/pycuda-*.whl 'pycuda/_driver*.so'
readelf -d "$work"/check/pycuda/_driver*.so | grep -q 'NEEDED.*libcuda.so.1' ||
  { echo "gpu_wheelhouse: pycuda's _driver does not name libcuda.so.1 as needed" >&2; exit 1; }
echo "pycuda's _driver links libcuda.so.1 (the GPU machine's driver)"

if [ -d ../shared/data/camvid/val ]; then
  mkdir -p .camvid
  cp -r ../shared/data/camvid/val .camvid/
  echo "== CamVid val copied to .camvid/ ($(du -sh .camvid | cut -f1))"
fi
echo "carry .whl and .camvid to the GPU machine; there: bash scripts/gpu_check.sh"
