"""Stable Diffusion v1.x, shared by textual inversion (``personalize``) and the mini model
(``t2i``).

- ``load``: SD v1.x from a CompVis single file or a diffusers folder, the UNet Denoiser
  adapter, the scheduler config -> NoiseSchedule, the tokenizer's search path;
- ``sample``: guided DDIM latents and decoded images for one prompt;
- ``concepts``: new-token embeddings spliced into the text encoder, embedding files;
- ``tokenizer``: CLIP-format byte-level BPE vocabularies written from a word list.
"""
