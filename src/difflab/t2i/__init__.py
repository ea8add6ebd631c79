"""A small text-to-image model in Stable Diffusion's format, trained from scratch on
captioned digits (``difflab t2i``), so that textual inversion can be measured on a CPU."""
