"""Does textual inversion learn? Measured on the mini SD-format model (``difflab t2i``).

    python benchmarks/mini_world.py concepts --out runs/mini_concepts
        # 5 MNIST-M images of the digit 7 (sevens/) and 5 SVHN images (svhn/) from ../shared
    difflab ti train --sd src/difflab/assets/mini_sd --concept-dir runs/mini_concepts/sevens \\
        --token "<new1>" --init-word digit --out runs/mini_emb/new1.safetensors ...
    python benchmarks/mini_world.py eval --embeddings runs/mini_emb/new1.safetensors runs/mini_emb/new2.safetensors

``eval`` generates 25 images per prompt, classifies each one's domain (MNIST-M or SVHN)
with a small CNN trained here on the real images, and its digit with the course
classifier of that domain (``../shared/evaluators``). It prints the rates for the
learned embeddings and for the same tokens at 0 steps (their init word's embedding),
and writes a figure of the samples.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from difflab.digits.data import BalancedDigits, read_csv
from difflab.digits.evaluate import load_classifier
from difflab.imageio import save_grid
from difflab.personalize.generate import SHIPPED_MINI_SD, image_seed, sample_images
from difflab.personalize.sd import load_sd
from difflab.personalize.textual_inversion import add_concept, init_vectors, read_embedding_file

HERE = Path(__file__).resolve().parents[1]
SHARED = HERE.parent / "shared"

# (name, prompt, the digit whose rate is reported)
PROMPTS = (
    ("object", "a photo of the digit <new1> on a textured background", 7),
    ("object control", "a photo of a digit on a textured background", 7),
    ("style", "a photo of the digit three in the style of <new2>", 3),
    ("style control (no <new2>)", "a photo of the digit three in the style of", 3),
    ("composition", "a photo of the digit <new1> in the style of <new2>", 7),
)


# ----------------------------------------------------------------------- concepts
def write_concepts(data_root: Path, out: Path, n: int = 5) -> None:
    """``out/sevens``: the first ``n`` MNIST-M images labelled 7 (csv order);
    ``out/svhn``: the first ``n`` SVHN images whose label is neither 3 nor 7, so the style
    images show no digit the benchmark asks for."""
    from PIL import Image

    picks = {
        "sevens": [r for r in read_csv(data_root / "mnistm" / "train.csv") if r[1] == 7][:n],
        "svhn": [r for r in read_csv(data_root / "svhn" / "train.csv") if r[1] not in (3, 7)][:n],
    }
    for folder, rows in picks.items():
        src = data_root / ("mnistm" if folder == "sevens" else "svhn") / "data"
        dst = out / folder
        dst.mkdir(parents=True, exist_ok=True)
        for name, label in rows:
            Image.open(src / name).convert("RGB").save(dst / f"{label}_{Path(name).stem}.png")
        print(f"{dst}: {[f'{name} ({label})' for name, label in rows]}")


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


def train_domain_classifier(data: BalancedDigits, steps: int = 400, seed: int = 0) -> tuple[DomainNet, float]:
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


def evaluate(args) -> int:
    evaluators = Path(args.evaluators)
    data_root = Path(args.data)
    for p in (evaluators / "mnistm_classifier.pth", evaluators / "svhn_classifier.pth", data_root / "mnistm" / "train.csv"):
        if not p.is_file():
            print(f"missing {p}", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    data = BalancedDigits.from_root(data_root, progress=False)
    domain_net, domain_acc = train_domain_classifier(data)
    print(f"domain classifier (MNIST-M vs SVHN): held-out accuracy {domain_acc:.4f} ({time.time() - t0:.0f} s)")
    digit_nets = [load_classifier("mnistm", evaluators / "mnistm_classifier.pth"), load_classifier("svhn", evaluators / "svhn_classifier.pth")]

    learned: dict[str, torch.Tensor] = {}
    init_words: dict[str, str] = {}
    for f in args.embeddings:
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
        for tok, vec in read_embedding_file(f).items():
            learned[tok] = vec
            init_words[tok] = meta.get("init_word", "")
    missing = {"<new1>", "<new2>"} - set(learned)
    if missing:
        print(f"no embedding for {sorted(missing)}; pass --embeddings FILE ...", file=sys.stderr)
        return 2
    probe = load_sd(args.model)
    zero = {tok: init_vectors(probe, init_words[tok] or "digit", learned[tok].shape[0]) for tok in learned}
    print(f"model {args.model}; {args.images} images per prompt, DDIM {args.steps} steps, guidance s={args.guidance}; "
          f"init words {init_words}")

    rows, grids = [], []
    for label, vectors in (("learned", learned), ("0 steps", zero)):
        sd = with_embeddings(args.model, vectors)
        for name, prompt, digit in PROMPTS:
            seeds = [image_seed(args.seed, name, 0, i) for i in range(args.images)]
            t = time.time()
            imgs = sample_images(sd, prompt, seeds, steps=args.steps, guidance=args.guidance)
            r_digit, r_svhn, preds = rates(imgs, digit, domain_net, digit_nets)
            rows.append((label, name, prompt, digit, r_digit, r_svhn, time.time() - t))
            if label == "learned":
                grids.append(imgs[: args.figure_columns])
            print(f"  {label:8s} {name:26s} {digit}: {r_digit:.2f}  SVHN: {r_svhn:.2f}  digits {preds}", flush=True)

    print("\n| embedding | case | prompt | rate of digit | rate SVHN domain |")
    print("|---|---|---|---|---|")
    for label, name, prompt, digit, r_digit, r_svhn, _ in rows:
        print(f"| {label} | {name} | `{prompt}` | {digit}: {r_digit:.2f} | {r_svhn:.2f} |")
    if args.figure:
        save_grid(torch.cat(grids), args.figure, nrow=args.figure_columns)
        print(f"\nfigure: {args.figure} (rows: {', '.join(n for n, _, _ in PROMPTS)}; learned embeddings)")
    print(f"total {time.time() - t0:.0f} s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("concepts", help="write the two concept folders from the digit data")
    c.add_argument("--data", default=str(SHARED / "hw2_data" / "digits"), help="digit data in the course layout")
    c.add_argument("--out", required=True, help="folder for sevens/ and svhn/")
    e = sub.add_parser("eval", help="generate, classify and print the rates")
    e.add_argument("--model", default=str(SHIPPED_MINI_SD), help="mini SD folder (default: the shipped one)")
    e.add_argument("--embeddings", nargs="+", default=sorted(str(f) for f in (HERE / "src/difflab/assets/embeddings").rglob("*.safetensors")),
                   help="embedding files for <new1> and <new2> (default: the shipped ones)")
    e.add_argument("--data", default=str(SHARED / "hw2_data" / "digits"), help="digit data (for the domain classifier)")
    e.add_argument("--evaluators", default=str(SHARED / "evaluators"), help="folder with the two digit classifiers")
    e.add_argument("--images", type=int, default=25, help="images per prompt")
    e.add_argument("--steps", type=int, default=50, help="DDIM steps")
    e.add_argument("--guidance", type=float, default=7.5, help="guidance scale s (SD convention)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--figure", default="runs/mini_world.png", help="grid of samples per prompt ('' for none)")
    e.add_argument("--figure-columns", type=int, default=10)
    e.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.cmd == "concepts":
        write_concepts(Path(args.data), Path(args.out))
        return 0
    return evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
