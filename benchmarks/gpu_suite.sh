#!/usr/bin/env bash
# phreg on one GPU, in one JSON (README "Performance"). Usage, from anywhere in a checkout:
#
#   bash benchmarks/gpu_suite.sh [OUT.json]        # default: gpu_suite.json in the repository root
#
# Needs only the working tree and a Python with torch, timm, accelerate, safetensors, huggingface_hub, PyYAML, tqdm
# (no package index: phreg no longer imports kornia). Every part is time-boxed inside a 465 s budget and the JSON is
# rewritten after each part, so a run cut short still leaves what it measured.
#
# Without a GPU it prints one line and exits 0. PHREG_GPU_SUITE_DRY=1 runs every part on the CPU with a tiny setting.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
OUT="${1:-gpu_suite.json}"
DRY=()
[[ -n "${PHREG_GPU_SUITE_DRY:-}" ]] && DRY=(--dry-run)

if [[ ${#DRY[@]} -eq 0 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_suite: no CUDA GPU on this machine; nothing measured"
    exit 0
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_suite.py --out "$OUT" "${DRY[@]}"
