import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIFFLAB_SHARED", REPO.parent / "shared"))
HW2_DATA = SHARED / "hw2_data"
EVALUATORS = SHARED / "evaluators"

# Tests are CPU-only and use tiny networks, for which one thread is fastest (thread
# start-up dominates, and the machines are often shared with a background job).
torch.set_num_threads(1)

requires_shared = pytest.mark.skipif(
    not HW2_DATA.is_dir(), reason=f"../shared/hw2_data not present at {HW2_DATA} (set DIFFLAB_SHARED)"
)
requires_evaluators = pytest.mark.skipif(
    not EVALUATORS.is_dir(), reason=f"../shared/evaluators not present at {EVALUATORS} (set DIFFLAB_SHARED)"
)


def zero_cross_attention(unet) -> None:
    """Zero the output projection of every cross-attention (``attn2``) of a diffusers UNet,
    so the caption can reach it only by another path."""
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            torch.nn.init.zeros_(module.to_out[0].weight)
            torch.nn.init.zeros_(module.to_out[0].bias)
