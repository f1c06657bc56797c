#!/usr/bin/env bash
# System pieces the tests' real servers need (tests/servers.py), installed where missing:
#  - Debian's GStreamer: gst-rtsp-server through PyGObject (the RTSP test server runs under
#    /usr/bin/python3), x264 and libav plugins, and python3-opencv, which is built with GStreamer;
#  - a venv from Debian's python3.11 with system site packages (DILSEG_SYSVENV, default .sysvenv/):
#    Debian's OpenCV and numpy, onnxruntime, tqdm, nvidia-pytriton (tritonserver with the Python
#    backend) and tritonclient, and dilseg editable from this checkout. Triton's Python-backend stub
#    embeds libpython3.11, so the Python it runs must be the one that library belongs to: Debian's.
# Idempotent: a second run checks and returns in a few seconds. Run as root (apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
VENV="${DILSEG_SYSVENV:-$PWD/.sysvenv}"
PIP=(-m pip install -q --disable-pip-version-check)

step() { echo "ci_system: $1 ($((SECONDS - t0))s)"; }

PACKAGES=(
  gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
  gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-rtsp
  python3-gi python3-gst-1.0 gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-rtsp-server-1.0
  python3-opencv python3-numpy python3.11-venv libpython3.11
)
t0=$SECONDS
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null
  step "installed ${#missing[@]} Debian packages: ${missing[*]}"
else
  step "Debian packages present"
fi

# The venv is rebuilt when this script, pyproject.toml or the checkout it points at change.
t0=$SECONDS
stamp="$VENV/.dilseg-ci-system"
want="$(cat scripts/ci_system.sh pyproject.toml | sha256sum | cut -c1-16) $(pwd -P)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]] \
   || ! "$VENV/bin/python" -c "import cv2, onnxruntime, tqdm, pytriton, tritonclient.grpc, dilseg" 2>/dev/null; then
  if ! "$VENV/bin/python" -c "import sys; assert sys.base_prefix == '/usr' and sys.version_info[:2] == (3, 11)" 2>/dev/null; then
    rm -rf "$VENV"
    /usr/bin/python3.11 -m venv --system-site-packages "$VENV"
  fi
  # numpy stays Debian's (Debian's cv2 is built against numpy 1.x): the bound keeps pip from replacing it.
  "$VENV/bin/python" "${PIP[@]}" "numpy<2" "nvidia-pytriton==0.7.0" "tritonclient[grpc,http]" onnxruntime tqdm
  "$VENV/bin/python" "${PIP[@]}" --no-deps -e .
  # tritonserver looks for the stub beside the Python backend; the wheel keeps one per Python version.
  triton="$("$VENV/bin/python" -c "import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parent / 'tritonserver')")"
  cp "$triton/python_backend_stubs/3.11/triton_python_backend_stub" "$triton/backends/python/"
  echo "$want" > "$stamp"
  step "venv $VENV built"
else
  step "venv $VENV up to date"
fi

# nvcc, so the pycuda kernels are compiled by NVIDIA's compiler as pycuda would (test_trt_kernels):
# where the machine has no CUDA toolkit, CUDA 13.0's compiler from NVIDIA's PyPI wheels (no GPU
# needed), linked as /usr/local/cuda where tests/servers.py's find_nvcc looks.
t0=$SECONDS
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  step "nvcc present"
elif [ ! -e /usr/local/cuda ]; then
  CUDA_WHEELS=/opt/dilseg-cuda-13.0
  python3 "${PIP[@]}" --no-deps --target "$CUDA_WHEELS" nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  ln -s "$CUDA_WHEELS/nvidia/cu13" /usr/local/cuda
  step "nvcc $(/usr/local/cuda/bin/nvcc --version | tail -n1) from PyPI wheels"
else
  step "no nvcc (/usr/local/cuda exists without bin/nvcc): the nvcc kernel test skips"
fi

# Fail here, with the reason, rather than in the middle of the tests.
/usr/bin/python3 tests/rtsp_server.py --check
"$VENV/bin/python" -c "import cv2, dilseg.runtime.sources as s; assert s.has_gstreamer(), cv2.getBuildInformation()"
step "checked"
