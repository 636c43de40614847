#!/usr/bin/env bash
# One worker of a multi-worker `smoothmix train` run (tf.distribute.MultiWorkerMirroredStrategy).
#
#   run_worker.sh INDEX WORKERS -- [smoothmix train arguments]
#
# INDEX    this host's position in WORKERS (0 = chief: it writes --out itself; worker K writes
#          --out/worker-K)
# WORKERS  comma-separated host:port list, identical on every host, e.g. 10.0.0.1:12345,10.0.0.2:12345
#
# Example (host 10.0.0.2, the second of two):
#   train/multiworker/run_worker.sh 1 10.0.0.1:12345,10.0.0.2:12345 -- \
#       --preset mnist-smoothmix-eta5-s1.00 --out runs/mnist-sm-2w
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
index=$1
workers=$2
shift 2
[[ "${1:-}" == "--" ]] && shift

# {"cluster": {"worker": ["h1:p1", "h2:p2"]}, "task": {"type": "worker", "index": INDEX}}
worker_list=$(printf '"%s",' ${workers//,/ })
export TF_CONFIG="{\"cluster\": {\"worker\": [${worker_list%,}]}, \"task\": {\"type\": \"worker\", \"index\": ${index}}}"
echo "TF_CONFIG=${TF_CONFIG}" >&2
exec smoothmix train --strategy multiworker "$@"
