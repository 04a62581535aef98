#!/usr/bin/env bash
# phreg on one GPU, in one JSON (README "Scale"). Usage, from anywhere in a checkout:
#
#   bash benchmarks/gpu_suite.sh [OUT.json]        # default: gpu_suite.json in the repository root
#
# Needs only the working tree and a Python with torch, timm, accelerate, safetensors, huggingface_hub. kornia is
# installed, without a package index, from wheels carried in the git-ignored folder .whl/; fill it once, where PyPI
# is reachable, for the GPU machine's Python (3.12, x86_64):
#
#   pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl kornia kornia_rs
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

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import kornia' 2>/dev/null; then
    shopt -s nullglob
    wheels=(.whl/*.whl)
    if [[ ${#wheels[@]} -eq 0 ]]; then
        echo "gpu_suite: kornia is not installed and .whl/ holds no wheels (see the pip download line in $0)" >&2
        exit 2
    fi
    # a wheel is a zip archive: unpacking it is all an install of these two needs (no pip, no index)
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(".whl/site") for w in sys.argv[1:]]' "${wheels[@]}"
    export PYTHONPATH="$PYTHONPATH:$PWD/.whl/site"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_suite.py --out "$OUT" "${DRY[@]}"
