"""Cost of Problem 3 generation (`difflab ti generate`), measured here and estimated.

1. A tiny random SD-format model (difflab.testing): seconds per guided DDIM
   step and per image, at the batch size used by `ti generate`.
2. The real SD v1 size, built from the carried configs with random weights:
   - FLOPs of one UNet evaluation at 64x64 latents (512x512 images), counted with
     torch's FlopCounterMode on the meta device (no memory, no time);
   - optionally (--real-forward) the wall time of one such forward on this CPU.
   From these: the work of the course's 100 public images (2 concepts x 2 prompts x 25,
   50 steps, guidance doubles the UNet batch) and the sustained throughput that work
   needs to fit the course's 15 minutes.

Usage: python benchmarks/ti_generate.py [--real-forward] [--threads N]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def sd_v1_unet(device):
    from diffusers import UNet2DConditionModel

    from difflab.sd.load import read_config

    with torch.device(device):
        return UNet2DConditionModel.from_config(read_config("unet")).eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--batch-size", type=int, default=5, help="images per batch, as `ti generate --batch-size` (default: 5)")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps timed on the tiny model (default: 10)")
    ap.add_argument("--real-forward", action="store_true", help="also time one full-size UNet forward on this CPU (3.4 GB of fp32 weights)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error(); tlog.set_verbosity_error(); dlog.disable_progress_bar(); tlog.disable_progress_bar()

    from difflab.personalize.generate import image_seed
    from difflab.sd.load import load_sd
    from difflab.sd.sample import sample_images
    from difflab.testing import save_tiny_sd

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    # ---- 1. tiny model, measured
    with tempfile.TemporaryDirectory() as tmp:
        sd = load_sd(save_tiny_sd(tmp + "/sd"))
    seeds = [image_seed(0, "0", 0, i) for i in range(args.batch_size)]
    sample_images(sd, "a photo of a dog", seeds, steps=2)  # warm-up
    t0 = time.perf_counter()
    sample_images(sd, "a photo of a dog", seeds, steps=args.steps)
    dt = time.perf_counter() - t0
    tiny_params = sum(p.numel() for p in sd.unet.parameters())
    lat = sd.resolution // sd.vae_downsample
    x = torch.randn(2 * args.batch_size, 4, lat, lat)
    cond = torch.randn(2 * args.batch_size, 32, sd.text_width)
    tiny_flops = count_flops(lambda: sd.unet(x, torch.full((x.shape[0],), 500), encoder_hidden_states=cond)) / x.shape[0]
    print(f"tiny model: UNet {tiny_params / 1e6:.2f} M params, {sd.resolution}x{sd.resolution} images, "
          f"{tiny_flops / 1e6:.1f} MFLOP per UNet evaluation")
    print(f"  {args.steps} guided DDIM steps for {args.batch_size} images (+ text encoding, VAE decode): {dt:.3f} s; "
          f"{dt / args.steps * 1e3:.1f} ms per step, {dt / args.batch_size:.3f} s per image")

    # ---- 2. real SD v1 size
    unet = sd_v1_unet("meta")
    params = sum(p.numel() for p in unet.parameters())
    xm = torch.randn(2, 4, 64, 64, device="meta")
    cm = torch.randn(2, 77, 768, device="meta")
    flops = count_flops(lambda: unet(xm, torch.full((2,), 500, device="meta"), encoder_hidden_states=cm)) / 2
    from diffusers import AutoencoderKL

    from difflab.sd.load import read_config

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(read_config("vae")).eval()
    vae_flops = count_flops(lambda: vae.decode(torch.randn(1, 4, 64, 64, device="meta")))
    evals = 2 * 2 * 25 * 50 * 2  # concepts x prompts x images x steps x (cond + uncond)
    total = evals * flops + 100 * vae_flops
    print(f"SD v1 UNet: {params / 1e6:.1f} M params, {flops / 1e9:.0f} GFLOP per evaluation at 64x64 latents (512x512); "
          f"VAE decoder {vae_flops / 1e9:.0f} GFLOP per image")
    print(f"  course generation, 100 images x 50 steps x 2 (guidance) = {evals} UNet evaluations + 100 decodes "
          f"= {total / 1e15:.2f} PFLOP (CLIP text encoding is negligible)")
    print(f"  to fit 15 minutes this needs a sustained {total / 900 / 1e12:.1f} TFLOP/s "
          f"({900 / evals * 1e3:.0f} ms per UNet evaluation of one image)")
    if args.real_forward:
        del unet
        torch.manual_seed(0)
        t0 = time.perf_counter()
        real = sd_v1_unet("cpu")
        build = time.perf_counter() - t0
        x = torch.randn(2, 4, 64, 64)
        c = torch.randn(2, 77, 768)
        with torch.no_grad():
            t0 = time.perf_counter()
            real(x, torch.full((2,), 500), encoder_hidden_states=c)
            fwd = time.perf_counter() - t0
        print(f"  measured here: random init {build:.1f} s; one forward, batch 2 (one guided step of one image) {fwd:.1f} s "
              f"= {2 * flops / fwd / 1e9:.1f} GFLOP/s on this CPU")
        print(f"  => one 50-step image on this CPU: about {50 * fwd / 60:.0f} min; the course's 100 images: "
              f"about {100 * 50 * fwd / 3600:.0f} h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
