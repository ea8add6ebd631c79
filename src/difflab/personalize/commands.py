"""``difflab ti``: textual inversion on Stable Diffusion v1.x (train, generate)."""
from __future__ import annotations

import argparse

SD_HELP = (
    "Stable Diffusion v1.x: an original single-file checkpoint (sd-v1-4.ckpt or .safetensors, "
    "CompVis key names) or a diffusers-format folder with unet/ vae/ text_encoder/ tokenizer/"
)
TOKENIZER_HELP = (
    "folder with the CLIP tokenizer's vocab.json and merges.txt. A single-file checkpoint carries no "
    "tokenizer; without this option it is taken from $DIFFLAB_SD_TOKENIZER, a tokenizer/ folder beside "
    "the checkpoint, or the local Hugging Face cache of openai/clip-vit-large-patch14 (never downloaded)"
)
CONFIG_HELP = (
    "folder with unet, vae, text_encoder (and scheduler) configs as NAME.json or NAME/config.json, for a "
    "single-file checkpoint of another size (default: the SD v1 configs carried by difflab)"
)


def _train(args: argparse.Namespace) -> int:
    from difflab.personalize.textual_inversion import TrainConfig, train_textual_inversion
    from difflab.sd.load import quiet_libraries

    quiet_libraries()
    cfg = TrainConfig(
        sd=args.sd, concept_dir=args.concept_dir, token=args.token, init_word=args.init_word, out=args.out,
        property=args.property, templates=args.templates, num_vectors=args.num_vectors, steps=args.steps, lr=args.lr,
        weight_decay=args.weight_decay, batch_size=args.batch_size, resolution=args.resolution, flip_p=args.flip_p, seed=args.seed,
        resume=args.resume, embeddings=list(args.embeddings), validation_prompt=args.validation_prompt,
        validation_every=args.validation_every, validation_images=args.validation_images,
        validation_steps=args.validation_steps, guidance=args.guidance, save_every=args.save_every,
        mixed_precision=args.mixed_precision, device=args.device, tokenizer=args.tokenizer,
        config_dir=args.config_dir, quiet=args.quiet,
    )
    out = train_textual_inversion(cfg)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from difflab.personalize.generate import GenerateConfig, generate_from_json
    from difflab.sd.load import quiet_libraries

    quiet_libraries()
    cfg = GenerateConfig(
        json=args.json, out=args.out, sd=args.sd, embeddings=tuple(args.embeddings), guidance=args.guidance,
        steps=args.steps, images_per_prompt=args.images_per_prompt, batch_size=args.batch_size, seed=args.seed,
        height=args.height, width=args.width, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
        config_dir=args.config_dir, quiet=args.quiet,
    )
    paths = generate_from_json(cfg)
    if not args.quiet:
        print(f"wrote {len(paths)} images under {args.out}")
    return 0


def register(subparsers) -> None:
    group = subparsers.add_parser(
        "ti", help="textual inversion on Stable Diffusion v1.x (Problem 3)",
        description="Learn new-token embeddings for a concept (train) and generate the course's images (generate).",
    )
    sub = group.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser(
        "train", help="learn a token's embedding from a folder of images",
        description="Textual inversion: learn the embedding of a new token from a few images. Only the new "
        "token's rows are trained; every network weight and every other embedding row stays frozen. "
        "Run under `accelerate launch` for several GPUs.",
    )
    t.add_argument("--sd", required=True, help=SD_HELP)
    t.add_argument("--concept-dir", required=True, help="folder of images of the concept (.jpg .jpeg .png .webp .bmp). An image may have a caption file "
                   "beside it, the same name ending in .txt (00.png: 00.txt), in the --templates format; its templates "
                   "replace the others for that image, e.g. to name what the image shows besides the concept")
    t.add_argument("--token", required=True, help='the new token, e.g. "<new1>" (must not be in the vocabulary)')
    t.add_argument("--init-word", required=True, help="word whose embedding initialises the token, e.g. dog or painting")
    t.add_argument("--out", required=True, help="output .safetensors: {token: [num_vectors, width]}, readable by diffusers' load_textual_inversion")
    t.add_argument("--property", choices=["object", "style"], default="object", help="caption templates: an object ('a photo of a <tok>') or a style ('a painting in the style of <tok>') (default: object)")
    t.add_argument("--templates", default=None, metavar="FILE", help="caption templates to train with instead of --property's: a text file, one template per line with {} where the token goes (blank lines and # comments skipped)")
    t.add_argument("--num-vectors", type=int, default=1, help="embedding vectors for the token; >1 adds tokens TOKEN_1 .. TOKEN_{n-1} (default: 1)")
    t.add_argument("--steps", type=int, default=3000, help="optimisation steps (default: 3000)")
    t.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3)")
    t.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay on the new rows (default: 1e-2)")
    t.add_argument("--batch-size", type=int, default=4, help="images per step, per process (default: 4)")
    t.add_argument("--resolution", type=int, default=None, help="training image size (default: the model's native size, 512 for SD v1)")
    t.add_argument("--flip-p", type=float, default=0.5, help="probability that a training image is mirrored left-right "
                   "(default: 0.5, as SD textual inversion usually trains); use 0 when a mirror changes the concept: "
                   "digits, letters, text, asymmetric objects")
    t.add_argument("--seed", type=int, default=0, help="seed of every random choice in training (default: 0)")
    t.add_argument("--resume", default=None, help="resume from a state file OUT.state.safetensors written by an earlier run")
    t.add_argument("--embeddings", nargs="*", default=[], metavar="FILE", help="other learned embeddings to load (frozen), so several concepts live in one model")
    t.add_argument("--validation-prompt", default=None, help="prompt for validation images (use the token in it); none: no validation")
    t.add_argument("--validation-every", type=int, default=500, help="steps between validation grids (default: 500)")
    t.add_argument("--validation-images", type=int, default=4, help="images per validation grid (default: 4)")
    t.add_argument("--validation-steps", type=int, default=50, help="DDIM steps for validation images (default: 50)")
    t.add_argument("--guidance", type=float, default=7.5, help="guidance scale for validation images (default: 7.5)")
    t.add_argument("--save-every", type=int, default=500, help="steps between embedding snapshots OUT-stepNNNNNN.safetensors and the resume state (default: 500)")
    t.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="Accelerate mixed precision; frozen networks are cast to it (GPU only; default: no)")
    t.add_argument("--device", default=None, help="cpu to force the CPU (default: Accelerate's choice: the GPU when there is one)")
    t.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    t.add_argument("--config-dir", default=None, help=CONFIG_HELP)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    g = sub.add_parser(
        "generate", help="the course's generation: N images per prompt for every concept in a JSON",
        description="For every concept key K and prompt index P of the JSON, write OUT/K/P/sourceK_promptP_I.png "
        "for I = 0 .. images-per-prompt - 1, with DDIM and classifier-free guidance. Every input is checked "
        "(JSON, embeddings for each token_name, widths) before any image is generated.",
    )
    g.add_argument("--json", required=True, help="the course's input.json: {key: {token_name, prompt: [...]}}")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--sd", default=None, help=SD_HELP + ". Default: the shipped mini model trained on captioned digits "
                   "(src/difflab/assets/mini_sd, see `difflab t2i train`) with its shipped embeddings")
    g.add_argument("--embeddings", nargs="*", default=[], metavar="FILE", help="learned embedding files (token -> [n, width]); they win over the ones shipped in difflab/assets/embeddings")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale s, SD convention (1 = none; default: 7.5)")
    g.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    g.add_argument("--images-per-prompt", type=int, default=25, help="images per prompt (default: 25)")
    g.add_argument("--batch-size", type=int, default=5, help="images per forward pass (default: 5); images do not depend on it")
    g.add_argument("--seed", type=int, default=0, help="base seed; each image's seed comes from (seed, key, prompt, index) (default: 0)")
    g.add_argument("--height", type=int, default=None, help="image height (default: the model's native size, 512 for SD v1)")
    g.add_argument("--width", type=int, default=None, help="image width (default: the model's native size)")
    g.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="network precision; fp16/bf16 on a GPU only (default: fp32)")
    g.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    g.add_argument("--config-dir", default=None, help=CONFIG_HELP)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)
