"""Benchmark: DDIM with the full-size course face UNet (113.7M values, random weights,
the course's state-dict layout), our sampler against a plain reference loop.

- ours: ``difflab.faces.generate.sample_faces`` over ``FaceDenoiser`` -- inference_mode,
  NCHW unless ``--channels-last on``, the course recipe.
- reference: the loop a student writes: ``torch.no_grad()``, fp32, NCHW, one network call
  and the DDIM update per step (same steps, same clipping, same network object).

Each (sampler, batch) runs in a fresh subprocess, so the peak memory it reports is its
own: CUDA ``max_memory_allocated``, or on the CPU the process's peak RSS (ru_maxrss).
With ``--repeats N`` each configuration is timed N times and the fastest run is kept.
Prints seconds per DDIM step, per-image throughput, peak memory and ours/reference.

    python benchmarks/faces.py --steps 2              # CPU: a few steps are enough
    python benchmarks/faces.py --steps 50 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(impl: str, batch: int, args) -> dict:
    import numpy as np
    import torch

    from difflab.devices import resolve_device
    from difflab.faces.generate import FaceSampling, face_denoiser, sample_faces
    from difflab.nets.face_unet import FaceUNet

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = FaceUNet().eval().requires_grad_(False)  # random weights, course layout
    recipe = FaceSampling(steps=args.steps)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch, 3, args.size, args.size, generator=g)

    if impl == "ours":
        den = face_denoiser(model, device, channels_last=args.channels_last == "on")

        def work():
            return sample_faces(den, noise, recipe, batch_size=batch, device=device)
    else:
        model = model.to(device)
        betas = np.linspace(1e-4, 2e-2, 1000, dtype=np.float64)
        abar = np.cumprod(1 - betas).astype(np.float32)
        ts = recipe.timesteps().tolist()

        def work():
            with torch.no_grad():
                x = noise.to(device)
                for i, t in enumerate(ts):
                    prev = ts[i + 1] if i + 1 < len(ts) else 0
                    a_t, a_p = float(abar[t]), float(abar[prev])
                    eps = model(x, torch.full((x.shape[0],), t, device=device, dtype=torch.long))
                    x0 = ((x - (1 - a_t) ** 0.5 * eps) / a_t**0.5).clamp(-1, 1)
                    x = a_p**0.5 * x0 + (1 - a_p) ** 0.5 * eps
                lo = x.amin(dim=(1, 2, 3), keepdim=True)
                hi = x.amax(dim=(1, 2, 3), keepdim=True)
                return ((x - lo) / (hi - lo)).cpu()

    # Warm-up: library/thread-pool start-up (and cuDNN algorithm choice on CUDA).
    with torch.no_grad():
        wsize = args.size if device.type == "cuda" else 32
        model(torch.randn(1, 3, wsize, wsize, device=device), torch.zeros(1, dtype=torch.long, device=device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        out = work()
        _sync(device)
        times.append(time.perf_counter() - start)
    elapsed = min(times)  # the least disturbed run on a shared machine
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        peak_kind = "CUDA max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_kind = "peak RSS"
    return {
        "impl": impl, "batch": batch, "seconds": elapsed, "per_step": elapsed / args.steps,
        "peak_mib": peak, "peak_kind": peak_kind, "device": str(device), "threads": torch.get_num_threads(),
        "checksum": float(out.double().sum()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="DDIM steps timed per run (default 2; the course uses 50)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes (default 1 4)")
    p.add_argument("--size", type=int, default=256, help="image side (default 256, the course's)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda (default auto)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default)")
    p.add_argument("--channels-last", choices=("on", "off"), default="off",
                   help="channels_last for our sampler (default off, as difflab samples; on an H200 it was slower)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per configuration; the fastest is reported (default 1)")
    p.add_argument("--skip-reference", action="store_true", help="time only our sampler")
    p.add_argument("--one", nargs=2, metavar=("IMPL", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args)))
        return 0

    passthrough = ["--steps", str(args.steps), "--size", str(args.size), "--device", args.device,
                   "--threads", str(args.threads), "--channels-last", args.channels_last, "--repeats", str(args.repeats)]
    results = {}
    impls = ["ours"] + ([] if args.skip_reference else ["reference"])
    for batch in args.batches:
        for impl in impls:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", impl, str(batch), *passthrough]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return r.returncode
            res = json.loads(r.stdout.strip().splitlines()[-1])
            results[(impl, batch)] = res
            print(f"{impl:9s} batch {batch}: {res['per_step']:.3f} s/step, {res['per_step'] / batch:.3f} s/step/image, "
                  f"{res['peak_kind']} {res['peak_mib']:.0f} MiB  [{res['device']}, {res['threads']} threads, "
                  f"{args.steps} steps, {args.size}x{args.size}]", flush=True)
    if not args.skip_reference:
        for batch in args.batches:
            o, r = results[("ours", batch)], results[("reference", batch)]
            same = abs(o["checksum"] - r["checksum"]) <= 1e-3 * max(1.0, abs(r["checksum"]))
            print(f"batch {batch}: ours/reference time ratio {o['seconds'] / r['seconds']:.3f} "
                  f"(outputs {'agree' if same else 'DIFFER'}: checksums {o['checksum']:.3f} vs {r['checksum']:.3f})")
    per_image = results[("ours", max(args.batches))]["per_step"] / max(args.batches)
    if args.size == 256:
        print(f"estimate for the course job (10 images x 50 steps) at batch {max(args.batches)}: "
              f"{per_image * 10 * 50 / 60:.1f} min on {results[('ours', max(args.batches))]['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
