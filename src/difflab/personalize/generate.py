"""The course's Problem 3 generation: every prompt of every concept, N images each.

Layout: ``OUT/{key}/{p}/source{key}_prompt{p}_{i}.png`` for each concept key of the JSON,
each prompt index p of its ``prompt`` list and i = 0 .. images_per_prompt - 1.

Sampling is ``difflab.sd.sample`` (DDIM with classifier-free guidance). Each image has
its own seed, derived from (seed, key, p, i), so an image does not depend on the batch
it is in or on the device (up to the network's own floating-point behaviour).

Under ``accelerate launch``/``torchrun`` the batches (a prompt's images, ``batch_size`` at a
time) are shared out among the processes, each on its own GPU, and the main process
writes every file: the output is byte-identical to a one-process run's.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from torch import Tensor

from difflab.assets import SHIPPED_EMBEDDINGS, SHIPPED_MINI_SD
from difflab.devices import resolve_device
from difflab.io import PathLike, read_course_json, save_png
from difflab.personalize.config import GenerateConfig, check_distinct_files
from difflab.processes import Processes, publish_folder
from difflab.sd.concepts import add_concept, read_embedding_file
from difflab.sd.load import load_sd, parse_dtype
from difflab.sd.sample import sample_images

EMBEDDINGS_ENV = "DIFFLAB_EMBEDDINGS"


def env_embedding_files() -> List[Path]:
    """Embedding files named by ``$DIFFLAB_EMBEDDINGS``: files or folders (their
    ``*.safetensors``), separated by ``os.pathsep``; how ``hw2_3.sh`` is given learned
    embeddings without copying them into the package."""
    out: List[Path] = []
    for item in filter(None, os.environ.get(EMBEDDINGS_ENV, "").split(os.pathsep)):
        p = Path(item)
        if p.is_dir():
            out += sorted(p.glob("*.safetensors"))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"${EMBEDDINGS_ENV} names {p}, which does not exist")
    return out


def embedding_files(extra: Sequence[PathLike] = (), shipped: bool = True) -> Tuple[List[Path], List[Path]]:
    """(explicit files, shipped files): ``extra`` as given and ``$DIFFLAB_EMBEDDINGS``'s
    files, then (with ``shipped``) every ``assets/embeddings/**/*.safetensors`` shipped
    with the package, which were learned on the shipped mini model."""
    explicit = [Path(p) for p in extra] + env_embedding_files()
    for p in explicit:
        if not p.is_file():
            raise FileNotFoundError(f"embedding file not found: {p}")
    check_distinct_files(explicit, f"the embedding files (given and ${EMBEDDINGS_ENV})")
    found = sorted(SHIPPED_EMBEDDINGS.rglob("*.safetensors")) if shipped and SHIPPED_EMBEDDINGS.is_dir() else []
    return explicit, found


def find_embeddings(tokens: Sequence[str], width: int, extra: Sequence[PathLike] = (), prompts: Sequence[str] = (),
                    shipped: bool = True) -> Dict[str, Tensor]:
    """token -> [n, width] for every token in ``tokens`` (required) and every other known
    token that appears in ``prompts``.

    Files given in ``extra`` win; among shipped files, the first with the right width
    is used. A required token that is missing, or only found with another width, is an
    error naming the files searched.
    """
    explicit, shipped = embedding_files(extra, shipped)
    chosen: Dict[str, Tuple[Tensor, Path]] = {}
    for f in explicit:
        for tok, vec in read_embedding_file(f).items():
            if tok in chosen:
                raise ValueError(f"token {tok!r} is in two embedding files: {chosen[tok][1]} and {f}")
            if vec.shape[1] != width:
                raise ValueError(f"embedding file {f}: {tok!r} has width {vec.shape[1]}, but the text encoder's is {width}")
            chosen[tok] = (vec, f)
    wrong_width: Dict[str, List[str]] = {}
    for f in shipped:
        for tok, vec in read_embedding_file(f).items():
            if tok in chosen:
                continue
            if vec.shape[1] != width:
                wrong_width.setdefault(tok, []).append(f"{f} (width {vec.shape[1]})")
                continue
            chosen[tok] = (vec, f)
    for tok in tokens:
        if tok not in chosen:
            searched = [str(p) for p in explicit] + [f"{SHIPPED_EMBEDDINGS}/**/*.safetensors ({len(shipped)} files)"]
            if tok in wrong_width:
                raise ValueError(
                    f"embedding for {tok!r} has the wrong width for this text encoder ({width}): {'; '.join(wrong_width[tok])}"
                )
            raise ValueError(f"no embedding for token {tok!r}; searched {', '.join(searched)}. Pass --embeddings FILE")
    wanted = set(tokens) | {tok for tok in chosen if any(tok.lower() in p.lower() for p in prompts)}
    return {tok: chosen[tok][0] for tok in sorted(wanted)}


def image_seed(seed: int, key: str, prompt_index: int, image_index: int) -> int:
    """The seed of one image: CRC-32 of ``"{seed}/{key}/{p}/{i}"`` (stable across runs)."""
    return zlib.crc32(f"{seed}/{key}/{prompt_index}/{image_index}".encode())


def output_path(out: PathLike, key: str, p: int, i: int) -> Path:
    return Path(out) / key / str(p) / f"source{key}_prompt{p}_{i}.png"


def _load_model(cfg: GenerateConfig, device):
    """The SD model of ``cfg`` on ``device`` in its dtype (the shipped mini model without ``sd``)."""
    dtype = parse_dtype(cfg.dtype, device)
    sd_path = cfg.sd
    if sd_path is None:
        if not (SHIPPED_MINI_SD / "unet" / "config.json").is_file():
            raise FileNotFoundError(
                f"no sd model given and the shipped mini model is missing at {SHIPPED_MINI_SD}; "
                "give a Stable Diffusion checkpoint or train one with `difflab t2i train`"
            )
        sd_path = str(SHIPPED_MINI_SD)
    return load_sd(sd_path, tokenizer=cfg.tokenizer, config_dir=cfg.config_dir, device=device, dtype=dtype), dtype


def _write_images(sd, cfg: GenerateConfig, concepts, height: int, width: int, procs: Processes) -> List[Path]:
    """Sample this process's share of the batches; the main process writes every image
    (into a staging folder moved into place, :func:`difflab.processes.publish_folder`: an
    ``out`` that holds files is refused unless ``overwrite``, which replaces it whole)."""
    from tqdm.auto import tqdm

    batches = [(c.key, p, prompt, list(range(start, min(start + cfg.batch_size, cfg.images_per_prompt))))
               for c in concepts for p, prompt in enumerate(c.prompts)
               for start in range(0, cfg.images_per_prompt, cfg.batch_size)]
    mine = procs.share(batches)
    done = []
    bar = tqdm(total=sum(len(b[3]) for b in mine), desc="ti generate", unit="img", disable=cfg.quiet or not procs.is_main)
    for key, p, prompt, chunk in mine:
        seeds = [image_seed(cfg.seed, key, p, i) for i in chunk]
        images = sample_images(sd, prompt, seeds, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                               sampler=cfg.sampler, height=height, width=width)
        done += [(key, p, i, img) for i, img in zip(chunk, images)]
        bar.update(len(chunk))
    bar.close()
    gathered = procs.gather(done)
    if procs.is_main:

        def write(folder: Path) -> None:
            for key, p, i, img in gathered:
                save_png(img, output_path(folder, key, p, i))

        publish_folder(cfg.out, write, cfg.overwrite)
    procs.wait()
    return [output_path(cfg.out, key, p, i) for key, p, _, chunk in batches for i in chunk]


def generate_from_json(cfg: GenerateConfig, sd=None) -> List[Path]:
    """Validate everything, then write every image of the course layout; return the paths."""
    cfg.validate()
    concepts = read_course_json(cfg.json)
    embedding_files(cfg.embeddings)  # missing or repeated files fail before the model loads
    dtype = parse_dtype(cfg.dtype, resolve_device(cfg.device))
    procs = Processes(cfg.device)
    if sd is None:
        sd, dtype = _load_model(cfg, procs.device)
    prompts = [p for c in concepts for p in c.prompts]
    # the shipped embeddings were learned on the shipped model and apply to it alone
    vectors = find_embeddings(sorted({c.token for c in concepts}), sd.text_width, cfg.embeddings, prompts,
                              shipped=cfg.sd is None)
    known = set(sd.concepts.tokens) if sd.concepts is not None else set()
    for tok, vec in vectors.items():
        if tok not in known:
            add_concept(sd, tok, vec.to(sd.device), trainable=False)
    sd.text_encoder.to(dtype)
    sd.check_prompts(prompts)  # a cut-off concept token or an unknown <token> fails before any sampling
    height = cfg.height or sd.resolution
    width = cfg.width or sd.resolution
    if height % sd.vae_downsample or width % sd.vae_downsample:
        raise ValueError(f"height and width must be multiples of {sd.vae_downsample}, got {height}x{width}")
    return _write_images(sd, cfg, concepts, height, width, procs)
