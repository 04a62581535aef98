#!/usr/bin/env bash
# phreg on one GPU, in one JSON, in at most 8 minutes (README "Performance"). Usage, from anywhere in a checkout:
#
#   bash benchmarks/gpu_suite.sh [OUT.json] [--parts NAME,...]   # default OUT: gpu_suite.json in the repository root
#
# Needs only the working tree and a Python with torch, timm, accelerate, safetensors, huggingface_hub, PyYAML, tqdm.
# Every part runs in its own process with a fixed budget (440 s in all, table in benchmarks/gpu_suite.py): a part
# past its budget is killed with everything it started and recorded as cut, and the JSON is rewritten after each
# part, so a run cut short still leaves what it measured. It ends with one table: each part's status and headline.
#
# Without a GPU it prints one line and exits 0. PHREG_GPU_SUITE_DRY=1 runs the dry run: every part tiny, the models on
# the meta device (a device mix or read-back raises) or, for what must compute, on the CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
OUT="${1:-gpu_suite.json}"
shift $(( $# > 0 ? 1 : 0 ))
DRY=()
[[ -n "${PHREG_GPU_SUITE_DRY:-}" ]] && DRY=(--dry-run)

if [[ ${#DRY[@]} -eq 0 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_suite: no CUDA GPU on this machine; nothing measured"
    exit 0
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_suite.py --out "$OUT" "${DRY[@]}" "$@"
