"""Does textual inversion learn? Measured on the mini SD-format model (``difflab t2i``).

    python benchmarks/mini_world.py concepts --out runs/mini_concepts
        # 5 MNIST-M images of the digit 7 (sevens/) and 5 SVHN images (svhn/; svhn_named/ adds a
        # caption file to each) from ../shared
    difflab ti train --sd src/difflab/assets/mini_sd --concept-dir runs/mini_concepts/sevens \\
        --token "<new1>" --init-word digit --out runs/mini_emb/new1.safetensors ...
    difflab ti train --sd src/difflab/assets/mini_sd --concept-dir runs/mini_concepts/svhn_named \\
        --token "<new2>" --init-word photo --property style --out runs/mini_emb/new2.safetensors ...
    python benchmarks/mini_world.py eval --embeddings runs/mini_emb/new1.safetensors runs/mini_emb/new2.safetensors

``eval`` generates 25 images per prompt, classifies each one's domain (MNIST-M or SVHN)
with a small CNN trained here on the real images, and its digit with the course
classifier of that domain (``../shared/evaluators``). It prints the rates for the
learned embeddings and for the same tokens at 0 steps (their init word's embedding),
and writes a figure of the samples.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from difflab.assets import SHIPPED_MINI_SD
from difflab.data import BalancedDigits, read_csv
from difflab.digits.evaluate import load_classifier
from difflab.io import save_grid
from difflab.personalize.generate import image_seed
from difflab.sampling import SAMPLERS
from difflab.sd.concepts import add_concept, init_vectors, read_embedding_file
from difflab.sd.load import load_sd
from difflab.sd.sample import sample_images
from difflab.t2i.captions import DIGIT_NAMES

HERE = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIFFLAB_SHARED", HERE.parent / "shared"))  # the course material

# (name, prompt, the digit whose rate is reported)
PROMPTS = (
    ("object", "a photo of the digit <new1> on a textured background", 7),
    ("object control", "a photo of a digit on a textured background", 7),
    ("style", "a photo of the digit three in the style of <new2>", 3),
    ("style control (no <new2>)", "a photo of the digit three in the style of", 3),
    ("composition", "a photo of the digit <new1> in the style of <new2>", 7),
)


# ----------------------------------------------------------------------- concepts
SEVENS_POOL = 1000  # the 7s (csv order) the clear ones are picked from; sevens_many/ starts after them


def clear_sevens(rows: list[tuple[str, int]], images: Path, evaluators: Path, n: int = 5) -> list[tuple[str, int]]:
    """The ``n`` of the MNIST-M 7s ``rows`` (files in ``images``) that the course's MNIST-M
    classifier reads as 7 by the widest margin (log p(7) minus the largest other
    log-probability): clear, upright examples, as a user would pick clear photos of a dog.
    The first ``n`` 7s in csv order mix curled 7s (read as 9-like) with a 1-like stroke."""
    import numpy as np
    from PIL import Image

    from difflab.digits.evaluate import load_classifier

    x = torch.stack([torch.from_numpy(np.array(Image.open(images / name).convert("RGB")))
                     for name, _ in rows]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        logp = load_classifier("mnistm", evaluators / "mnistm_classifier.pth")(x).log_softmax(1)
    others = logp.clone()
    others[:, 7] = float("-inf")
    margin = logp[:, 7] - others.max(1).values
    return [rows[i] for i in margin.argsort(descending=True)[:n].tolist()]


def write_concepts(data_root: Path, out: Path, n: int = 5, pick: str = "clear",
                   evaluators: Path = SHARED / "evaluators", many: int = 0) -> None:
    """``out/sevens``: ``n`` MNIST-M images labelled 7, either the ``clear`` ones (see
    :func:`clear_sevens`) or the ``first`` ones in csv order; ``out/svhn``: the first ``n``
    SVHN images whose label is neither 3 nor 7, so the style images show no digit the
    benchmark asks for. ``many`` > 0 also writes ``out/sevens_many``: the ``many`` MNIST-M
    7s that follow the first 1,000 in csv order (every colour and writing style), to ask
    what a token learns when no look is shared by all its images. ``out/svhn_named`` holds
    the images of ``out/svhn`` with a caption file each (``difflab ti train`` reads
    ``IMAGE.txt``) naming its digit: "a photo of the digit two in the style of {}", so the
    style token need not learn which digits its images show."""
    from PIL import Image

    if pick not in ("clear", "first"):
        raise ValueError(f"pick must be 'clear' or 'first', got {pick!r}")
    sevens = [r for r in read_csv(data_root / "mnistm" / "train.csv") if r[1] == 7]
    picks = {
        "sevens": clear_sevens(sevens[:SEVENS_POOL], data_root / "mnistm" / "data", evaluators, n) if pick == "clear"
        else sevens[:n],
        "svhn": [r for r in read_csv(data_root / "svhn" / "train.csv") if r[1] not in (3, 7)][:n],
    }
    if many > 0:
        picks["sevens_many"] = sevens[SEVENS_POOL:SEVENS_POOL + many]
    for folder, rows in picks.items():
        src = data_root / ("mnistm" if folder.startswith("sevens") else "svhn") / "data"
        dst = out / folder
        dst.mkdir(parents=True, exist_ok=True)
        for name, label in rows:
            Image.open(src / name).convert("RGB").save(dst / f"{label}_{Path(name).stem}.png")
        shown = [f"{name} ({label})" for name, label in rows]
        print(f"{dst}: {shown if len(shown) <= 10 else shown[:3] + ['...'] + shown[-1:]} ({len(rows)} images)")
    named = out / "svhn_named"
    named.mkdir(parents=True, exist_ok=True)
    for name, label in picks["svhn"]:
        stem = f"{label}_{Path(name).stem}"
        shutil.copyfile(out / "svhn" / f"{stem}.png", named / f"{stem}.png")
        (named / f"{stem}.txt").write_text(f"a photo of the digit {DIGIT_NAMES[label]} in the style of {{}}\n")
    print(f"{named}: the same images, each with a caption file naming its digit")


# ---------------------------------------------------------------- domain classifier
class DomainNet(nn.Module):
    """MNIST-M (0) versus SVHN (1) on 28x28 RGB in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2),
        )

    def forward(self, x):
        return self.body(x)


def train_domain_classifier(data: BalancedDigits, steps: int = 1500, seed: int = 0) -> tuple[DomainNet, float]:
    """Train on all but a held-out fifth of each dataset; return (net, held-out accuracy)."""
    g = torch.Generator().manual_seed(seed)
    splits = []
    for images in data.images:
        perm = torch.randperm(len(images), generator=g)
        cut = len(images) // 5
        splits.append((images[perm[cut:]], images[perm[:cut]]))
    torch.manual_seed(seed)
    net = DomainNet()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    to_x = lambda u8: u8.permute(0, 3, 1, 2).float() / 255  # noqa: E731
    for _ in range(steps):
        xs, ys = [], []
        for k, (train, _) in enumerate(splits):
            idx = torch.randint(len(train), (32,), generator=g)
            xs.append(to_x(train[idx]))
            ys.append(torch.full((32,), k))
        loss = F.cross_entropy(net(torch.cat(xs)), torch.cat(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for k, (_, test) in enumerate(splits):
            test = test[:2000]
            correct += int((net(to_x(test)).argmax(1) == k).sum())
            total += len(test)
    return net, correct / total


# ---------------------------------------------------------------------- evaluation
def with_embeddings(model: str, vectors: dict[str, torch.Tensor]):
    sd = load_sd(model)
    for tok, vec in vectors.items():
        add_concept(sd, tok, vec, trainable=False)
    return sd


@torch.no_grad()
def rates(images: torch.Tensor, digit: int, domain_net, digit_nets) -> tuple[float, float, list[int]]:
    """(fraction classified as ``digit``, fraction in the SVHN domain, digit predictions).
    Images [B, 3, 32, 32] in [0, 1] are resized to the course's 28x28 first."""
    x = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    domain = domain_net(x).argmax(1)
    preds = torch.where(domain == 0, digit_nets[0](x).argmax(1), digit_nets[1](x).argmax(1))
    return float((preds == digit).float().mean()), float(domain.float().mean()), preds.tolist()


def load_embeddings(files) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """token -> vectors and token -> init word (from each file's metadata)."""
    from safetensors import safe_open

    learned: dict[str, torch.Tensor] = {}
    init_words: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
        for tok, vec in read_embedding_file(f).items():
            learned[tok] = vec
            init_words[tok] = meta.get("init_word", "")
    return learned, init_words


@torch.no_grad()
def named_digit_rates(sd, domain_net, digit_nets, *, images: int, steps: int, guidance: float, seed: int = 0,
                      sampler: str = "ddim") -> dict:
    """How well the model itself follows the digit names it was trained on: for each
    trained caption that names a digit (every digit but 7, both caption forms), the
    fraction of ``images`` samples classified as that digit and as SVHN. What textual
    inversion can reach is bounded by this."""
    from difflab.t2i.captions import HELD_OUT_DIGIT, caption

    out = {}
    for dataset, form in ((0, "MNIST-M caption"), (1, "SVHN caption")):
        hits = svhn = n = 0
        for d in range(10):
            if d == HELD_OUT_DIGIT:
                continue
            prompt = caption(d, dataset, named=True)
            seeds = [image_seed(seed, prompt, 0, i) for i in range(images)]
            r_digit, r_svhn, _ = rates(sample_images(sd, prompt, seeds, steps=steps, guidance_scale=guidance, sampler=sampler), d,
                                             domain_net, digit_nets)
            hits, svhn, n = hits + r_digit * images, svhn + r_svhn * images, n + images
        out[form] = (hits / n, svhn / n)
    return out


def measure(model, embeddings, data_root, evaluators, *, images: int = 25, steps: int = 50, guidance: float = 7.5,
            seeds=(0,), named: int = 0, cases=None, log=print, sampler: str = "ddim") -> tuple[list[dict], torch.Tensor, float]:
    """Generate ``images`` per prompt of PROMPTS and per base seed in ``seeds`` (each seed
    its own starting noises) with the learned embeddings and with the same tokens at 0
    steps; return (rows, the first seed's learned-embedding images [P, N, 3, 32, 32],
    domain classifier held-out accuracy). Each row: seed, embedding, case, prompt, digit,
    rate of that digit, rate of the SVHN domain, digit predictions, seconds. The named
    digits (``named`` > 0) are sampled at the first seed."""
    evaluators, data_root = Path(evaluators), Path(data_root)
    for p in (evaluators / "mnistm_classifier.pth", evaluators / "svhn_classifier.pth", data_root / "mnistm" / "train.csv"):
        if not p.is_file():
            raise FileNotFoundError(f"missing {p}")
    unknown = set(cases or ()) - {name for name, _, _ in PROMPTS}
    if unknown:
        raise ValueError(f"unknown cases {sorted(unknown)}; the cases are {[name for name, _, _ in PROMPTS]}")
    learned, init_words = load_embeddings(embeddings)
    missing = {"<new1>", "<new2>"} - set(learned)
    if missing:
        raise ValueError(f"no embedding for {sorted(missing)} in {[str(f) for f in embeddings]}")
    t0 = time.time()
    data = BalancedDigits.from_root(data_root, progress=False)
    domain_net, domain_acc = train_domain_classifier(data)
    log(f"domain classifier (MNIST-M vs SVHN): held-out accuracy {domain_acc:.4f} ({time.time() - t0:.0f} s)")
    digit_nets = [load_classifier("mnistm", evaluators / "mnistm_classifier.pth"),
                  load_classifier("svhn", evaluators / "svhn_classifier.pth")]
    probe = load_sd(model)
    zero = {tok: init_vectors(probe, init_words[tok] or "digit", learned[tok].shape[0]) for tok in learned}
    log(f"model {model}; {images} images per prompt, {sampler} {steps} steps, guidance s={guidance}; init words {init_words}")
    if named:
        for form, (r_digit, r_svhn) in named_digit_rates(probe, domain_net, digit_nets, images=named, steps=steps,
                                                         guidance=guidance, seed=seeds[0], sampler=sampler).items():
            log(f"  named digits ({form}, {named} images x 9 digits): right digit {r_digit:.3f}, SVHN domain {r_svhn:.3f}")
    rows, shown = [], []
    prompts = [p for p in PROMPTS if cases is None or p[0] in cases]
    for label, vectors in (("learned", learned), ("0 steps", zero)):
        sd = with_embeddings(model, vectors)
        for seed in seeds:
            for name, prompt, digit in prompts:
                t = time.time()
                imgs = sample_images(sd, prompt, [image_seed(seed, name, 0, i) for i in range(images)], steps=steps,
                                     guidance_scale=guidance, sampler=sampler)
                r_digit, r_svhn, preds = rates(imgs, digit, domain_net, digit_nets)
                rows.append(dict(seed=seed, embedding=label, case=name, prompt=prompt, digit=digit, rate_digit=r_digit,
                                 rate_svhn=r_svhn, predictions=preds, seconds=time.time() - t))
                if label == "learned" and seed == seeds[0]:
                    shown.append(imgs)
                log(f"  seed {seed} {label:8s} {name:26s} {digit}: {r_digit:.2f}  SVHN: {r_svhn:.2f}  digits {preds}")
    return rows, torch.stack(shown), domain_acc


def pooled(rows: list[dict]) -> dict:
    """Rows of :func:`measure` -> {(embedding, case): (per-seed digit rates, digit rate
    over all seeds' images, SVHN rate over them)}, in the order the rows first name them.
    Every seed has the same number of images, so the rate over all is the mean."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["embedding"], r["case"]), []).append(r)
    return {k: ([r["rate_digit"] for r in v], sum(r["rate_digit"] for r in v) / len(v),
                sum(r["rate_svhn"] for r in v) / len(v)) for k, v in out.items()}


@torch.no_grad()
def name_spread(sd, t: int = 500, n: int = 8, seed: int = 0) -> float:
    """How much the digit name moves the UNet's noise prediction: the standard deviation
    across the nine trained names (MNIST-M caption) of eps(z_t, t, caption), averaged over
    ``n`` latents drawn from N(0, I) and over their elements, for a loaded model ``sd``
    (:func:`difflab.sd.load.load_sd`). A model that ignores the name gives 0."""
    from difflab.t2i.captions import HELD_OUT_DIGIT, caption

    z = torch.randn(n, sd.latent_channels, sd.resolution // sd.vae_downsample, sd.resolution // sd.vae_downsample,
                    generator=torch.Generator().manual_seed(seed))
    cond = sd.encode_text([caption(d, 0, named=True) for d in range(10) if d != HELD_OUT_DIGIT])
    eps = torch.stack([sd.unet(z, torch.full((n,), t), c[None].expand(n, -1, -1)).sample for c in cond])
    return float(eps.std(0).mean())


def load_descriptor(run: Path) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The frozen descriptor network of a ``t2i train`` run and the projection of its newest
    checkpoint (descriptor features -> the text encoder's input-embedding space)."""
    from difflab.io import load_tensors
    from difflab.t2i.descriptor import read_descriptor_net
    from difflab.training import latest_checkpoint

    run = Path(run)
    net = read_descriptor_net(run / "descriptor" / "descriptor.safetensors")
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"{run}: no checkpoint with a descriptor projection")
    w = load_tensors(ckpt / "projection_raw.safetensors")
    proj = torch.nn.Linear(w["weight"].shape[1], w["weight"].shape[0])
    proj.load_state_dict(w)
    return net, proj.eval()


@torch.no_grad()
def descriptor_embedding(run: Path, images: Path, token: str, out: Path) -> torch.Tensor:
    """The oracle of a run trained with ``--p-descriptor``: the mean projected descriptor
    of the images in ``images``, written as a textual-inversion embedding file for
    ``token``. If the model draws those digits from it, the name slot can reach them and
    the question left is whether textual inversion finds the vector."""
    from difflab.personalize.textual_inversion import list_concept_images, load_concept_image
    from difflab.sd.concepts import save_embedding

    net, projection = load_descriptor(run)
    files = list_concept_images(images)
    x = torch.stack([load_concept_image(f, 28) for f in files])
    vectors = projection(net.features(x))
    mean = vectors.mean(0, keepdim=True)
    save_embedding(out, token, mean, metadata={"init_word": "digit", "source": f"mean descriptor of {len(files)} images in {images}"})
    print(f"{out}: {token} = mean projected descriptor of {len(files)} images of {images} "
          f"(norm {float(mean.norm()):.3f}; spread across the images {float(vectors.std(0).norm()):.3f})")
    return mean


def evaluate(args) -> int:
    from difflab.sd.load import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        rows, shown, _ = measure(args.model, args.embeddings, args.data, args.evaluators, images=args.images,
                                 steps=args.steps, guidance=args.guidance, seeds=args.seeds,
                                 named=args.named, cases=args.cases, log=lambda m: print(m, flush=True),
                                 sampler=args.sampler)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    several = len(args.seeds) > 1
    print(f"\n| embedding | case | prompt | {'per seed ' + ' / '.join(map(str, args.seeds)) + ' | ' if several else ''}"
          f"rate of digit | rate SVHN domain |")
    print("|---|---|---|" + ("---|" if several else "") + "---|---|")
    first = {(r["embedding"], r["case"]): r for r in rows if r["seed"] == args.seeds[0]}
    for (label, name), (per_seed, r_digit, r_svhn) in pooled(rows).items():
        per = " / ".join(f"{x:.2f}" for x in per_seed) + " | " if several else ""
        r = first[label, name]
        print(f"| {label} | {name} | `{r['prompt']}` | {per}{r['digit']}: {r_digit:.2f} | {r_svhn:.2f} |")
    if several:
        print(f"(rates over all {args.images * len(args.seeds)} images of each prompt; per seed: the digit rate of its {args.images})")
    if args.figure:
        cols = min(args.figure_columns, shown.shape[1])
        save_grid(shown[:, :cols].flatten(0, 1), args.figure, nrow=cols)
        names = [r["case"] for r in rows if r["embedding"] == "learned"]
        print(f"\nfigure: {args.figure} (rows: {', '.join(names)}; learned embeddings)")
    print(f"total {time.time() - t0:.0f} s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("concepts", help="write the two concept folders from the digit data")
    c.add_argument("--data", default=str(SHARED / "hw2_data" / "digits"), help="digit data in the course layout")
    c.add_argument("--out", required=True, help="folder for sevens/ and svhn/")
    c.add_argument("--pick", choices=["clear", "first"], default="clear",
                   help="which 7s: the 5 the MNIST-M grader reads as 7 by the widest margin (of the first 1,000), "
                   "or the first 5 in csv order")
    c.add_argument("--evaluators", default=str(SHARED / "evaluators"), help="folder with mnistm_classifier.pth (for --pick clear)")
    c.add_argument("--many", type=int, default=0, help="also write sevens_many/: this many MNIST-M 7s after the first 1,000 (0: none)")
    e = sub.add_parser("eval", help="generate, classify and print the rates")
    e.add_argument("--model", default=str(SHIPPED_MINI_SD), help="mini SD folder (default: the shipped one)")
    e.add_argument("--embeddings", nargs="+", default=sorted(str(f) for f in (HERE / "src/difflab/assets/embeddings").rglob("*.safetensors")),
                   help="embedding files for <new1> and <new2> (default: the shipped ones)")
    e.add_argument("--data", default=str(SHARED / "hw2_data" / "digits"), help="digit data (for the domain classifier)")
    e.add_argument("--evaluators", default=str(SHARED / "evaluators"), help="folder with the two digit classifiers")
    e.add_argument("--images", type=int, default=25, help="images per prompt")
    e.add_argument("--steps", type=int, default=50, help="sampling steps")
    e.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="sampler (difflab.sampling.SAMPLERS)")
    e.add_argument("--guidance", type=float, default=7.5, help="guidance scale s (SD convention)")
    e.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[0],
                   help="base seeds of the images: each gives every prompt its own --images starting noises, and the "
                   "table reports the rates over all of them (and per seed)")
    e.add_argument("--named", type=int, default=10, help="also sample this many images for each digit name the model was "
                   "trained on (both caption forms) and report how often they show that digit (0: skip)")
    e.add_argument("--cases", nargs="+", default=None, metavar="CASE",
                   help="measure only these prompts, by case name (default: all): " + ", ".join(f"'{n}'" for n, _, _ in PROMPTS))
    e.add_argument("--figure", default="runs/mini_world.png", help="grid of samples per prompt ('' for none)")
    e.add_argument("--figure-columns", type=int, default=10, help="images per row of the figure")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sp = sub.add_parser("spread", help="how much the digit name moves each model's noise prediction (name_spread)")
    sp.add_argument("models", nargs="+", help="mini SD folders (a t2i run folder holds its newest EMA export)")
    sp.add_argument("--t", type=int, nargs="+", default=[500], help="diffusion steps to measure at")
    o = sub.add_parser("oracle", help="write the mean projected descriptor of some images as an embedding file "
                       "(a run trained with --p-descriptor); evaluate it with eval --embeddings")
    o.add_argument("run", help="the t2i run folder (descriptor/ and checkpoints/ with the projection)")
    o.add_argument("--images", required=True, help="folder of images, e.g. runs/mini_concepts/sevens")
    o.add_argument("--token", default="<new1>", help="token the vector is stored under")
    o.add_argument("--out", required=True, help="embedding file to write (.safetensors)")
    args = p.parse_args(argv)
    if args.cmd == "oracle":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        descriptor_embedding(Path(args.run), Path(args.images), args.token, Path(args.out))
        return 0
    if args.cmd == "spread":
        for m in args.models:
            sd = load_sd(m)
            print(m, " ".join(f"t={t}: {name_spread(sd, t):.4f}" for t in args.t))
        return 0
    if args.cmd == "concepts":
        write_concepts(Path(args.data), Path(args.out), pick=args.pick, evaluators=Path(args.evaluators), many=args.many)
        return 0
    return evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
