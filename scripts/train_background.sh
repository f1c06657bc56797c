#!/usr/bin/env bash
# Start or resume, in order, every run listed in training/plan.txt (CPU, low priority).
#
#   nohup scripts/train_background.sh > training/background.log 2>&1 &
#
# Each run lives in training/runs/<name>/ (last.pt, log.csv, best.safetensors, best.json,
# train.log) and resumes from its last.pt, so stopping the script at any point loses at
# most the epoch in progress. Environment: DATA (default ../shared/data/camvid),
# THREADS (torch threads, default 1), NICE (default 15), PLAN (default training/plan.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/camvid}
THREADS=${THREADS:-1}
NICE=${NICE:-15}
PLAN=${PLAN:-training/plan.txt}
export TQDM_DISABLE=1  # one line per epoch in the logs, not a progress bar per step

while IFS='|' read -r name args; do
    name=$(echo "$name" | xargs)
    [[ -z "$name" || "$name" == \#* ]] && continue
    dir=training/runs/$name
    mkdir -p "$dir"
    echo "$(date -u +%FT%TZ) start/resume $name: $args" | tee -a "$dir/train.log"
    # shellcheck disable=SC2086  # args are a word list by design
    if ! nice -n "$NICE" python3 -m dilseg.runtime.cli train --data "$DATA" --out "$dir" --resume \
            --threads "$THREADS" $args < /dev/null >> "$dir/train.log" 2>&1; then
        echo "$(date -u +%FT%TZ) $name failed (see $dir/train.log); going on with the next run" | tee -a "$dir/train.log"
    fi
done < "$PLAN"
echo "$(date -u +%FT%TZ) plan finished"
