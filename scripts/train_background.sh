#!/usr/bin/env bash
# Start or resume, in order, every run listed in training/plan.txt (CPU, low priority).
#
#   nohup scripts/train_background.sh > training/background.log 2>&1 &
#
# Each run lives in training/runs/<name>/ (last.pt, log.csv, best.safetensors, best.json,
# config.json, train.log; DONE once its schedule has run out: then last.pt is removed
# and the run is skipped)
# and resumes from its last.pt, so stopping the script at any point loses at
# most the epoch in progress. The runs execute a snapshot of the committed code (git HEAD
# when the script starts, unpacked under /tmp), so edits in the working tree while a run
# goes on cannot break or change it. Environment: DATA (default ../shared/data/camvid),
# THREADS (torch threads, default 1), NICE (default 15), PLAN (default training/plan.txt),
# RUNS (the folder of run folders, default training/runs).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/camvid}
THREADS=${THREADS:-1}
NICE=${NICE:-15}
PLAN=${PLAN:-training/plan.txt}
RUNS=${RUNS:-training/runs}
export TQDM_DISABLE=1  # one line per epoch in the logs, not a progress bar per step

rev=$(git rev-parse --short HEAD)
SNAP=$(mktemp -d "/tmp/dilseg-train-$rev.XXXXXX")
trap 'rm -rf "$SNAP"' EXIT
git archive HEAD dilseg export runtime | tar -x -C "$SNAP"
mv "$SNAP/export" "$SNAP/runtime" "$SNAP/dilseg/"
# -P: the snapshot, not the working tree in the current folder, provides dilseg.
export PYTHONPATH="$SNAP${PYTHONPATH:+:$PYTHONPATH}"
python3 -P -c "import dilseg.export.train as t, sys; sys.exit(0 if t.__file__.startswith('$SNAP') else 1)" \
    || { echo "cannot import the code snapshot in $SNAP" >&2; exit 1; }
echo "$(date -u +%FT%TZ) code: $rev (snapshot $SNAP)"

while IFS='|' read -r name args; do
    name=$(printf "%s" "$name" | sed -e "s/^[[:space:]]*//" -e "s/[[:space:]]*$//")  # trimmed; xargs would choke on a quote in a comment
    [[ -z "$name" || "$name" == \#* ]] && continue
    dir=$RUNS/$name
    if [[ -f "$dir/DONE" ]]; then
        echo "$(date -u +%FT%TZ) $name finished earlier ($(tr -d '\n' < "$dir/DONE")); skipped"
        continue
    fi
    mkdir -p "$dir"
    echo "$(date -u +%FT%TZ) start/resume $name at $rev: $args" | tee -a "$dir/train.log"
    # shellcheck disable=SC2086  # args are a word list by design
    if ! nice -n "$NICE" python3 -P -m dilseg.runtime.cli train --data "$DATA" --out "$dir" --resume \
            --threads "$THREADS" $args < /dev/null >> "$dir/train.log" 2>&1; then
        echo "$(date -u +%FT%TZ) $name failed (see $dir/train.log); going on with the next run" | tee -a "$dir/train.log"
    elif [[ -f "$dir/DONE" ]]; then
        # The trainer wrote DONE: the schedule ran out. Its 16 MB resume state would only
        # weigh on every clone; best/last weights, log and best.json stay.
        rm -f "$dir/last.pt"
        echo "$(date -u +%FT%TZ) $name finished ($(tr -d '\n' < "$dir/DONE"))" | tee -a "$dir/train.log"
    else
        echo "$(date -u +%FT%TZ) $name stopped before the end of its schedule (--stop-after)" | tee -a "$dir/train.log"
    fi
done < "$PLAN"
echo "$(date -u +%FT%TZ) plan finished"
