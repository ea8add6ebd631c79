"""Prompt templates for textual inversion training (data only).

Each template has one ``{}`` where the concept's token goes. Object templates describe
a thing in a photo; style templates describe a picture made in a manner. The wording
is this project's own, in the spirit of Gal et al. 2022 (textual inversion), who train
with short neutral captions so that the token, not the caption, explains the image.
"""

OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a photo of the {}",
    "a picture of a {}",
    "a close-up photo of a {}",
    "a cropped photo of the {}",
    "a bright photo of a {}",
    "a dark photo of the {}",
    "a blurry photo of a {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a photo of my {}",
    "a rendering of a {}",
    "a snapshot of the {}",
    "an image of a {}",
    "a photo of a small {}",
    "a photo of a large {}",
)

STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a picture in the style of {}",
    "an image in the style of {}",
    "artwork in the style of {}",
    "a drawing in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright picture in the style of {}",
    "a dark picture in the style of {}",
    "a small painting in the style of {}",
    "a large painting in the style of {}",
    "an illustration in the style of {}",
    "a scene in the style of {}",
    "a portrait in the style of {}",
    "a landscape in the style of {}",
)

TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
