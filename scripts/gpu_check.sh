#!/usr/bin/env bash
# Run every GPU check dilseg has (pycuda kernels and the primary context, TensorRT build -> run
# -> parity, CUDA graphs, the timing cache) on any NVIDIA machine or Jetson, and print a summary
# of the machine and the results.
#
#   bash scripts/gpu_check.sh            # all tests marked gpu or tensorrt
#   bash scripts/gpu_check.sh -x -k cuda # extra pytest arguments are passed through
#
# A GPU machine that reaches no package registry: on one that does, `bash scripts/gpu_wheelhouse.sh`
# fills .whl/ (pycuda built for that machine's Python, and its needs) and .camvid/ (CamVid val);
# carry both beside the checkout. Here .whl/ is then installed with pip --no-index into
# /tmp/site (on PYTHONPATH), .camvid/ becomes DILSEG_CAMVID, and dilseg is installed editable
# when it is not importable yet. TensorRT itself cannot travel so (see gpu_wheelhouse.sh): where
# it is missing, its tests are reported skipped with that reason.
#
# Exit status: pytest's (0 = all selected tests passed). A machine without TensorRT or
# pycuda reports the tests as skipped with the reason, so the summary says what is missing;
# GPU_CHECK_STRICT=1 turns any skip into exit status 1 (for a machine that should run them all).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${GPU_CHECK_LOG:-$(mktemp -t dilseg-gpu-check.XXXXXX.log)}

echo "== setup"
if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "wheelhouse: installed $(ls .whl/*.whl | wc -l) wheel(s) from .whl/ into /tmp/site: $(cd .whl && ls *.whl | cut -d- -f1-2 | tr '\n' ' ')"
  else
    echo "wheelhouse: installing .whl/ FAILED (pip's message above); going on with what is installed"
  fi
else
  echo "wheelhouse: none (.whl/ absent; scripts/gpu_wheelhouse.sh makes one)"
fi
if [ -z "${DILSEG_CAMVID:-}" ] && [ -d .camvid/val ]; then export DILSEG_CAMVID="$PWD/.camvid"; fi
echo "CamVid: ${DILSEG_CAMVID:-../shared/data/camvid (default)}"
if ! "$PY" -c "import dilseg.runtime" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . && echo "dilseg: installed editable from $PWD" ||
    echo "dilseg: NOT importable and the editable install failed"
fi

echo "== machine"
uname -srm
if [ -f /etc/nv_tegra_release ]; then echo "Jetson: $(head -n1 /etc/nv_tegra_release)"; fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null || nvidia-smi -L
fi
command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n1 || echo "nvcc: not on PATH (pycuda compiles its kernels with it)"
if command -v nvpmodel >/dev/null 2>&1; then nvpmodel -q 2>/dev/null | head -n2; fi

echo "== python packages"
"$PY" - <<'PYEOF'
import importlib
for name in ("tensorrt", "pycuda", "onnxruntime", "cv2", "numpy"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:12s} {getattr(mod, '__version__', getattr(mod, 'VERSION_TEXT', '?'))}")
    except Exception as exc:
        print(f"{name:12s} MISSING ({type(exc).__name__}: {exc})")
try:
    import pycuda.driver as cuda
    cuda.init()
    for i in range(cuda.Device.count()):
        d = cuda.Device(i)
        cc = d.compute_capability()
        print(f"cuda device {i}: {d.name()} (compute capability {cc[0]}.{cc[1]}, {d.total_memory() / 2**30:.1f} GiB)")
except Exception as exc:
    print(f"cuda devices: none usable ({exc})")
try:
    import tensorrt as trt
    from dilseg.runtime.trt.compat import detect
    caps = detect(trt)
    print("tensorrt capabilities:", {k: v for k, v in caps.__dict__.items() if k not in ("version", "notes")})
except Exception:
    pass
PYEOF

echo "== GPU tests (pytest -m 'gpu or tensorrt or nvcc': the nvcc compile of the kernels too)"
"$PY" -m pytest -m "gpu or tensorrt or nvcc" -rfEs -q -p no:cacheprovider "$@" tests 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}

echo "== summary"
tail -n1 "$LOG"
grep -E "^(FAILED|ERROR) " "$LOG" | cut -c1-200 || true
# "SKIPPED [n] file:line: reason" -> total per reason
grep -E "^SKIPPED" "$LOG" | sed -E 's/^SKIPPED \[([0-9]+)\] [^:]+:[0-9]+: /\1\t/' |
  awk -F'\t' '{n[$2] += $1} END {for (r in n) printf "skipped: %4d  %s\n", n[r], r}'
if grep -qE "^SKIPPED .*TensorRT is not installed" "$LOG"; then
  echo "TensorRT: install it on this machine (JetPack's apt packages, or pip from NVIDIA's index); it cannot"
  echo "          travel as wheels from PyPI alone (see scripts/gpu_wheelhouse.sh)"
fi
if grep -qE "^SKIPPED .*pycuda is not installed" "$LOG"; then
  echo "pycuda: pip install pycuda here, or carry .whl/ from scripts/gpu_wheelhouse.sh"
fi
if [ "$status" -eq 5 ]; then echo "no GPU test was selected"; fi
if [ "${GPU_CHECK_STRICT:-0}" = 1 ] && grep -qE "^SKIPPED" "$LOG" && [ "$status" -eq 0 ]; then
  echo "GPU_CHECK_STRICT=1: tests were skipped"; status=1
fi
echo "full log: $LOG (exit status $status)"
exit "$status"
