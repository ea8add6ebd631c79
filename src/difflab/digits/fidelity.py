"""Distribution-level fidelity of generated digits, in the feature space of the course
classifiers (their penultimate layer), against real images of the same dataset.

- Frechet distance (Heusel et al. 2017) and kernel distance (KID, Binkowski et al. 2018,
  polynomial kernel (x.y / d + 1)^3, unbiased, averaged over random subsets): computed by
  torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with the
  classifier as their custom feature network.
- k-NN precision and recall (Kynkaanniemi et al. 2019): a generated sample counts as
  precise when it lies inside the k-NN ball of some real sample; a real sample counts as
  recalled when it lies inside the k-NN ball of some generated sample.

The real-data floor (``real_floor``) is the same numbers for two disjoint sets of real
images of equal size: what a perfect generator would score with this many images.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from difflab.data import DigitSet


class PenultimateFeatures(nn.Module):
    """A digit classifier as a feature network: [N, 3, H, W] in [0, 1] -> [N, d] float64,
    times ``scale`` (1 until ``calibrate``)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = int(classifier.num_features)
        self.scale = 1.0

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.penultimate(x.float()).double() * self.scale

    @torch.no_grad()
    def calibrate(self, real: Tensor, batch_size: int = 500) -> None:
        """Scale features so that ``real``'s have mean square 1 per dimension. The raw ReLU
        features of the two classifiers differ in scale by orders of magnitude, and KID's
        cubic kernel (x.y / d + 1)^3 is only informative at unit scale; FD is then in
        units of the real features' variance."""
        self.scale = 1.0
        f = torch.cat([self(c) for c in real.split(batch_size)])
        self.scale = float(f.pow(2).mean().rsqrt())


@dataclass
class Fidelity:
    frechet: float
    kid_mean: float
    kid_std: float
    precision: float
    recall: float
    n_generated: int
    n_real: int

    def to_dict(self) -> dict:
        return asdict(self)


def knn_radii(feats: Tensor, k: int) -> Tensor:
    """Distance of each row to its k-th nearest other row ([N, d] -> [N])."""
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # +1: the row itself is at distance 0


def coverage(query: Tensor, ref: Tensor, radii: Tensor) -> float:
    """Fraction of ``query`` rows inside at least one ball (``ref`` row, radius)."""
    return float((torch.cdist(query, ref) <= radii[None, :]).any(dim=1).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of feature sets [N, d], [M, d]."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"k-NN precision/recall with k={k} needs more than {k} samples per set, got {len(real)} and {len(fake)}")
    return coverage(fake, real, knn_radii(real, k)), coverage(real, fake, knn_radii(fake, k))


def fidelity(features: PenultimateFeatures, real: Tensor, fake: Tensor, *, k: int = 3, kid_subsets: int = 100,
             seed: int = 0, batch_size: int = 500) -> Fidelity:
    """Frechet distance, KID and k-NN precision/recall of ``fake`` against ``real``
    (both [N, 3, H, W] in [0, 1]). KID's random subsets come from ``seed``."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(real), len(fake))
    if n < 2:
        raise ValueError(f"fidelity needs at least 2 images per set, got {len(real)} real and {len(fake)} generated")
    fid = FrechetInceptionDistance(feature=features, normalize=True)
    with warnings.catch_warnings():  # it keeps every feature: a few hundred rows of <= 256 here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=features, normalize=True, subsets=kid_subsets, subset_size=min(n, 100))
    for images, is_real in ((real, True), (fake, False)):
        for chunk in images.split(batch_size):
            fid.update(chunk, real=is_real)
            kid.update(chunk, real=is_real)
    feats_real = torch.cat([features(c) for c in real.split(batch_size)])
    feats_fake = torch.cat([features(c) for c in fake.split(batch_size)])
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    p, r = precision_recall(feats_real, feats_fake, k)
    return Fidelity(float(fid.compute()), float(kid_mean), float(kid_std), p, r, len(fake), len(real))


def per_class_size(data: DigitSet, wanted: int) -> int:
    """Images per digit for the real reference and the floor: ``wanted``, or fewer when the
    rarest digit cannot fill two disjoint sets (SVHN here: 67 zeros -> 33)."""
    counts = np.bincount(np.asarray(data.labels), minlength=10)
    return int(min(wanted, counts.min() // 2))


def balanced_real(data: DigitSet, per_class: int, seed: int, exclude: np.ndarray | None = None) -> tuple[Tensor, np.ndarray]:
    """``per_class`` real images of each digit (the course set's balance), drawn without
    replacement from ``data`` by ``seed``, skipping indices in ``exclude``: images
    [10 * per_class, 3, 28, 28] in [0, 1] and their dataset indices."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(data.labels)
    chosen = []
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        if exclude is not None:
            idx = np.setdiff1d(idx, exclude)
        if len(idx) < per_class:
            raise ValueError(f"{data.name}: only {len(idx)} real images of digit {digit} left, {per_class} needed")
        chosen.append(rng.choice(idx, size=per_class, replace=False))
    index = np.concatenate(chosen)
    return torch.from_numpy(np.asarray(data.images)[index]).permute(0, 3, 1, 2).float().div(255), index


def reference_and_floor(features: PenultimateFeatures, data: DigitSet, per_class: int, seed: int = 0) -> tuple[Tensor, Fidelity]:
    """A balanced real reference set, and the floor: another, disjoint balanced real set of
    the same size scored against it (what a perfect generator would score). ``features``
    is calibrated on the reference."""
    ref, used = balanced_real(data, per_class, seed)
    other, _ = balanced_real(data, per_class, seed + 1, exclude=used)
    features.calibrate(ref)
    return ref, fidelity(features, ref, other, seed=seed)
