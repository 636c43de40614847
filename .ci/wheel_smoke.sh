#!/usr/bin/env bash
# Packaging smoke test: build the wheel, install it (not editable) into a fresh virtual environment
# and use it from a folder outside the repository, as a user would: list the 58 presets, train one
# short epoch from a preset, certify one image, run a short quickstart. Usage: .ci/wheel_smoke.sh [PYTHON] (default python3).
set -euo pipefail
python="${1:-python3}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" -m pip wheel -q --no-deps -w "$work/dist" "$repo"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$work"/dist/smoothmix_tf-*.whl
smoothmix="$work/venv/bin/smoothmix"

cd "$work"  # outside the repository: only the installed wheel can be imported
"$work/venv/bin/python" - "$repo" <<'PY'
import sys
from pathlib import Path
import smoothmix_tf
location = Path(smoothmix_tf.__file__).resolve()
assert Path(sys.argv[1]) not in location.parents, f"imported from the source tree: {location}"
print(f"smoothmix_tf imported from {location.parent}")
PY

count=$("$smoothmix" train --list-presets | grep -c .)
if [ "$count" -ne 58 ]; then
  echo "wheel smoke: expected 58 presets, the installed wheel lists $count" >&2
  exit 1
fi
echo "wheel smoke: 58 presets listed"

"$smoothmix" train --preset mnist-gaussian-s0.50 --dataset mnist5k --out run --quiet \
  --set epochs=1 --set batch_size=32 --set train_limit=64 --set test_limit=32
test -f run/checkpoint.keras
echo "wheel smoke: trained one epoch from a preset"

"$smoothmix" certify --checkpoint run --dataset mnist5k --max 1 --n0 10 --n 100 --batch 100 \
  --out run/certify.tsv
rows=$(tail -n +2 run/certify.tsv | grep -c .)
if [ "$rows" -ne 1 ]; then
  echo "wheel smoke: expected one certified image, run/certify.tsv has $rows rows" >&2
  exit 1
fi
echo "wheel smoke: certified one image"

"$smoothmix" quickstart --out qs --epochs 1 --certify-max 2 --n 200 > qs.log
rows=$(tail -n +2 qs/certify.tsv | grep -c .)
if [ "$rows" -ne 2 ] || ! grep -q "ACR = " qs.log; then
  echo "wheel smoke: quickstart did not certify 2 images and print the ACR" >&2
  exit 1
fi
echo "wheel smoke: quickstart ran (1 epoch, 2 images)"
