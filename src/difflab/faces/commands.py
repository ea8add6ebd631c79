"""``difflab faces ...``: Problem 2 commands (generate, mse, eta-grid, interpolate)."""
from __future__ import annotations

import argparse

RECIPE_NOTE = (
    "Recipe defaults reproduce the recipe in ../shared/specs/face_unet.md that matched the "
    "course's ground-truth images: DDIM on the linear betas linspace(1e-4, 2e-2, 1000), "
    "50 steps 981, 961, ..., 1, eta 0, the last step landing on t=0 with alpha_bar[0], x0 "
    "clipped to [-1, 1] without recomputing eps, and each image min-max normalised."
)


def _clip(value: str):
    if value.lower() == "none":
        return None
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {value!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {value!r}")
    return v


def _add_recipe(p: argparse.ArgumentParser, eta: bool = True) -> None:
    g = p.add_argument_group("DDIM recipe (defaults = the course ground-truth recipe)")
    g.add_argument("--steps", type=int, default=50,
                   help="number of DDIM steps, uniform over T=1000 (default 50: the course's setting)")
    if eta:
        g.add_argument("--eta", type=float, default=0.0,
                       help="DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like noise (default 0: the graded images use eta 0)")
    g.add_argument("--offset", type=int, default=1,
                   help="step offset: steps are offset + k*stride, so 1 gives 981, ..., 21, 1 "
                        "(default 1: the grid that matched the ground truth; 0 gives 980, ..., 0)")
    g.add_argument("--clip-x0", type=_clip, default=1.0, metavar="C|none",
                   help="clip the predicted x0 to [-C, C] at each step; the direction term keeps the "
                        "predicted eps ('none' disables; default 1.0: the ground-truth recipe clips to [-1, 1])")
    g.add_argument("--last-prev", type=int, choices=(0, -1), default=0,
                   help="where the final step lands: 0 = step t=0 using alpha_bar[0], -1 = the clean "
                        "image (alpha_bar = 1) (default 0: the ground-truth recipe goes from t=1 to t=0)")
    g.add_argument("--normalize", choices=("minmax", "clamp"), default="minmax",
                   help="map each final image to [0, 1]: per-image min-max, or clamp((x+1)/2) "
                        "(default minmax: the ground-truth images were min-max normalised)")


def _add_run(p: argparse.ArgumentParser, batch: int = 0, why: str = "") -> None:
    g = p.add_argument_group("execution")
    if batch:
        g.add_argument("--batch-size", type=int, default=batch,
                       help=f"images sampled together (default {batch}: {why})")
    g.add_argument("--device", default="auto",
                   help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ... (default auto)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed for the per-step noise when eta > 0 (unused at eta 0, which is deterministic; default 0)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _recipe(args, eta: float = 0.0):
    from difflab.faces.generate import FaceSampling

    return FaceSampling(steps=args.steps, eta=getattr(args, "eta", eta), offset=args.offset,
                        clip_x0=args.clip_x0, last_prev=args.last_prev, normalize=args.normalize)


def _cmd_generate(args) -> int:
    from difflab.faces.generate import generate_dir

    recipe = _recipe(args)
    paths = generate_dir(args.noise, args.out, args.unet, recipe, batch_size=args.batch_size,
                         device=args.device, seed=args.seed, progress=not args.quiet)
    print(f"wrote {len(paths)} images to {args.out}")
    return 0


def _cmd_mse(args) -> int:
    from difflab.faces.mse import folder_mse

    scores = folder_mse(args.out, args.gt)
    for name, v in scores.items():
        print(f"{name}\t{v:.4f}")
    mean = sum(scores.values()) / len(scores)
    verdict = "ok" if mean <= args.max else "FAIL"
    print(f"mean\t{mean:.4f}\t({len(scores)} images, max {args.max:g}: {verdict})")
    return 0 if mean <= args.max else 1


def _load(args, names):
    from difflab.devices import resolve_device
    from difflab.faces.generate import face_denoiser, load_noise_dir
    from difflab.faces.model_io import load_face_unet

    _, noise = load_noise_dir(args.noise, names)
    dev = resolve_device(args.device)
    den = face_denoiser(load_face_unet(args.unet), dev)
    return noise, den, dev


def _cmd_eta_grid(args) -> int:
    from difflab.faces.figures import eta_grid, save_eta_grid

    noise, den, dev = _load(args, args.names)
    grid = eta_grid(den, noise, args.etas, _recipe(args), seed=args.seed, device=dev, progress=not args.quiet)
    save_eta_grid(grid, args.out)
    print(f"wrote {args.out}: rows eta {', '.join(f'{e:g}' for e in args.etas)}; columns {', '.join(args.names)}")
    return 0


def _cmd_interpolate(args) -> int:
    from difflab.faces.figures import interpolate_noises, interpolation_rows, relative_norms, save_interpolation

    noise, den, dev = _load(args, args.pair)
    z0, z1 = noise[0:1], noise[1:2]
    for method in ("slerp", "lerp"):
        norms = relative_norms(interpolate_noises(z0, z1, args.alphas, method))
        print(f"{method} |z|/sqrt(d): " + " ".join(f"{a:g}:{n:.3f}" for a, n in zip(args.alphas, norms)))
    rows = interpolation_rows(den, z0, z1, args.alphas, _recipe(args), device=dev, batch_size=args.batch_size,
                              seed=args.seed, progress=not args.quiet)
    paths = save_interpolation(rows, args.out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def register(subparsers) -> None:
    grp = subparsers.add_parser("faces", help="Problem 2: DDIM with the course's 256x256 face UNet",
                                description="Problem 2: DDIM with the course's 256x256 face UNet (UNet.pt).")
    sub = grp.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("generate", help="one PNG per noise file (what hw2_2.sh runs)",
                       description="DDIM from every NOISE/*.pt ([1,3,H,W] or [3,H,W]) to OUT/<stem>.png. "
                                   "All inputs are checked before sampling; images are written at the end, "
                                   "each atomically. " + RECIPE_NOTE)
    p.add_argument("--noise", required=True, help="folder of noise files *.pt (e.g. hw2_data/face/noise)")
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.add_argument("--unet", required=True, help="the course's UNet.pt (a state dict; read with weights_only=True)")
    _add_recipe(p)
    _add_run(p, 10, "all ten course noises in one batch")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("mse", help="per-image and mean MSE against ground truth (0-255 RGB)",
                       description="MSE on 0-255 RGB pixels, mean over all pixels and channels, for each "
                                   "ground-truth image against the generated image of the same file name; "
                                   "prints each and the mean; exits 1 when the mean exceeds --max.")
    p.add_argument("out", help="folder of generated images")
    p.add_argument("gt", help="folder of ground-truth images (e.g. hw2_data/face/GT)")
    p.add_argument("--max", type=float, default=20.0, help="fail (exit 1) when the mean MSE is above this (default 20: the course baseline)")
    p.set_defaults(func=_cmd_mse)

    p = sub.add_parser("eta-grid", help="figure: noises as columns, eta values as rows, one PNG",
                       description="One PNG grid: columns are the noises --names, rows the eta values --etas. "
                                   "Each row's per-step noise is seeded with --seed. " + RECIPE_NOTE)
    p.add_argument("--noise", required=True, help="folder of noise files *.pt")
    p.add_argument("--unet", required=True, help="face UNet weights (UNet.pt)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--names", nargs="+", default=["00", "01", "02", "03"], help="noise file stems, one column each (default 00 01 02 03)")
    p.add_argument("--etas", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="eta per row (default 0 0.25 0.5 0.75 1)")
    _add_recipe(p, eta=False)
    _add_run(p)
    p.set_defaults(func=_cmd_eta_grid)

    p = sub.add_parser("interpolate", help="figure: slerp and lerp between two noises",
                       description="DDIM along slerp and lerp paths between two noises; writes OUT/interpolation.png "
                                   "(slerp row above lerp row), OUT/slerp.png and OUT/lerp.png, and prints |z|/sqrt(d) "
                                   "for each interpolated noise (lerp's shrinks towards alpha 0.5). " + RECIPE_NOTE)
    p.add_argument("--noise", required=True, help="folder of noise files *.pt")
    p.add_argument("--unet", required=True, help="face UNet weights (UNet.pt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pair", nargs=2, default=["00", "01"], metavar=("A", "B"), help="the two noise stems (default 00 01)")
    p.add_argument("--alphas", nargs="+", type=float, default=[round(0.1 * i, 1) for i in range(11)],
                   help="interpolation weights (default 0.0, 0.1, ..., 1.0)")
    _add_recipe(p)
    _add_run(p, 11, "one row of eleven alphas per batch")
    p.set_defaults(func=_cmd_interpolate)

