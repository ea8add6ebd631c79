"""``difflab digits ...``: train, generate, evaluate, figures, export."""
from __future__ import annotations

import argparse
from pathlib import Path


def _default_evaluators() -> Path:
    """``$DIFFLAB_SHARED/evaluators``, else ``../shared/evaluators`` beside the working
    directory or beside the repository checkout (the course-material layout)."""
    import os

    candidates = []
    if os.environ.get("DIFFLAB_SHARED"):
        candidates.append(Path(os.environ["DIFFLAB_SHARED"]) / "evaluators")
    candidates += [Path.cwd().parent / "shared" / "evaluators",
                   Path(__file__).resolve().parents[3].parent / "shared" / "evaluators"]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("digits", help="Problem 1: conditional digit diffusion (MNIST-M, SVHN)",
                       description="Train, sample, evaluate and plot the class-conditional digit model.")
    s = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from difflab.digits.generate import SampleConfig
    from difflab.digits.train import TrainConfig
    from difflab.nets.digit_unet import DigitUNetConfig

    tc, mc, sc = TrainConfig(), DigitUNetConfig(), SampleConfig()

    t = s.add_parser("train", help="train a digit model (Accelerate: CPU, GPU, multi-GPU, mixed precision)",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--data", required=True, help="folder in the course layout: mnistm/ and svhn/ with train.csv and data/")
    t.add_argument("--out", required=True, help="run folder: checkpoints/, samples/, train_config.json")
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    t.add_argument("--steps", type=int, default=tc.steps, help="total optimisation steps")
    t.add_argument("--batch-size", type=int, default=tc.batch_size, help="images per step (per process)")
    t.add_argument("--lr", type=float, default=tc.lr, help="peak AdamW learning rate (warm-up, then cosine decay)")
    t.add_argument("--warmup", type=int, default=tc.warmup, help="linear warm-up steps")
    t.add_argument("--ema-decay", type=float, default=tc.ema_decay, help="EMA decay of the saved weights")
    t.add_argument("--p-uncond-digit", type=float, default=tc.p_uncond_digit, help="probability of dropping the digit label")
    t.add_argument("--p-uncond-dataset", type=float, default=tc.p_uncond_dataset, help="probability of dropping the dataset label")
    t.add_argument("--min-snr-gamma", type=float, default=tc.min_snr_gamma,
                   help="weight each step's loss by min(SNR, gamma)/SNR (Min-SNR, Hang et al. 2023); 0 = plain DDPM loss")
    t.add_argument("--schedule", choices=["linear", "cosine"], default=tc.schedule, help="noise schedule (linear = course betas)")
    t.add_argument("--channels", type=int, default=mc.channels, help="UNet base width")
    t.add_argument("--channel-mults", type=int, nargs="+", default=list(mc.channel_mults), help="width multiplier per resolution level")
    t.add_argument("--num-res-blocks", type=int, default=mc.num_res_blocks, help="residual blocks per level")
    t.add_argument("--attention-levels", type=int, nargs="*", default=list(mc.attention_levels), help="levels with self-attention (0 = finest)")
    t.add_argument("--patch", type=int, default=mc.patch, help="pixel-unshuffle factor before the UNet (2: 28x28x3 -> 14x14x12)")
    t.add_argument("--seed", type=int, default=tc.seed, help="seed of initialisation and of every batch")
    t.add_argument("--ckpt-every", type=int, default=tc.ckpt_every, help="checkpoint every N steps (0: only at the end)")
    t.add_argument("--sample-every", type=int, default=tc.sample_every, help="write a sample grid every N steps (0: never)")
    t.add_argument("--keep-checkpoints", type=int, default=tc.keep_checkpoints, help="how many checkpoints to keep")
    t.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=tc.mixed_precision, help="Accelerate mixed precision")
    t.add_argument("--device", default=tc.device, help="auto | cpu | cuda (multi-GPU: launch with `accelerate launch`)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    g = s.add_parser("generate", help="write the course's 1,000 images (50 per digit per dataset)",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--ckpt", default=None, help="model folder, run folder or model.safetensors (default: the shipped model)")
    g.add_argument("--out", required=True, help="output folder; writes mnistm/D_KKK.png and svhn/D_KKK.png")
    _sampling_args(g, sc)
    g.add_argument("--per-class", type=int, default=50, help="images per digit per dataset")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)

    e = s.add_parser("evaluate", help="score generated digits with the pretrained classifiers (course grader output)",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("out", help="folder with mnistm/ and svhn/ images named D_*.png (D = label)")
    e.add_argument("--mnistm-classifier", default=None, help="MNIST-M grader state dict (default: ../shared/evaluators/mnistm_classifier.pth)")
    e.add_argument("--svhn-classifier", default=None, help="SVHN classifier state dict (default: ../shared/evaluators/svhn_classifier.pth)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.set_defaults(func=_evaluate)

    f = s.add_parser("figures", help="report figures: 10x10 grids, the reverse process of a '0', eta grid and slerp/lerp rows per dataset",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("--ckpt", default=None, help="model folder, run folder or model.safetensors (default: the shipped model)")
    f.add_argument("--out", required=True, help="folder for grid_*.png, reverse_*.png, eta_grid_*.png (digits 0-3 x eta 0..1) and "
                   "interpolation_*.png (an 8 along slerp, then lerp, alpha 0..1), * = mnistm, svhn")
    _sampling_args(f, sc)
    f.set_defaults(func=_figures)

    x = s.add_parser("export", help="copy a run's newest EMA weights into a small model folder (what ships)",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    x.add_argument("run", help="training run folder (or a checkpoint folder)")
    x.add_argument("--out", required=True, help="model folder to write: config.json + model.safetensors")
    x.set_defaults(func=_export)


def _sampling_args(p: argparse.ArgumentParser, sc) -> None:
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default=sc.sampler, help="ddim (few steps) or ddpm (all 1000 ancestral steps)")
    p.add_argument("--steps", type=int, default=sc.steps, help="DDIM steps, uniform over 1000")
    p.add_argument("--guidance", type=float, default=sc.guidance,
                   help="classifier-free guidance w: eps = (1+w) eps_cond - w eps_uncond (0: no guidance)")
    p.add_argument("--guide-on", choices=["both", "digit", "dataset"], default=sc.guide_on,
                   help="which condition the unconditional branch drops")
    p.add_argument("--eta", type=float, default=sc.eta, help="DDIM eta (0: deterministic)")
    p.add_argument("--clip-x0", type=float, default=sc.clip_x0, help="clip predicted x0 to +-this each step (<=0: off)")
    p.add_argument("--batch-size", type=int, default=sc.batch_size, help="images per forward batch (doubled for guidance)")
    p.add_argument("--seed", type=int, default=sc.seed, help="seed of the starting noise; the same seed gives identical files")
    p.add_argument("--device", default=sc.device, help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _sample_config(args):
    from difflab.digits.generate import SampleConfig

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = SampleConfig(sampler=args.sampler, steps=args.steps, guidance=args.guidance, guide_on=args.guide_on,
                       eta=args.eta, clip_x0=args.clip_x0 if args.clip_x0 and args.clip_x0 > 0 else None,
                       batch_size=args.batch_size, seed=args.seed, device=args.device)
    cfg.validate()
    return cfg


def _load(args, cfg):
    from difflab.devices import resolve_device
    from difflab.digits.model_io import SHIPPED_DIR, load_digit_model

    return load_digit_model(args.ckpt or SHIPPED_DIR, device=resolve_device(cfg.device))


def _train(args) -> int:
    from difflab.digits.figures import training_sample_fn
    from difflab.digits.train import TrainConfig, train
    from difflab.nets.digit_unet import DigitUNetConfig

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = DigitUNetConfig(channels=args.channels, channel_mults=tuple(args.channel_mults), num_res_blocks=args.num_res_blocks,
                            attention_levels=tuple(args.attention_levels), patch=args.patch)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
                      p_uncond_digit=args.p_uncond_digit, p_uncond_dataset=args.p_uncond_dataset, min_snr_gamma=args.min_snr_gamma, schedule=args.schedule,
                      seed=args.seed, ckpt_every=args.ckpt_every, sample_every=args.sample_every,
                      keep_checkpoints=args.keep_checkpoints, mixed_precision=args.mixed_precision, device=args.device, model=model)
    train(args.data, args.out, cfg, resume=args.resume, progress=not args.quiet, sample_fn=training_sample_fn)
    return 0


def _generate(args) -> int:
    from difflab.digits.generate import generate_course_set

    cfg = _sample_config(args)
    net, schedule, _ = _load(args, cfg)
    seconds = generate_course_set(net, schedule, args.out, cfg, per_class=args.per_class, progress=not args.quiet)
    print(f"wrote {2 * 10 * args.per_class} images to {args.out} in {seconds:.1f} s")
    return 0


def _evaluate(args) -> int:
    from difflab.devices import resolve_device
    from difflab.digits.evaluate import evaluate_folder, format_report

    ev = _default_evaluators()
    m = args.mnistm_classifier or ev / "mnistm_classifier.pth"
    s = args.svhn_classifier or ev / "svhn_classifier.pth"
    result = evaluate_folder(args.out, m, s, device=resolve_device(args.device))
    print(format_report(result))
    return 0


def _figures(args) -> int:
    from difflab.digits.figures import write_figures

    cfg = _sample_config(args)
    net, schedule, _ = _load(args, cfg)
    for path in write_figures(net, schedule, args.out, cfg):
        print(path)
    return 0


def _export(args) -> int:
    import shutil

    from difflab.digits.model_io import resolve_model_dir
    from difflab.io import load_json, save_json

    src = resolve_model_dir(args.run)
    out = Path(args.out)
    meta = load_json(src / "config.json")
    out.mkdir(parents=True, exist_ok=True)
    save_json(meta, out / "config.json")
    from difflab.io import atomic_path

    with atomic_path(out / "model.safetensors") as tmp:
        shutil.copyfile(src / "model.safetensors", tmp)
    print(f"exported {src} -> {out}")
    return 0
