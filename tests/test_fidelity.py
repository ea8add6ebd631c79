"""Digit fidelity metrics: analytic cases for the Frechet distance, KID and k-NN
precision/recall, and the real-data reference drawn balanced and disjoint."""
import numpy as np
import pytest
import torch
from torch import nn

from difflab.data import DigitSet
from difflab.digits.fidelity import (
    PenultimateFeatures,
    balanced_real,
    fidelity,
    per_class_size,
    precision_recall,
    reference_and_floor,
)


class Flatten(nn.Module):
    """A 'classifier' whose penultimate features are the pixels themselves."""

    num_features = 3 * 2 * 2

    def penultimate(self, x):
        return x.flatten(1)


def test_frechet_distance_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(400, 3, 2, 2, generator=g, dtype=torch.float64).float()
    fake = (real * 0.5 + 0.2).float()  # an affine image of real: both Gaussian moments known exactly
    f = fidelity(PenultimateFeatures(Flatten()), real, fake)
    a, b = real.flatten(1).double(), fake.flatten(1).double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # cb = 0.25 ca, so (ca cb)^(1/2) = 0.5 ca: FD = |mu_a - mu_b|^2 + tr(ca + cb - 2 * 0.5 ca)
    closed = float(((mu_a - mu_b) ** 2).sum() + torch.trace(ca + cb - 2 * 0.5 * ca))
    assert f.frechet == pytest.approx(closed, rel=1e-4, abs=1e-6)


def test_identical_sets_score_perfectly_and_distant_sets_do_not():
    g = torch.Generator().manual_seed(1)
    real = torch.rand(200, 3, 2, 2, generator=g)
    same = fidelity(PenultimateFeatures(Flatten()), real, real.clone())
    # KID is unbiased: around 0 within its spread over subsets (drawn apart for each set)
    assert abs(same.frechet) < 1e-3 and abs(same.kid_mean) < 4 * same.kid_std
    assert same.precision == 1.0 and same.recall == 1.0
    far = fidelity(PenultimateFeatures(Flatten()), real, real + 10.0)
    assert far.precision == 0.0 and far.recall == 0.0 and far.frechet > 100 and far.kid_mean > 1


def test_precision_and_recall_see_mode_dropping():
    """A generator that draws only half of the real modes keeps precision but loses recall."""
    g = torch.Generator().manual_seed(2)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    real = torch.cat([c + 0.1 * torch.randn(100, 2, generator=g) for c in centres])
    fake = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres[:2]])
    p, r = precision_recall(real, fake, k=3)
    assert p > 0.95 and 0.4 < r < 0.6


def test_reference_and_floor_are_balanced_and_disjoint():
    labels = np.repeat(np.arange(10), 7)
    labels[:3] = 1  # digit 0 has 4 images: per_class_size is capped at 2
    images = np.random.default_rng(0).integers(0, 255, (len(labels), 28, 28, 3), dtype=np.uint8)
    data = DigitSet("toy", images, labels)
    assert per_class_size(data, 50) == 2
    a, ia = balanced_real(data, 2, seed=0)
    b, ib = balanced_real(data, 2, seed=1, exclude=ia)
    assert len(set(ia) & set(ib)) == 0
    assert np.bincount(labels[ia], minlength=10).tolist() == [2] * 10
    assert torch.equal(a[0], torch.from_numpy(images[ia[0]]).permute(2, 0, 1).float() / 255)
    with pytest.raises(ValueError, match="only 0 real images of digit 0 left"):
        balanced_real(data, 3, seed=2, exclude=np.concatenate([ia, ib]))

    class Pixels(nn.Module):
        num_features = 3 * 28 * 28

        def penultimate(self, x):
            return x.flatten(1)

    feats = PenultimateFeatures(Pixels())
    ref, floor = reference_and_floor(feats, data, 2)
    assert ref.shape == (20, 3, 28, 28) and floor.n_real == floor.n_generated == 20
    assert float(feats(ref).pow(2).mean()) == pytest.approx(1.0)  # calibrated on the reference
