#!/usr/bin/env bash
# Problem 2: DDIM with the course face UNet.
# usage: bash hw2_2.sh NOISE_DIR OUT_DIR UNET_PT
set -euo pipefail
if [ "$#" -ne 3 ]; then
    echo "usage: bash hw2_2.sh NOISE_DIR OUT_DIR UNET_PT" >&2
    exit 2
fi
# `difflab` when installed; otherwise the package beside this script.
run_difflab() {
    if command -v difflab >/dev/null 2>&1; then
        exec difflab "$@"
    fi
    PYTHONPATH="$(dirname "$0")/src${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m difflab "$@"
}
run_difflab faces generate --noise "$1" --out "$2" --unet "$3"
