#!/bin/sh
# Serve the smoothed classifier with TF Serving in Docker: REST on :8501, gRPC on :8500.
#
#   export/serve.sh models/smoothmix        # MODEL_BASE holds 1/, 2/, ... from `smoothmix export`
#
# The model is served as "smoothmix" (export/models.config). CERTIFY at n = 100,000 takes seconds
# per image on a CPU, hence the long REST timeout (the default is 30 s).
set -eu
MODEL_BASE=$(cd "${1:-models/smoothmix}" && pwd)
CONFIG_DIR=$(cd "$(dirname "$0")" && pwd)
exec docker run --rm -p 8500:8500 -p 8501:8501 \
  --mount "type=bind,source=$MODEL_BASE,target=/models/smoothmix,readonly" \
  --mount "type=bind,source=$CONFIG_DIR,target=/config,readonly" \
  "${TF_SERVING_IMAGE:-tensorflow/serving:latest}" \
  --model_config_file=/config/models.config \
  --enable_batching=true --batching_parameters_file=/config/batching_parameters.txt \
  --rest_api_timeout_in_ms=600000
