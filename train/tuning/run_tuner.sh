#!/usr/bin/env bash
# One process of a distributed `smoothmix tune` search (KerasTuner chief/worker over gRPC).
#
#   run_tuner.sh TUNER_ID ORACLE_HOST:PORT -- [smoothmix tune arguments]
#
# TUNER_ID          "chief" on exactly one host (it serves the oracle and writes the reports);
#                   a unique id on every other process, e.g. worker0, worker1 (they run trials)
# ORACLE_HOST:PORT  the chief's address, identical everywhere; the port must be free on the chief
#                   and reachable from the workers
#
# Example (chief on 10.0.0.1, a worker on 10.0.0.2):
#   train/tuning/run_tuner.sh chief   10.0.0.1:8000 -- --sigma 0.5 --max-trials 40 --directory /shared/tune
#   train/tuning/run_tuner.sh worker0 10.0.0.1:8000 -- --sigma 0.5 --max-trials 40 --directory /shared/tune
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
export KERASTUNER_TUNER_ID=$1
export KERASTUNER_ORACLE_IP=${2%:*}
export KERASTUNER_ORACLE_PORT=${2##*:}
shift 2
[[ "${1:-}" == "--" ]] && shift
echo "KERASTUNER_TUNER_ID=${KERASTUNER_TUNER_ID} oracle ${KERASTUNER_ORACLE_IP}:${KERASTUNER_ORACLE_PORT}" >&2
exec smoothmix tune "$@"
