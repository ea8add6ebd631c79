"""Loading the course's face UNet (``UNet.pt``) into ``difflab.nets.face_unet.FaceUNet``."""
from __future__ import annotations

from typing import Optional, Union

import torch

from difflab.io import PathLike, assign_state, load_torch_state
from difflab.nets.face_unet import FaceUNet, FaceUNetConfig


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """The face UNet's state dict, read safely on the CPU: the plain state dict (the
    course's format), one wrapped under ``"state_dict"``, or ``module.``-prefixed keys."""
    return load_torch_state(path, "face UNet weights (the course's UNet.pt)")


def load_face_unet(
    path: PathLike,
    device: Union[str, torch.device] = "cpu",
    config: Optional[FaceUNetConfig] = None,
) -> FaceUNet:
    """Build a ``FaceUNet`` and load ``path`` into it strictly, in eval mode.

    Without ``config`` the widths are read off the file (the course file gives the
    default config). A file for another network raises ``ValueError`` naming the file,
    the missing keys, the unexpected keys and the shape conflicts; it is found on a
    network built on the meta device, so widths read off a hostile file (a first weight
    claiming 4096 channels) are refused before the network is allocated. Weights
    holding NaN or infinities are refused.
    """
    state = read_state_dict(path)
    cfg = config or FaceUNetConfig.from_state_dict(state)
    model = assign_state(lambda: FaceUNet(cfg), state, path)
    return model.to(device).eval().requires_grad_(False)
