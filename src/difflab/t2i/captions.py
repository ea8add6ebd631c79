"""Caption rules of the mini text-to-image world (captioned MNIST-M and SVHN digits).

Two concepts are held out of training, so that textual inversion has something new
to learn:

- object: the digit 7 is never named. Its images are captioned "a photo of a digit
  ..."; other digits get that unnamed caption too, with probability ``p_unnamed``,
  so "a digit" means any digit and not just 7;
- style: the phrase "on a house number sign" never appears. SVHN images are captioned
  "a photo of the digit {name}" (or "a photo of a digit"); MNIST-M images always end
  in "on a textured background".

With probability ``p_empty`` the caption is "" (the unconditional branch of
classifier-free guidance, the prompt SD samplers use for it).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HELD_OUT_DIGIT = 7
MNISTM_SUFFIX = " on a textured background"
HELD_OUT_STYLE = "on a house number sign"

# Words given a single token each in the mini tokenizer: the captions, the held-out
# phrases, the textual-inversion templates, and the benchmark's prompts. Any other text
# still tokenizes, one character per token.
VOCAB_WORDS = tuple(
    dict.fromkeys(
        "a an the of on in my one photo digit textured background house number sign style picture image "
        "rendering snapshot close up cropped bright dark blurry good small large painting drawing "
        "artwork illustration scene portrait landscape".split()
        + list(DIGIT_NAMES)
    )
)


def caption(digit: int, dataset: int, *, named: bool) -> str:
    """The caption of one image. ``dataset``: 0 MNIST-M, 1 SVHN. The held-out digit is
    never named, whatever ``named`` says."""
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be 0..9, got {digit}")
    if dataset not in (0, 1):
        raise ValueError(f"dataset must be 0 (MNIST-M) or 1 (SVHN), got {dataset}")
    what = f"the digit {DIGIT_NAMES[digit]}" if named and digit != HELD_OUT_DIGIT else "a digit"
    return f"a photo of {what}" + (MNISTM_SUFFIX if dataset == 0 else "")


def draw_captions(digits: Tensor, datasets: Tensor, generator: torch.Generator, *,
                  p_unnamed: float = 0.6, p_empty: float = 0.1) -> list[str]:
    """Captions for a batch, with the random choices drawn from ``generator``."""
    n = len(digits)
    unnamed = torch.rand(n, generator=generator) < p_unnamed
    empty = torch.rand(n, generator=generator) < p_empty
    return [
        "" if bool(e) else caption(int(d), int(s), named=not bool(u))
        for d, s, u, e in zip(digits.tolist(), datasets.tolist(), unnamed, empty)
    ]


def check_caption(text: str) -> None:
    """Raise if a caption breaks the held-out rules (used by tests and by training)."""
    if HELD_OUT_STYLE in text:
        raise AssertionError(f"held-out style phrase in caption {text!r}")
    if DIGIT_NAMES[HELD_OUT_DIGIT] in text.split():
        raise AssertionError(f"held-out digit name in caption {text!r}")


def all_training_captions() -> Sequence[str]:
    """Every caption the rules can produce."""
    out = {""}
    for s in (0, 1):
        for d in range(10):
            for named in (False, True):
                out.add(caption(d, s, named=named))
    return sorted(out)
