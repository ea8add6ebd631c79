#!/usr/bin/env bash
# The digit checkpoint ships inside the package (src/difflab/assets/digits), so there is
# nothing to download: this checks that it is present and loads.
# Runs from a plain checkout too (the course's grading machine installs nothing): the
# package beside this script comes first on PYTHONPATH.
set -euo pipefail
PYTHONPATH="$(dirname "$0")/src${PYTHONPATH:+:$PYTHONPATH}" python3 - <<'PY'
from difflab.digits.model_io import SHIPPED_DIR, load_digit_model

net, schedule, meta = load_digit_model(SHIPPED_DIR)
n = sum(p.numel() for p in net.parameters())
print(f"shipped digit model OK: {SHIPPED_DIR} ({n / 1e6:.2f}M parameters, {meta.get('schedule')} schedule)")
PY
