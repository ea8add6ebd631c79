#!/usr/bin/env bash
# Problem 1: write the course's 1,000 digit images (OUT/mnistm/0_001.png ... OUT/svhn/9_050.png)
# with the shipped checkpoint. Usage: bash hw2_1.sh OUT_DIR
set -euo pipefail
if [ "$#" -ne 1 ]; then
  echo "usage: bash hw2_1.sh OUT_DIR" >&2
  exit 2
fi
if command -v difflab >/dev/null 2>&1; then
  exec difflab digits generate --out "$1"
fi
exec python3 -m difflab digits generate --out "$1"
