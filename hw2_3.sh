#!/usr/bin/env bash
# Problem 3: bash hw2_3.sh INPUT_JSON OUT_DIR [SD_CKPT]
# 25 images per prompt for every concept of INPUT_JSON, as OUT_DIR/{key}/{p}/source{key}_prompt{p}_{i}.png.
# Without SD_CKPT: the shipped mini model (digits; `difflab t2i train`) and its shipped embeddings.
# Learned embeddings (`difflab ti train`): DIFFLAB_EMBEDDINGS=FILE_OR_DIR[:...] bash hw2_3.sh ...,
# or the folder embeddings/ beside this script when it exists.
set -euo pipefail
if [ "$#" -lt 2 ] || [ "$#" -gt 3 ]; then
    echo "usage: bash hw2_3.sh INPUT_JSON OUT_DIR [SD_CKPT]" >&2
    exit 2
fi
# `difflab` when installed; otherwise the package beside this script.
run_difflab() {
    if command -v difflab >/dev/null 2>&1; then
        exec difflab "$@"
    fi
    PYTHONPATH="$(dirname "$0")/src${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m difflab "$@"
}
if [ -z "${DIFFLAB_EMBEDDINGS:-}" ] && [ -d "$(dirname "$0")/embeddings" ]; then
    export DIFFLAB_EMBEDDINGS="$(dirname "$0")/embeddings"
fi
if [ "$#" -eq 3 ]; then
    run_difflab ti generate --json "$1" --out "$2" --sd "$3"
fi
run_difflab ti generate --json "$1" --out "$2"
