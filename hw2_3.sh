#!/usr/bin/env bash
# Problem 3: bash hw2_3.sh INPUT_JSON OUT_DIR [SD_CKPT]
# 25 images per prompt for every concept of INPUT_JSON, as OUT_DIR/{key}/{p}/source{key}_prompt{p}_{i}.png.
# Without SD_CKPT: the shipped mini model (digits; `difflab t2i train`) and its shipped embeddings.
set -euo pipefail
if [ "$#" -lt 2 ] || [ "$#" -gt 3 ]; then
    echo "usage: bash hw2_3.sh INPUT_JSON OUT_DIR [SD_CKPT]" >&2
    exit 2
fi
if [ "$#" -eq 3 ]; then
    exec difflab ti generate --json "$1" --out "$2" --sd "$3"
fi
exec difflab ti generate --json "$1" --out "$2"
