"""Scoring generated digits the way the course grader does.

For each dataset folder, every ``*.png`` is classified; its label is the first
character of its file name. Output (``format_report``) is the grader's three lines.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from difflab.data import DATASETS, load_digit_set
from difflab.digits.fidelity import Fidelity, PenultimateFeatures, fidelity, per_class_size, reference_and_floor
from difflab.io import PathLike, load_png, load_state_strict, load_torch_state
from difflab.nets.digit_classifiers import MnistmClassifier, SvhnClassifier


@dataclass
class DatasetScore:
    correct: int
    total: int

    @property
    def acc(self) -> float:
        return self.correct / self.total if self.total else 0.0


def load_classifier(kind: str, path: PathLike, device="cpu") -> torch.nn.Module:
    state = load_torch_state(path, f"{kind} classifier weights")
    net = MnistmClassifier() if kind == "mnistm" else SvhnClassifier()
    load_state_strict(net, state, path)
    return net.to(device).eval()


def label_of(path: Path) -> int:
    c = path.name[0]
    if not c.isdigit():
        raise ValueError(f"cannot read a label from {path}: the file name must start with the digit")
    return int(c)


@torch.inference_mode()
def score_folder(net: torch.nn.Module, folder: PathLike, device="cpu", batch_size: int = 500) -> DatasetScore:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"missing folder of generated images: {folder}")
    files = sorted(folder.glob("*.png"))
    if not files:
        raise ValueError(f"no .png images in {folder}")
    correct = 0
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        x = torch.stack([load_png(f) for f in chunk]).to(device)
        labels = torch.tensor([label_of(f) for f in chunk], device=device)
        correct += int((net(x).argmax(1) == labels).sum())
    return DatasetScore(correct, len(files))


def evaluate_folder(out: PathLike, mnistm_ckpt: PathLike, svhn_ckpt: PathLike, device="cpu") -> dict[str, DatasetScore]:
    out = Path(out)
    return {
        "mnistm": score_folder(load_classifier("mnistm", mnistm_ckpt, device), out / "mnistm", device),
        "svhn": score_folder(load_classifier("svhn", svhn_ckpt, device), out / "svhn", device),
    }


def format_report(result: dict[str, DatasetScore]) -> str:
    m, s = result["mnistm"], result["svhn"]
    return "\n".join([
        f"MNIST-M acc = {m.acc:.4f} (correct/total = {m.correct}/{m.total})",
        f"SVHN acc = {s.acc:.4f} (correct/total = {s.correct}/{s.total})",
        f"acc = {(m.acc + s.acc) / 2:.4f}",
    ])


def generated_images(folder: PathLike, per_class: int) -> Tensor:
    """The first ``per_class`` images of each digit of a course folder (``D_001.png`` ..),
    [10 * per_class, 3, 28, 28] in [0, 1], digit-major."""
    folder = Path(folder)
    images = []
    for digit in range(10):
        files = sorted(folder.glob(f"{digit}_*.png"))[:per_class]
        if len(files) < per_class:
            raise ValueError(f"{folder}: {len(files)} images of digit {digit} ({digit}_*.png), {per_class} needed")
        images += [load_png(f, (28, 28)) for f in files]
    return torch.stack(images)


def evaluate_fidelity(out: PathLike, data_root: PathLike, classifiers: dict[str, PathLike], *, per_class: int = 50,
                      seed: int = 0, device="cpu") -> dict[str, dict[str, Fidelity]]:
    """Per dataset: fidelity of the generated images against a balanced set of real ones,
    and the real-data floor at the same size (``difflab.digits.fidelity``)."""
    out = Path(out)
    result = {}
    for name in DATASETS:
        data = load_digit_set(data_root, name, progress=False)
        n = per_class_size(data, per_class)
        feats = PenultimateFeatures(load_classifier(name, classifiers[name], device)).to(device)
        ref, floor = reference_and_floor(feats, data, n, seed)
        result[name] = {"generated": fidelity(feats, ref, generated_images(out / name, n), seed=seed), "floor": floor}
    return result


def format_fidelity(result: dict[str, dict[str, Fidelity]]) -> str:
    lines = []
    for name, rows in result.items():
        for kind, f in rows.items():
            lines.append(f"{name} {kind:9s}: FD = {f.frechet:.3f}, KID = {f.kid_mean:.4f} +- {f.kid_std:.4f}, "
                         f"precision = {f.precision:.3f}, recall = {f.recall:.3f} ({f.n_generated} vs {f.n_real} images)")
    return "\n".join(lines)
