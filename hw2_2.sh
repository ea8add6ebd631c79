#!/usr/bin/env bash
# Problem 2: DDIM with the course face UNet.
# usage: bash hw2_2.sh NOISE_DIR OUT_DIR UNET_PT
set -euo pipefail
if [ "$#" -ne 3 ]; then
    echo "usage: bash hw2_2.sh NOISE_DIR OUT_DIR UNET_PT" >&2
    exit 2
fi
exec difflab faces generate --noise "$1" --out "$2" --unet "$3"
