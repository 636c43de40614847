#!/usr/bin/env bash
# Two workers on this machine (127.0.0.1): a rehearsal of a multi-host run, e.g. to check a
# configuration before submitting it to a cluster. Each worker uses a copy of the data pipeline and
# half of every global batch; both end with identical weights.
#
#   train/multiworker/launch_local.sh [OUT] [smoothmix train arguments]
#
# Default: 2 epochs of Gaussian training of LeNet on the embedded mnist5k data, σ = 0.5.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-runs/multiworker-demo}
shift || true
args=("$@")
if [[ ${#args[@]} -eq 0 ]]; then
  args=(--dataset mnist5k --architecture lenet --method gaussian --sigma 0.5 --epochs 2
        --batch-size 64 --lr 0.01)
fi

# two free TCP ports on 127.0.0.1
read -r port0 port1 < <(python - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
PY
)
workers="127.0.0.1:${port0},127.0.0.1:${port1}"
mkdir -p "$out"
"$here/run_worker.sh" 1 "$workers" -- "${args[@]}" --out "$out" > "$out.worker-1.log" 2>&1 &
other=$!
"$here/run_worker.sh" 0 "$workers" -- "${args[@]}" --out "$out"
wait "$other" || { echo "worker 1 failed, see $out.worker-1.log" >&2; exit 1; }
echo "chief run: $out (worker 1: $out/worker-1, log $out.worker-1.log)"
