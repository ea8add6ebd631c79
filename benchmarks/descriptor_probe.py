"""How well does a descriptor network tell the held-out 7 apart, and do label-free losses help?

    python benchmarks/descriptor_probe.py --variant named          # what `t2i train` uses (stage 1b)
    python benchmarks/descriptor_probe.py --variant contrastive    # + NT-Xent over all images, 7s included
    python benchmarks/descriptor_probe.py --variant reconstruction # + decoding the form from the features

Every variant runs stage 1b itself (``difflab.t2i.descriptor.train_descriptor`` at --seed 0:
the classifier of the nine named digits, never shown a 7); the two others add, through
its ``aux`` hook, a loss that uses every image without its label. Then, on the last
4,000 MNIST-M images (never a label of a 7 used in training):

- a linear probe (10 classes) fitted on 2,000 descriptors, scored on the other 2,000:
  accuracy, and how many 7s it finds (recall) or calls 9;
- the 10 nearest descriptors of each held-out 7 among the 2,000: the share that are 7s
  and 9s;
- the distance between the 7 and 9 centroids, against the mean spread of a class.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch.nn import functional as F

from difflab.data import BalancedDigits
from difflab.t2i.captions import HELD_OUT_DIGIT
from difflab.t2i.config import T2ITrainConfig
from difflab.t2i.descriptor import DescriptorNet, train_descriptor
from difflab.t2i.stages import Stage, stage_generator


def augment(form: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random small rotation (15 deg), scale (12%) and shift (3 px) of each image."""
    b = form.shape[0]
    u = lambda: torch.rand(b, generator=g) * 2 - 1  # noqa: E731
    ang, sc, tx, ty = u() * math.radians(15), 1 + u() * 0.12, u() * 3 / 14, u() * 3 / 14
    theta = torch.stack([torch.stack([sc * ang.cos(), -sc * ang.sin(), tx], 1),
                         torch.stack([sc * ang.sin(), sc * ang.cos(), ty], 1)], 1)
    grid = F.affine_grid(theta, form.shape, align_corners=False)
    return F.grid_sample(form, grid, padding_mode="border", align_corners=False)


class Contrastive(torch.nn.Module):
    """NT-Xent (temperature 0.2) between two augmented views of 128 images, labels unused."""

    def __init__(self, data: BalancedDigits, weight: float):
        super().__init__()
        self.data, self.weight = data, weight
        self.head = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Linear(64, 32))

    def forward(self, net: DescriptorNet, step: int) -> torch.Tensor:
        g = stage_generator(0, Stage.DESCRIPTOR_AUX, step, 0)
        form = net.form(self.data.batch(g, 128)[0])
        z = torch.cat([F.normalize(self.head(net.norm(net.body(augment(form, g)))), dim=1) for _ in range(2)])
        sim = (z @ z.t() / 0.2).fill_diagonal_(-1e4)
        n = len(form)
        return self.weight * F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


class Reconstruction(torch.nn.Module):
    """Mean squared error of the form of 128 images decoded from their features, labels unused."""

    def __init__(self, data: BalancedDigits, weight: float):
        super().__init__()
        self.data, self.weight = data, weight
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(32, 64 * 49), torch.nn.SiLU(), torch.nn.Unflatten(1, (64, 7, 7)),
            torch.nn.ConvTranspose2d(64, 32, 4, 2, 1), torch.nn.SiLU(), torch.nn.ConvTranspose2d(32, 1, 4, 2, 1))

    def forward(self, net: DescriptorNet, step: int) -> torch.Tensor:
        form = net.form(self.data.batch(stage_generator(0, Stage.DESCRIPTOR_AUX, step, 0), 128)[0])
        return self.weight * F.mse_loss(self.decoder(net.norm(net.body(form))), form)


def train(data: BalancedDigits, variant: str, steps: int, weight: float) -> DescriptorNet:
    """Stage 1b itself (``train_descriptor`` at --seed 0), plus the variant's label-free loss."""
    aux = {"named": None, "contrastive": Contrastive, "reconstruction": Reconstruction}[variant]
    cfg = T2ITrainConfig(descriptor_steps=steps)
    net, _ = train_descriptor(data, cfg, progress=True, aux=(lambda _net: aux(data, weight)) if aux else None)
    return net


def probe(net: DescriptorNet, data: BalancedDigits) -> dict:
    s = data.sets[0]  # MNIST-M
    x = torch.from_numpy(s.images[-4000:]).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(s.labels[-4000:]).long()
    with torch.no_grad():
        d = net.features(x)
    fit, test = slice(0, 2000), slice(2000, 4000)
    f = (d - d[fit].mean(0)) / (d[fit].std(0) + 1e-5)
    w = torch.zeros(f.shape[1], 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([w, b], 1e-2)
    for _ in range(300):
        loss = F.cross_entropy(f[fit] @ w + b, y[fit]) + 1e-4 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pred = (f[test] @ w + b).argmax(1).detach()
    sevens = y[test] == HELD_OUT_DIGIT
    near = y[fit][torch.cdist(d[test], d[fit]).topk(10, largest=False).indices][sevens]
    centre = torch.stack([d[y == k].mean(0) for k in range(10)])
    spread = torch.stack([(d[y == k] - centre[k]).norm(dim=1).mean() for k in range(10)]).mean()
    return {"probe accuracy": (pred == y[test]).float().mean(), "probe 7 recall": (pred[sevens] == 7).float().mean(),
            "probe 7 -> 9": (pred[sevens] == 9).float().mean(), "7s' 10 nearest: 7": (near == 7).float().mean(),
            "7s' 10 nearest: 9": (near == 9).float().mean(), "7-9 centroid distance": (centre[7] - centre[9]).norm(),
            "mean class spread": spread}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default="../shared/hw2_data/digits", help="digit data in the course layout")
    ap.add_argument("--variant", choices=("named", "contrastive", "reconstruction"), default="named",
                    help="named: the nine-digit classifier alone; the others add a label-free loss")
    ap.add_argument("--steps", type=int, default=1500, help="training steps (batch 128)")
    ap.add_argument("--weight", type=float, default=1.0, help="weight of the label-free loss")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = BalancedDigits.from_root(args.data)
    t0 = time.time()
    net = train(data, args.variant, args.steps, args.weight)
    print(f"{args.variant}: {args.steps} steps in {time.time() - t0:.0f} s")
    for k, v in probe(net, data).items():
        print(f"  {k}: {float(v):.3f}")


if __name__ == "__main__":
    main()
