"""Benchmark: a full-size SD v1 ``model.ckpt`` (random weights, CompVis key names, 1.07e9
values) read and sampled in the course's grading environment (torch 1.11, no diffusers),
against the full install (diffusers' networks) on the same file.

Each side runs ``difflab ti generate`` in its own process on one prompt at a small size
(default 64x64, 2 DDIM steps, 1 image), so what it measures is mostly loading: the
restricted unpickler, the own networks' build, the checks. It prints wall seconds, the
process's peak resident memory and the largest pixel difference between the two images.

    bash tools/course_env.sh ~/.cache/difflab/course-env
    python benchmarks/course_env_sd.py --env ~/.cache/difflab/course-env --work /tmp/sd-full

The checkpoint (about 4.3 GB) is written once into ``--work`` and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_full_checkpoint(work: Path) -> Path:
    """SD v1's full UNet, VAE and CLIP ViT-L/14 text encoder with random weights, as one
    CompVis ``model.ckpt``, and a small CLIP tokenizer (77 positions) beside it."""
    from difflab.sd.load import read_config
    from difflab.testing import save_compvis

    ckpt = work / "model.ckpt"
    if not ckpt.is_file():
        save_compvis(work, read_config("unet"), read_config("vae"), read_config("text_encoder"))
    return ckpt


def run(python: str, ckpt: Path, out: Path, args, extra_env: dict) -> dict:
    spec = {"0": {"token_name": "<new1>", "prompt": ["a photo of <new1> on a park bench."]}}
    (out.parent / "input.json").write_text(json.dumps(spec))
    emb = out.parent / "new1.safetensors"
    if not emb.is_file():
        import torch

        from difflab.io import save_tensors

        save_tensors({"<new1>": torch.randn(1, 768, generator=torch.Generator().manual_seed(1)) * 0.01}, emb)
    cmd = ["/usr/bin/time", "-f", "%M", python, "-m", "difflab", "ti", "generate", "--json", str(out.parent / "input.json"),
           "--out", str(out), "--sd", str(ckpt), "--embeddings", str(emb), "--overwrite", "--quiet",
           "--height", str(args.size), "--width", str(args.size), "--steps", str(args.steps), "--images-per-prompt", "1"]
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "PYTHONPATH": str(REPO / "src"), **extra_env}
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{python} failed:\n{r.stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss_gb": int(r.stderr.strip().splitlines()[-1]) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default=str(Path.home() / ".cache" / "difflab" / "course-env"),
                        help="the course environment built by tools/course_env.sh")
    parser.add_argument("--work", default="/tmp/difflab-sd-full", help="folder for the checkpoint and images")
    parser.add_argument("--size", type=int, default=64, help="image height and width (a multiple of 8)")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps")
    args = parser.parse_args()
    import numpy as np
    from PIL import Image

    work = Path(args.work)
    start = time.perf_counter()
    ckpt = write_full_checkpoint(work)
    print(f"checkpoint {ckpt} ({ckpt.stat().st_size / 1e9:.2f} GB) ready in {time.perf_counter() - start:.1f} s")
    course = run(str(Path(args.env) / "bin" / "python3"), ckpt, work / "course", args, {})
    print(f"course environment (torch 1.11, own networks): {course['seconds']:.1f} s, peak RSS {course['peak_rss_gb']:.2f} GB")
    full = run(sys.executable, ckpt, work / "full", args, {"DIFFLAB_SD_NETWORKS": "diffusers"})
    print(f"full install (torch 2.13, diffusers networks): {full['seconds']:.1f} s, peak RSS {full['peak_rss_gb']:.2f} GB")
    a = np.asarray(Image.open(work / "course" / "0" / "0" / "source0_prompt0_0.png"), dtype=np.float64)
    b = np.asarray(Image.open(work / "full" / "0" / "0" / "source0_prompt0_0.png"), dtype=np.float64)
    print(f"image: MSE {((a - b) ** 2).mean():.4g}, largest pixel difference {np.abs(a - b).max():.0f} (of 255)")


if __name__ == "__main__":
    main()
