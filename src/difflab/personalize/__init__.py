"""Problem 3: Stable Diffusion v1.x loading, textual inversion, and the course's generation.

- ``sd``: load SD v1.x (single-file CompVis checkpoint or a diffusers-format folder),
  the UNet Denoiser adapter, the SD noise schedule. Never touches the network.
- ``textual_inversion``: new-token embeddings spliced into the CLIP text encoder, the
  training loop (only the new rows are handed to the optimizer), embedding files.
- ``generate``: the course's ``OUT/{key}/{p}/source{key}_prompt{p}_{i}.png`` generation.
- ``templates``: data-only prompt templates for object and style concepts.
"""
