"""The two pretrained digit classifiers used to score generated digits.

Written from the descriptions in the course material (layer sizes and key names only).
- ``MnistmClassifier``: the course's MNIST-M grader (a LeNet-style CNN), input 28x28 RGB
  normalised with mean 0.5, std 0.5.
- ``SvhnClassifier``: a VGG-style SVHN CNN, input 32x32 RGB normalised with the SVHN
  channel statistics.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class MnistmClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(256, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    num_features = 64

    def penultimate(self, x: Tensor) -> Tensor:
        """The penultimate layer: [B, 3, 28, 28] in [0, 1] -> [B, 64] (after fc2's ReLU)."""
        x = (x - 0.5) / 0.5
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))

    def forward(self, x: Tensor) -> Tensor:
        """:param x: [B, 3, 28, 28] in [0, 1]; returns [B, 10] logits."""
        return self.fc3(self.penultimate(x))


def _svhn_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.MaxPool2d(2),
    )


class SvhnClassifier(nn.Module):
    MEAN = (0.4377, 0.4438, 0.4728)
    STD = (0.1980, 0.2010, 0.1970)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(_svhn_block(3, 32), _svhn_block(32, 64), _svhn_block(64, 128))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(2048, 256), nn.ReLU(), nn.Dropout(), nn.Linear(256, 10))
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    num_features = 256

    def penultimate(self, x: Tensor) -> Tensor:
        """The penultimate layer: [B, 3, H, W] in [0, 1] -> [B, 256] (after the first
        Linear's ReLU; dropout is inactive in eval mode)."""
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        return self.classifier[:3](self.features(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        """:param x: [B, 3, H, W] in [0, 1] (28x28 is resized to 32x32 bilinearly); returns logits."""
        return self.classifier[3:](self.penultimate(x))
