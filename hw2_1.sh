#!/usr/bin/env bash
# Problem 1: write the course's 1,000 digit images (OUT/mnistm/0_001.png ... OUT/svhn/9_050.png)
# with the shipped checkpoint. Usage: bash hw2_1.sh OUT_DIR
set -euo pipefail
if [ "$#" -ne 1 ]; then
    echo "usage: bash hw2_1.sh OUT_DIR" >&2
    exit 2
fi
# `difflab` when installed; otherwise the package beside this script.
run_difflab() {
    if command -v difflab >/dev/null 2>&1; then
        exec difflab "$@"
    fi
    PYTHONPATH="$(dirname "$0")/src${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m difflab "$@"
}
run_difflab digits generate --out "$1"
