"""Options of ``difflab ti train`` (``TrainConfig``) and ``difflab ti generate``
(``GenerateConfig``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from difflab.io import read_templates
from difflab.personalize.templates import TEMPLATES


@dataclass
class TrainConfig:
    """Options of ``difflab ti train`` (the CLI is built from these fields)."""

    sd: str
    concept_dir: str
    token: str
    init_word: str
    out: str
    property: str = "object"
    templates: Optional[str] = None  # a text file of caption templates (one per line, "{}" = the token)
    num_vectors: int = 1
    steps: int = 3000
    lr: float = 2e-3
    weight_decay: float = 1e-2
    batch_size: int = 4
    resolution: Optional[int] = None  # None: the model's native size (512 for SD v1)
    flip_p: float = 0.5  # probability of a horizontal mirror per training image (0 for text, digits, asymmetric things)
    seed: int = 0
    resume: Optional[str] = None
    embeddings: List[str] = field(default_factory=list)  # other concepts, loaded frozen
    validation_prompt: Optional[str] = None
    validation_every: int = 500
    validation_images: int = 4
    validation_steps: int = 50
    guidance: float = 7.5
    save_every: int = 500
    mixed_precision: str = "no"
    device: Optional[str] = None  # None: accelerate's choice
    tokenizer: Optional[str] = None
    config_dir: Optional[str] = None
    quiet: bool = False

    def validate(self) -> None:
        if self.property not in TEMPLATES:
            raise ValueError(f"--property must be one of {sorted(TEMPLATES)}, got {self.property!r}")
        for name in ("num_vectors", "steps", "batch_size", "validation_every", "validation_images", "validation_steps", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)!r}")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"--resolution must be >= 8, got {self.resolution!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"--flip-p must be in [0, 1], got {self.flip_p!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.templates is not None:
            read_templates(self.templates)
        if Path(self.out).suffix != ".safetensors":
            raise ValueError(f"--out must end in .safetensors, got {self.out!r}")


@dataclass
class GenerateConfig:
    """Options of ``difflab ti generate`` (the CLI is built from these fields)."""

    json: str
    out: str
    sd: Optional[str] = None  # None: the shipped mini model (SHIPPED_MINI_SD)
    embeddings: Tuple[str, ...] = ()
    guidance: float = 7.5
    steps: int = 50
    images_per_prompt: int = 25
    batch_size: int = 5
    seed: int = 0
    height: Optional[int] = None
    width: Optional[int] = None
    device: Optional[str] = None
    dtype: str = "fp32"
    tokenizer: Optional[str] = None
    config_dir: Optional[str] = None
    quiet: bool = False

    def validate(self) -> None:
        for name in ("steps", "images_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)!r}")
        if Path(self.out).is_file():
            raise ValueError(f"output {self.out} is a file; expected a folder")


