"""Prompt templates for zero-shot classification (data only; ``{}`` is the class name).

- ``COURSE_TEMPLATE``: the course's single prompt, "A photo of {object}.".
- ``CIFAR100_TEMPLATES``: the 18 CIFAR-100 templates the CLIP authors published with their
  zero-shot results (openai/CLIP, ``data/prompts.md``, section CIFAR100).
"""

COURSE_TEMPLATE = "A photo of {}."

CIFAR100_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
]

TEMPLATE_SETS = {
    "course": [COURSE_TEMPLATE],
    "cifar100": CIFAR100_TEMPLATES,
}
