"""``difflab t2i``: the mini text-to-image model of SD v1's family, trained on captioned digits."""
from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    from difflab.sd.load import quiet_libraries
    from difflab.t2i.model import MiniConfig
    from difflab.t2i.train import T2ITrainConfig, train_t2i

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    quiet_libraries()
    model = MiniConfig(unet_channels=tuple(args.unet_channels), unet_layers_per_block=args.unet_layers_per_block,
                       attention_levels=tuple(args.attention_levels),
                       vae_channels=tuple(args.vae_channels), text_width=args.text_width, text_layers=args.text_layers,
                       text_time_embedding=args.text_time_embedding, time_scale_shift=args.time_scale_shift)
    cfg = T2ITrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, min_snr_gamma=args.min_snr_gamma,
        train_text_encoder=not args.freeze_text_encoder, p_unnamed=args.p_unnamed, p_empty=args.p_empty,
        p_descriptor=args.p_descriptor, p_held_out_unnamed=args.p_held_out_unnamed, descriptor_steps=args.descriptor_steps, init_from=args.init_from or "",
        vae_steps=args.vae_steps, vae_batch_size=args.vae_batch_size, seed=args.seed, ckpt_every=args.ckpt_every,
        sample_every=args.sample_every, export_dtype=args.export_dtype, mixed_precision=args.mixed_precision,
        device=args.device, model=model,
    )
    train_t2i(args.data, args.out, cfg, resume=args.resume, progress=not args.quiet)
    return 0


def _export(args: argparse.Namespace) -> int:
    from difflab.t2i.model import export_folder

    out = export_folder(args.run, args.out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported {args.run} -> {out} ({size / 2**20:.1f} MiB)")
    return 0


def register(subparsers) -> None:
    from difflab.t2i.model import MiniConfig
    from difflab.t2i.train import T2ITrainConfig

    tc_defaults, mc = T2ITrainConfig(), MiniConfig()
    group = subparsers.add_parser(
        "t2i", help="a small Stable-Diffusion-format text-to-image model trained on captioned digits",
        description="Train a small model of Stable Diffusion v1's family (AutoencoderKL, UNet2DConditionModel, "
        "CLIPTextModel, CLIP tokenizer) from scratch on captioned MNIST-M and SVHN digits, with the digit 7 and the "
        "phrase 'on a house number sign' held out, so that `difflab ti train` can be measured on a CPU.",
    )
    sub = group.add_subparsers(dest="command", metavar="COMMAND", required=True)
    t = sub.add_parser(
        "train", help="train the mini model into a diffusers-format folder",
        description="Stage 1 trains the VAE (--vae-steps), stage 2 the UNet and text encoder (--steps). OUT becomes "
        "a diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) that `difflab ti` loads; "
        "OUT/checkpoints/ makes the run resumable and OUT/samples/ holds sample grids.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument("--data", required=True, help="folder in the course layout: mnistm/ and svhn/ with train.csv and data/")
    t.add_argument("--out", required=True, help="output model folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out (reuses its VAE and newest checkpoint)")
    t.add_argument("--steps", type=int, default=tc_defaults.steps, help="diffusion-stage optimisation steps")
    t.add_argument("--batch-size", type=int, default=tc_defaults.batch_size, help="images per diffusion step (per process)")
    t.add_argument("--lr", type=float, default=tc_defaults.lr, help="peak AdamW learning rate of the UNet and text encoder")
    t.add_argument("--warmup", type=int, default=tc_defaults.warmup, help="linear warm-up steps, then cosine decay")
    t.add_argument("--min-snr-gamma", type=float, default=tc_defaults.min_snr_gamma, help="Min-SNR loss weighting (0: plain loss)")
    t.add_argument("--freeze-text-encoder", action="store_true", help="keep the (random) text encoder frozen instead of training it jointly")
    t.add_argument("--p-unnamed", type=float, default=tc_defaults.p_unnamed, help="probability that a digit other than 7 is captioned 'a digit' instead of its name")
    t.add_argument("--p-empty", type=float, default=tc_defaults.p_empty, help="probability of the empty caption (classifier-free guidance)")
    t.add_argument("--p-descriptor", type=float, default=tc_defaults.p_descriptor,
                   help="probability that a non-empty caption is 'a photo of the digit * ...', with the input embedding "
                   "of * replaced by a learned projection of the image's descriptor (the features of a small network "
                   "trained first on the nine named digits, never on 7s). 7s get descriptors too, so the name slot "
                   "learns to carry how any digit looks and textual inversion can reach the digit without a word. "
                   "0: off (a run cannot switch it on or off when resumed)")
    t.add_argument("--p-held-out-unnamed", type=float, default=tc_defaults.p_held_out_unnamed,
                   help="probability that a 7's caption (when not empty and not a descriptor caption) is 'a photo of "
                   "a digit ...'; otherwise its name slot holds the descriptor, as it has no name. 1: every 7 is "
                   "'a digit', so 'a digit' leans to 7. Set it to --p-unnamed to draw 'a digit' as often for 7s as for "
                   "any digit (p(7 | 'a digit') = the 7s' share). Below 1 it needs --p-descriptor > 0")
    t.add_argument("--descriptor-steps", type=int, default=tc_defaults.descriptor_steps,
                   help="training steps of the descriptor network (stage 1b, batch 128; only with --p-descriptor > 0)")
    t.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                   help="start from this `difflab t2i` model folder (e.g. src/difflab/assets/mini_sd): its VAE is "
                   "copied and its UNet and text encoder initialise the diffusion stage, which then runs --steps "
                   "steps with a fresh optimiser and schedule. The model options must match its config")
    t.add_argument("--vae-steps", type=int, default=tc_defaults.vae_steps, help="VAE training steps (stage 1)")
    t.add_argument("--vae-batch-size", type=int, default=tc_defaults.vae_batch_size, help="images per VAE step")
    t.add_argument("--unet-channels", type=int, nargs="+", default=list(mc.unet_channels), help="UNet block_out_channels")
    t.add_argument("--unet-layers-per-block", type=int, default=mc.unet_layers_per_block, help="UNet layers_per_block")
    t.add_argument("--attention-levels", type=int, nargs="+", default=list(mc.attention_levels), help="UNet levels (0 = finest) with cross-attention")
    t.add_argument("--vae-channels", type=int, nargs="+", default=list(mc.vae_channels), help="VAE block_out_channels (n levels: 2^(n-1) downsampling)")
    t.add_argument("--text-width", type=int, default=mc.text_width, help="text encoder hidden size (= UNet cross_attention_dim)")
    t.add_argument("--text-layers", type=int, default=mc.text_layers, help="text encoder layers")
    t.add_argument("--text-time-embedding", action=argparse.BooleanOptionalAction, default=mc.text_time_embedding,
                   help="also add an attention-pooled text vector to the UNet's time embedding, so every ResNet block "
                   "sees the caption (diffusers' addition_embed_type='text'), not only the cross-attention layers")
    t.add_argument("--time-scale-shift", action=argparse.BooleanOptionalAction, default=mc.time_scale_shift,
                   help="ResNet blocks apply the time (and text) embedding as a scale and shift after GroupNorm "
                   "(resnet_time_scale_shift='scale_shift'), instead of a bias before it that GroupNorm partly removes")
    t.add_argument("--seed", type=int, default=tc_defaults.seed, help="seed of initialisation and of every batch")
    t.add_argument("--ckpt-every", type=int, default=tc_defaults.ckpt_every, help="checkpoint and export every N steps (0: only at the end)")
    t.add_argument("--sample-every", type=int, default=tc_defaults.sample_every, help="sample grid every N steps (0: never)")
    t.add_argument("--export-dtype", choices=["fp16", "fp32"], default=tc_defaults.export_dtype, help="precision of the exported networks")
    t.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=tc_defaults.mixed_precision, help="Accelerate mixed precision")
    t.add_argument("--device", default=tc_defaults.device, help="auto | cpu | cuda (several GPUs: `accelerate launch`)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    x = sub.add_parser(
        "export", help="copy a run's model (without checkpoints and samples) into a folder, e.g. the shipped one",
        description="Copy unet/ vae/ text_encoder/ tokenizer/ scheduler/ and mini_sd.json of a `t2i train` run "
        "(its newest export, the EMA weights) into OUT, replacing OUT in one rename. The shipped model is made with "
        "`difflab t2i export runs/mini-sd --out src/difflab/assets/mini_sd`.",
    )
    x.add_argument("run", help="the --out folder of `difflab t2i train`")
    x.add_argument("--out", required=True, help="destination model folder (replaced)")
    x.set_defaults(func=_export)
