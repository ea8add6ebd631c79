"""Paths of the models and embeddings shipped inside the package (data only)."""
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
# The course digit model (``difflab digits train`` + ``digits export``).
SHIPPED_DIGITS = ASSETS / "digits"
# The mini SD-format model trained on captioned digits (``difflab t2i train``): the
# model ``ti generate`` uses when no --sd is given.
SHIPPED_MINI_SD = ASSETS / "mini_sd"
# Embeddings learned on the shipped mini model (``difflab ti train``).
SHIPPED_EMBEDDINGS = ASSETS / "embeddings"
