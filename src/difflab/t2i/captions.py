"""Caption rules of the mini text-to-image world (captioned MNIST-M and SVHN digits).

Two concepts are held out of training, so that textual inversion has something new
to learn:

- object: the digit 7 is never named. Its images are captioned "a photo of a digit
  ..."; other digits get that unnamed caption too, with probability ``p_unnamed``,
  so "a digit" means any digit and not just 7. With ``p_held_out_unnamed`` set to
  ``p_unnamed``, a 7 gets it at that same rate and a descriptor caption (below)
  otherwise, so p(7 | "a digit") is the 7s' share of the data;
- style: the phrase "on a house number sign" never appears. SVHN images are captioned
  "a photo of the digit {name}" (or "a photo of a digit"); MNIST-M images always end
  in "on a textured background".

With probability ``p_empty`` the caption is "" (the unconditional branch of
classifier-free guidance, the prompt SD samplers use for it).

Optionally (``p_descriptor``) the name slot holds the pseudo-word ``*`` instead:
"a photo of the digit * ...". Training replaces the input embedding of ``*`` by a
learned projection of an image descriptor, a vector computed from the image itself by
a small frozen network (:class:`difflab.t2i.descriptor.DescriptorNet`). No label enters that
caption, so it is drawn for every digit, 7 included: the text encoder's name slot
learns to carry what an image looks like, as a large model's text space does, while
the word for 7 stays unseen.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HELD_OUT_DIGIT = 7
MNISTM_SUFFIX = " on a textured background"
HELD_OUT_STYLE = "on a house number sign"
DESCRIPTOR_MARK = "*"  # the name slot of a descriptor caption (S*, Gal et al.'s notation)

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


def caption(digit: int, dataset: int, *, named: bool, descriptor: bool = False) -> str:
    """The caption of one image. ``dataset``: 0 MNIST-M, 1 SVHN. The held-out digit is
    never named, whatever ``named`` says. ``descriptor``: the name slot holds
    DESCRIPTOR_MARK, whatever the digit (``named`` is then ignored)."""
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be 0..9, got {digit}")
    if dataset not in (0, 1):
        raise ValueError(f"dataset must be 0 (MNIST-M) or 1 (SVHN), got {dataset}")
    if descriptor:
        what = f"the digit {DESCRIPTOR_MARK}"
    else:
        what = f"the digit {DIGIT_NAMES[digit]}" if named and digit != HELD_OUT_DIGIT else "a digit"
    return f"a photo of {what}" + (MNISTM_SUFFIX if dataset == 0 else "")


def draw_captions(digits: Tensor, datasets: Tensor, generator: torch.Generator, *,
                  p_unnamed: float = 0.6, p_empty: float = 0.1, p_descriptor: float = 0.0,
                  p_held_out_unnamed: float = 1.0) -> list[str]:
    """Captions for a batch, with the random choices drawn from ``generator``. A
    non-empty caption is a descriptor caption with probability ``p_descriptor`` (drawn
    last, and only when it is > 0, so that ``p_descriptor = 0`` consumes no draw for it).

    ``p_held_out_unnamed``: the probability that a non-descriptor caption of a 7 is
    "a digit"; otherwise its name slot holds the descriptor (it has no name to hold).
    At 1.0 every 7 is "a digit". Equal to ``p_unnamed``, "a digit" is drawn as often for
    7s as for any other digit, so p(7 | "a digit") is the 7s' share of the data. It
    reuses the draw that decides ``unnamed`` (no draw of its own); below 1 it needs
    ``p_descriptor`` > 0."""
    if p_held_out_unnamed < 1.0 and p_descriptor <= 0:
        raise ValueError("p_held_out_unnamed < 1 puts descriptors in the 7s' name slot; it needs p_descriptor > 0")
    n = len(digits)
    u = torch.rand(n, generator=generator)
    empty = torch.rand(n, generator=generator) < p_empty
    descr = torch.rand(n, generator=generator) < p_descriptor if p_descriptor > 0 else torch.zeros(n, dtype=torch.bool)
    out = []
    for d, s, ui, e, r in zip(digits.tolist(), datasets.tolist(), u.tolist(), empty.tolist(), descr.tolist()):
        if e:
            out.append("")
            continue
        if d == HELD_OUT_DIGIT and not r:
            r = not ui < p_held_out_unnamed
        out.append(caption(int(d), int(s), named=not ui < p_unnamed, descriptor=bool(r)))
    return out


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
            out.add(caption(d, s, named=False, descriptor=True))
    return sorted(out)
