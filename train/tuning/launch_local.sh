#!/usr/bin/env bash
# A chief and WORKERS workers on this machine (127.0.0.1): a rehearsal of a multi-host search.
#
#   train/tuning/launch_local.sh [DIRECTORY] [WORKERS] [smoothmix tune arguments]
#
# Default: 4 trials of 1 epoch on 1,000 mnist5k training images, 2 workers, σ = 0.5,
# val_acr from CERTIFY with n0 = 100, n = 1,000 on 100 validation images. Logs: DIRECTORY/*.log.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
directory=${1:-runs/tune-distributed-demo}
workers=${2:-2}
shift 2 || shift $# || true
args=("$@")
if [[ ${#args[@]} -eq 0 ]]; then
  args=(--dataset mnist5k --sigma 0.5 --epochs 1 --max-trials 4 --train-limit 1000
        --val-limit 100 --attack-steps 2 --set objective.noise_samples=2 --quiet)
fi

# a free TCP port on 127.0.0.1 for the oracle
port=$(python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
PY
)
mkdir -p "$directory"
pids=()
for ((k = 0; k < workers; k++)); do
  "$here/run_tuner.sh" "worker$k" "127.0.0.1:$port" -- "${args[@]}" --directory "$directory" \
      > "$directory/worker$k.log" 2>&1 &
  pids+=($!)
done
status=0
"$here/run_tuner.sh" chief "127.0.0.1:$port" -- "${args[@]}" --directory "$directory" \
    2>&1 | tee "$directory/chief.log" || status=1
for ((k = 0; k < workers; k++)); do
  wait "${pids[$k]}" || { echo "worker$k failed, see $directory/worker$k.log" >&2; status=1; }
done
exit $status
