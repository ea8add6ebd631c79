"""Benchmark: 2 processes x 1 thread against 1 process x 2 threads on this machine's CPUs,
for a digit training step and for digit generation.

- train: ``difflab.digits.train.train`` with the shipped digit UNet's size (the config defaults)
  on random in-memory digits; two processes with ``--batch-size B`` each (gloo all-reduce
  of the gradients) against one process with ``2 B`` and two shards (the same rows). The
  time of a step is (time of ``--steps`` + ``--warmup`` steps - time of ``--warmup``
  steps) / ``--steps``, so set-up and the final checkpoint cancel out.
- generate: ``difflab.digits.generate.generate_course_set`` with the shipped model,
  ``--per-class`` images per digit per dataset in batches of ``--gen-batch``: two
  processes sample half the batches each, gather to the main one, which writes.

Each configuration runs in fresh processes (``torchrun --nproc_per_node 2`` with
``OMP_NUM_THREADS=1``; plain ``python`` with ``torch.set_num_threads(2)``, and for
reference with 1 thread) and is timed inside them, without interpreter and import
start-up. Prints images per second and the ratio 2 processes x 1 thread / 1 process x 2
threads (above 1: two processes are faster). On a machine whose cores are shared with
other jobs, a process with 2 threads suffers most (each step waits for its slower thread);
the 1 x 1 column shows how much.

    python benchmarks/multiprocess.py
    python benchmarks/multiprocess.py --batch-size 64 --steps 20 --per-class 20
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _data(n: int = 2000):
    """Random 28x28 RGB digits, both datasets, in memory."""
    import numpy as np

    from difflab.data import BalancedDigits, DigitSet

    rng = np.random.default_rng(0)
    return BalancedDigits([DigitSet(name, rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8), rng.integers(0, 10, n))
                           for name in ("mnistm", "svhn")])


def worker_train(args, out: Path, world: int) -> dict:
    from difflab.digits.train import TrainConfig, train

    batch = args.batch_size if world > 1 else 2 * args.batch_size
    data, seconds = _data(), []
    for steps in (args.warmup, args.warmup + args.steps):
        cfg = TrainConfig(steps=steps, batch_size=batch, warmup=1, ckpt_every=0, sample_every=0, device="cpu")
        t0 = time.perf_counter()
        train(None, out / f"run{steps}", cfg, data=data, progress=False, shards=2)
        seconds.append(time.perf_counter() - t0)
    per_step = (seconds[1] - seconds[0]) / args.steps
    return {"seconds_per_step": per_step, "images_per_s": 2 * args.batch_size / per_step}


def worker_generate(args, out: Path, world: int) -> dict:
    from difflab.digits.generate import SampleConfig, generate_course_set
    from difflab.digits.model_io import load_digit_model

    net, schedule, _ = load_digit_model(device="cpu")
    cfg = SampleConfig(steps=args.gen_steps, batch_size=args.gen_batch)
    generate_course_set(net, schedule, out / "warm", cfg, per_class=1, progress=False)  # first-call costs
    t0 = time.perf_counter()
    generate_course_set(net, schedule, out / "images", cfg, per_class=args.per_class, progress=False)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images_per_s": 20 * args.per_class / seconds}


def worker(args) -> None:
    import torch

    from difflab.processes import launched_processes

    world = launched_processes()
    if world == 1:
        torch.set_num_threads(args.threads)
    result = (worker_train if args.worker == "train" else worker_generate)(args, Path(args.out), world)
    result.update(processes=world, threads=torch.get_num_threads())
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out, "result.json").write_text(json.dumps(result))


def run(kind: str, processes: int, args, passthrough: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if processes > 1:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(port)]
        else:
            cmd = [sys.executable]
        cmd += [__file__, "--worker", kind, "--out", tmp, "--threads", str(args.threads), *passthrough]
        env = dict(os.environ, OMP_NUM_THREADS="1" if processes > 1 else str(args.threads))
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
        return json.loads(Path(tmp, "result.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32, help="training images per step per process (one process: 2x)")
    p.add_argument("--steps", type=int, default=6, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="training steps not timed")
    p.add_argument("--per-class", type=int, default=5, help="generated images per digit per dataset (x 20 in all)")
    p.add_argument("--gen-batch", type=int, default=50, help="images per generation batch")
    p.add_argument("--gen-steps", type=int, default=10, help="DDIM steps")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the one process")
    p.add_argument("--worker", choices=("train", "generate"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                   ("batch_size", "steps", "warmup", "per_class", "gen_batch", "gen_steps")]
    print(f"CPUs: {os.cpu_count()}; training: 2 x batch {args.batch_size} against 1 x batch {2 * args.batch_size}; "
          f"generation: {20 * args.per_class} images, batch {args.gen_batch}, {args.gen_steps} DDIM steps")
    single = argparse.Namespace(**{**vars(args), "threads": 1})
    for kind in ("train", "generate"):
        one, two, alone = run(kind, 1, args, passthrough), run(kind, 2, args, passthrough), run(kind, 1, single, passthrough)
        print(f"{kind:8s}  1 process x {one['threads']} threads: {one['images_per_s']:7.1f} img/s   "
              f"2 processes x {two['threads']} thread: {two['images_per_s']:7.1f} img/s   "
              f"ratio = {two['images_per_s'] / one['images_per_s']:.2f}   "
              f"(1 process x 1 thread: {alone['images_per_s']:.1f} img/s)")


if __name__ == "__main__":
    main()
