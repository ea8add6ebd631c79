"""difflab: diffusion models for the digit, face and personalisation problems."""

__version__ = "0.1.0"
