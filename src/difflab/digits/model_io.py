"""Saving and loading digit models: ``config.json`` + ``model.safetensors`` folders.

A *model folder* holds ``config.json`` (``{"model": DigitUNetConfig, "schedule": ...}``)
and ``model.safetensors`` (the EMA weights). A training *run folder* holds
``checkpoints/step_XXXXXXX/`` folders of the same form plus training state; loading a
run folder picks its newest complete checkpoint.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from difflab.assets import SHIPPED_DIGITS
from difflab.io import PathLike, assign_state, load_json, load_tensors
from difflab.nets.digit_unet import DigitUNet, DigitUNetConfig
from difflab.schedule import NoiseSchedule
from difflab.training import latest_checkpoint

SHIPPED_DIR = SHIPPED_DIGITS
MAX_TRAIN_STEPS = 100_000  # a bound on the diffusion steps T a config.json may claim (the course: 1000)


def resolve_model_dir(path: PathLike) -> Path:
    """Accept a model folder, a run folder, or a ``model.safetensors`` file."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent
    if not p.exists():
        raise FileNotFoundError(f"digit checkpoint not found: {p}")
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is not None:
        for name in ("config.json", "model.safetensors"):
            if not (latest / name).is_file():
                raise FileNotFoundError(f"missing {latest / name}: the newest checkpoint of run {p} is incomplete")
        return latest
    for have, missing in (("config.json", "model.safetensors"), ("model.safetensors", "config.json")):
        if (p / have).is_file():
            raise FileNotFoundError(f"missing {p / missing}: a digit model folder holds config.json and model.safetensors")
    raise FileNotFoundError(
        f"{p} is not a digit model: expected config.json and model.safetensors, or a training run "
        "folder with checkpoints/step_*"
    )


def load_digit_model(path: PathLike = SHIPPED_DIR, device="cpu", weights: str = "ema") -> tuple[DigitUNet, NoiseSchedule, dict]:
    """Load a digit UNet and its schedule. ``weights`` is ``ema`` or ``raw`` (run checkpoints hold both).

    Every error names the file at fault. The network is checked against the weights on
    the meta device before it is built, so a ``config.json`` claiming a huge network is
    refused without allocating it; weights holding NaN or infinities are refused.
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    d = resolve_model_dir(path)
    config_file = d / "config.json"
    meta = load_json(config_file)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ValueError(f"{config_file}: expected an object with a 'model' section")
    try:
        cfg = DigitUNetConfig.from_dict(meta["model"])
        cfg.validate()
        schedule_name, steps = meta.get("schedule", "linear"), meta.get("num_train_steps", 1000)
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_TRAIN_STEPS:
            raise ValueError(f"num_train_steps must be an integer in [1, {MAX_TRAIN_STEPS}], got {steps!r}")
        schedule = NoiseSchedule.from_name(schedule_name, steps)
        distilled_scale = _distilled_scale(meta.get("distilled"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: {e}") from None
    fname = d / ("model.safetensors" if weights == "ema" else "raw.safetensors")
    state = load_tensors(fname)
    net = assign_state(lambda: DigitUNet(cfg), state, fname)
    net.distilled_scale = distilled_scale
    return net.to(device).eval(), schedule, meta


def _distilled_scale(section) -> Optional[float]:
    """The guidance scale of a ``"distilled"`` section of config.json (None: not distilled)."""
    if section is None:
        return None
    scale = section.get("guidance_scale") if isinstance(section, dict) else None
    if (not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale < 0
            or section.get("guide_on", "both") != "both"):
        raise ValueError(f"'distilled' must be {{\"guidance_scale\": S >= 0, \"guide_on\": \"both\"}}, got {section!r}")
    return float(scale)
