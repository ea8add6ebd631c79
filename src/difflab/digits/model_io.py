"""Saving and loading digit models: ``config.json`` + ``model.safetensors`` folders.

A *model folder* holds ``config.json`` (``{"model": DigitUNetConfig, "schedule": ...}``)
and ``model.safetensors`` (the EMA weights). A training *run folder* holds
``checkpoints/step_XXXXXXX/`` folders of the same form plus training state; loading a
run folder picks its newest complete checkpoint.
"""
from __future__ import annotations

from pathlib import Path

from difflab.assets import SHIPPED_DIGITS
from difflab.io import PathLike, load_json, load_state_strict, load_tensors
from difflab.nets.digit_unet import DigitUNet, DigitUNetConfig
from difflab.schedule import NoiseSchedule
from difflab.training import latest_checkpoint

SHIPPED_DIR = SHIPPED_DIGITS


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
        return latest
    raise FileNotFoundError(
        f"{p} is not a digit model: expected config.json and model.safetensors, or a training run "
        "folder with checkpoints/step_*"
    )


def load_digit_model(path: PathLike = SHIPPED_DIR, device="cpu", weights: str = "ema") -> tuple[DigitUNet, NoiseSchedule, dict]:
    """Load a digit UNet and its schedule. ``weights`` is ``ema`` or ``raw`` (run checkpoints hold both)."""
    d = resolve_model_dir(path)
    meta = load_json(d / "config.json")
    if "model" not in meta:
        raise ValueError(f"{d / 'config.json'} has no 'model' section")
    net = DigitUNet(DigitUNetConfig.from_dict(meta["model"]))
    fname = "model.safetensors" if weights == "ema" else "raw.safetensors"
    state = load_tensors(d / fname)
    load_state_strict(net, state, d / fname)
    schedule = NoiseSchedule.from_name(meta.get("schedule", "linear"), int(meta.get("num_train_steps", 1000)))
    return net.to(device).eval(), schedule, meta
