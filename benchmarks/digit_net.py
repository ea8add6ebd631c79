"""Throughput of the digit UNet alone: milliseconds per image per network evaluation, and the
kernel (system) time within it, for each batch of rows, precision and memory layout.

    python benchmarks/digit_net.py                         # the shipped model, 2 threads
    python benchmarks/digit_net.py --rows 100 200 1000 --precision fp32 bf16 --layout nchw nhwc

``nhwc`` hands the network channels_last input (what ``digits generate`` does on a CPU);
``nchw`` the default contiguous layout.

A guided sampling step of ``--batch-size B`` images is one evaluation of 2B rows. Each cell
evaluates at least ``--images`` rows after one warm-up call.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from difflab.devices import autocast_fn
from difflab.digits.model_io import load_digit_model


def per_image(net, rows: int, dtype, images: int, layout: str = "nchw") -> tuple[float, float]:
    """(wall ms, system ms) per image-evaluation at ``rows`` rows per call."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 3, 28, 28, generator=g)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(1000, (rows,), generator=g)
    digit, dataset = torch.randint(10, (rows,), generator=g), torch.randint(2, (rows,), generator=g)
    fn = autocast_fn(net, "cpu", dtype)
    with torch.inference_mode():
        fn(x, t, digit, dataset)
        r0, t0, done = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
        while done < images:
            fn(x, t, digit, dataset)
            done += rows
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return 1000 * wall / done, 1000 * (r1.ru_stime - r0.ru_stime) / done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="model folder (default: the shipped model)")
    p.add_argument("--rows", type=int, nargs="+", default=[100, 200, 500, 1000], help="rows per network call")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--layout", nargs="+", default=["nchw", "nhwc"], choices=["nchw", "nhwc"],
                   help="memory layout of the input (nhwc: channels_last)")
    p.add_argument("--images", type=int, default=2000, help="rows evaluated per cell (at least)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, _, _ = load_digit_model(args.ckpt) if args.ckpt else load_digit_model()
    net.eval()
    print(f"{args.threads} threads; ms per image per network evaluation (system time in brackets)")
    cols = [(name, layout) for name in args.precision for layout in args.layout]
    print("| rows per call | " + " | ".join(f"{name} {layout}" for name, layout in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for rows in args.rows:
        cells = []
        for name, layout in cols:
            wall, sys_ms = per_image(net, rows, torch.bfloat16 if name == "bf16" else None, args.images, layout)
            cells.append(f"{wall:.2f} ({sys_ms:.2f})")
        print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
