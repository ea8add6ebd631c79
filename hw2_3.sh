#!/usr/bin/env bash
# Problem 3: bash hw2_3.sh INPUT_JSON OUT_DIR SD_CKPT
# 25 images per prompt for every concept of INPUT_JSON, as OUT_DIR/{key}/{p}/source{key}_prompt{p}_{i}.png.
set -euo pipefail
if [ "$#" -lt 3 ]; then
    echo "usage: bash hw2_3.sh INPUT_JSON OUT_DIR SD_CKPT" >&2
    exit 2
fi
exec difflab ti generate --json "$1" --out "$2" --sd "$3"
