#!/usr/bin/env bash
# The whole training plan on one GPU machine in about 9 minutes (scripts/train_gpu.py):
# ablation on the sequence-held-out protocol, then final edge_m/edge_s train+val weights.
#
#   scripts/train_gpu.sh --stage      # here, once: copy CamVid into .device-data/ (git-ignored)
#   scripts/train_gpu.sh              # there: device run with carry [".device-data"], timeout 600
#   OUT=/tmp/gpu-smoke scripts/train_gpu.sh --smoke   # any CPU, 5-10 minutes (every phase, 8 frames)
#
# Results land in $OUT (at most 8 files come back from a device run): summary.md,
# summary.json, driver.log, logs.tar.gz (every run's log.csv, best.json, train.log, config.json,
# and the front-end study's (a) edge_m_os32 and (c) base best weights) and the
# final weights edge_m_final.safetensors / edge_s_final.safetensors plus the best
# strong-recipe fold weights strong_0006R0.safetensors. BUDGET (default 530 s) is the
# wall-clock limit of the training itself.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [[ "${1:-}" == "--stage" ]]; then
    src=${DATA:-../shared/data/camvid}
    mkdir -p .device-data
    rm -rf .device-data/camvid
    cp -r "$src" .device-data/camvid
    du -sh .device-data/camvid
    exit 0
fi

OUT=${OUT:?set OUT to the results folder}
mkdir -p "$OUT"
DATA=${DATA:-}
if [[ -z "$DATA" ]]; then
    if [[ -d .device-data/camvid ]]; then DATA=.device-data/camvid; else DATA=../shared/data/camvid; fi
fi
[[ -d "$DATA/train/images" ]] || { echo "no CamVid at $DATA (run scripts/train_gpu.sh --stage first)" >&2; exit 2; }

# dilseg without installing it: a package folder whose parts point at this checkout.
PKG=$(mktemp -d /tmp/dilseg-pkg.XXXXXX)
mkdir -p "$PKG/dilseg"
ln -s "$ROOT/dilseg/__init__.py" "$PKG/dilseg/__init__.py"
ln -s "$ROOT/export" "$PKG/dilseg/export"
ln -s "$ROOT/runtime" "$PKG/dilseg/runtime"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

WORK=${WORK:-/tmp/dilseg-gpu-train}
rm -rf "$WORK"
extra=()
[[ "${1:-}" == "--smoke" ]] && extra+=(--smoke)
rc=0
python3 -P scripts/train_gpu.py --data "$DATA" --out "$WORK" --budget "${BUDGET:-530}" "${extra[@]}" || rc=$?

cp "$WORK/summary.md" "$WORK/summary.json" "$WORK/driver.log" "$OUT/" 2>/dev/null || true
# config.json names each run's model (scripts/frontend_study.py reads it); the (a) and (c)
# weights of the front-end study travel too, for its picture (about 8 MB).
(cd "$WORK" && { find runs -name log.csv -o -name best.json -o -name train.log -o -name config.json
                 ls runs/edge_m_os32/best.safetensors runs/base/best.safetensors 2>/dev/null || true
               } | tar -czf "$OUT/logs.tar.gz" -T -)
for model in edge_m edge_s; do
    f="$WORK/runs/final-$model/last.safetensors"
    [[ -f "$f" ]] && cp "$f" "$OUT/${model}_final.safetensors"
done
[[ -f "$WORK/runs/strong/best.safetensors" ]] && cp "$WORK/runs/strong/best.safetensors" "$OUT/strong_0006R0.safetensors"
ls -la "$OUT"
exit $rc
