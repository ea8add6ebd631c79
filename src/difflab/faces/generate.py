"""Problem 2: DDIM generation with the course face UNet from given noise files.

``FaceSampling`` holds the recipe; its defaults are the one in
``../shared/specs/face_unet.md`` that matched the course's ground-truth images:
50 uniform steps 981, 961, ..., 1 (offset 1), eta 0, the last step landing on t=0 with
alpha_bar[0], x0 clipped to [-1, 1] (direction term keeps the predicted eps), and each
image min-max normalised to [0, 1] before saving with ``save_image`` rounding.

Under ``accelerate launch``/``torchrun``, :func:`generate_dir` shares the batches out among
the processes and the main process writes the folder, byte-identical to one process's.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from difflab.io import PathLike, list_files, load_tensor_file, minmax_normalize, save_png
from difflab.options import Config, option
from difflab.processes import Processes, publish_folder
from difflab.sampling import Denoiser, ddim_sample, ddim_timesteps
from difflab.schedule import NoiseSchedule

NORMALIZE = ("minmax", "clamp")


@dataclass(frozen=True)
class FaceSampling(Config):
    """The DDIM recipe. Defaults reproduce the course's ground truth (see module doc)."""

    steps: int = option(50, "DDIM steps, uniform over T=1000 (50: the course's setting)", minimum=1)
    eta: float = option(0.0, "DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like noise (the graded images use 0)",
                        minimum=0.0)
    offset: int = option(1, "step offset: steps are offset + k*stride, so 1 gives 981, ..., 21, 1 (the grid that "
                         "matched the ground truth) and 0 gives 980, ..., 0", minimum=0)
    clip_x0: Optional[float] = option(1.0, "clip the predicted x0 to [-C, C] at each step; the direction term keeps "
                                      "the predicted eps (none: no clipping)", above=0.0, metavar="C|none")
    last_prev: int = option(0, "where the final step lands: 0 = step t=0 using alpha_bar[0] (the ground-truth recipe "
                            "goes from t=1 to t=0), -1 = the clean image (alpha_bar = 1)", choices=(0, -1))
    normalize: str = option("minmax", "map each final image to [0, 1]: per-image min-max (as the ground truth was) "
                            "or clamp((x+1)/2)", choices=NORMALIZE)
    num_train_steps: int = option(1000, "diffusion steps T of the face UNet's schedule", minimum=1, cli=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        super().validate()
        self.timesteps()  # validates steps/offset against last_prev

    def timesteps(self) -> Tensor:
        ts = ddim_timesteps(self.num_train_steps, self.steps, self.offset)
        if self.last_prev >= int(ts[-1]):
            raise ValueError(
                f"offset {self.offset} puts the last step at t={int(ts[-1])}, which cannot step to last_prev={self.last_prev}; "
                "use last_prev -1 (land on the clean image) with offset 0"
            )
        return ts

    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.linear(self.num_train_steps)


def load_noise(path: PathLike) -> Tensor:
    """One noise file -> a [3, H, W] float32 tensor. Accepts [1, 3, H, W] or [3, H, W]."""
    path = Path(path)
    obj = load_tensor_file(path, "noise file", expected="a [1, 3, H, W] or [3, H, W] float tensor")
    if not obj.is_floating_point():
        raise ValueError(f"{path}: expected a float tensor, got dtype {obj.dtype}")
    shape = tuple(obj.shape)
    if obj.ndim == 4 and shape[0] == 1:
        obj = obj[0]
    if obj.ndim != 3 or obj.shape[0] != 3 or obj.shape[1] < 1 or obj.shape[2] < 1:
        raise ValueError(f"{path}: expected a [1, 3, H, W] or [3, H, W] float tensor, got shape {list(shape)}")
    if not bool(torch.isfinite(obj).all()):
        raise ValueError(f"{path}: noise contains NaN or infinite values")
    return obj.float().contiguous()


def load_noise_dir(folder: PathLike, names: Optional[Sequence[str]] = None) -> tuple[list[str], Tensor]:
    """Read and validate every ``*.pt`` in ``folder`` (or the given stems) before any
    sampling starts. Returns the stems (sorted) and a [N, 3, H, W] batch."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"noise folder not found: {folder}")
    if names is None:
        files = list_files(folder, (".pt",), "noise folder")
        if not files:
            raise ValueError(f"{folder}: no noise files (*.pt) in this folder")
    else:
        files = [folder / f"{n}.pt" for n in names]
    noises = [load_noise(f) for f in files]
    first = tuple(noises[0].shape)
    for f, z in zip(files, noises):
        if tuple(z.shape) != first:
            raise ValueError(f"{f}: shape {list(z.shape)} differs from {files[0].name}'s {list(first)}; all noises must share one size")
    return [f.stem for f in files], torch.stack(noises)


def to_image(x: Tensor, normalize: str) -> Tensor:
    """Map DDIM output in [-1, 1] (roughly) to [0, 1] for saving, per image."""
    if normalize == "minmax":
        return minmax_normalize(x.float())
    if normalize == "clamp":
        return ((x.float() + 1) / 2).clamp(0, 1)
    raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")


def sample_faces(
    denoiser: Denoiser,
    noise: Tensor,
    recipe: FaceSampling = FaceSampling(),
    *,
    eta: Optional[float] = None,
    batch_size: int = 10,
    device: Union[str, torch.device] = "cpu",
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> Tensor:
    """DDIM from each noise in ``noise`` [N, 3, H, W]; returns [N, 3, H, W] images in
    [0, 1] on the CPU (after ``recipe.normalize``).

    ``eta`` overrides ``recipe.eta``. With eta > 0 the per-step noise comes from
    ``generator``, batch by batch, so outputs depend on the seed and the batch size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    eta = recipe.eta if eta is None else eta
    if eta > 0 and generator is None:
        raise ValueError(f"eta={eta!r} draws per-step noise: pass a torch.Generator")
    schedule = recipe.schedule()
    timesteps = recipe.timesteps()
    out = []
    starts = range(0, noise.shape[0], batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=noise.shape[0] * len(timesteps), desc="DDIM", unit="step·img")
    with torch.inference_mode():
        for s in starts:
            x_T = noise[s : s + batch_size].to(device=device, dtype=torch.float32)
            n = x_T.shape[0]
            cb = (lambda i, t, x, x0: bar.update(n)) if bar is not None else None
            x0 = ddim_sample(
                denoiser, schedule, x_T, timesteps, eta=eta, clip_x0=recipe.clip_x0,
                last_prev=recipe.last_prev, generator=generator, callback=cb,
            )
            out.append(to_image(x0, recipe.normalize).cpu())
    if bar is not None:
        bar.close()
    return torch.cat(out)


def save_images(images: Tensor, names: Sequence[str], out_dir: PathLike) -> list[Path]:
    """Write ``images[i]`` to ``out_dir/names[i].png``, each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, name in zip(images, names):
        p = out_dir / f"{name}.png"
        save_png(img, p)
        paths.append(p)
    return paths


def face_denoiser(model, device: torch.device, channels_last: bool = False):
    """The face UNet on ``device`` behind the Denoiser contract.

    ``channels_last`` (off by default; benchmarks/faces.py measures both, docs/results.md)
    hands the network NHWC input.
    """
    from difflab.nets.face_unet import FaceDenoiser

    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return FaceDenoiser(model, channels_last=channels_last)


def generate_dir(
    noise_dir: PathLike,
    out_dir: PathLike,
    unet_path: PathLike,
    recipe: FaceSampling = FaceSampling(),
    *,
    batch_size: int = 10,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """The ``hw2_2.sh`` job: every ``NOISE_DIR/*.pt`` -> ``OUT/<stem>.png``; returns the paths.

    All inputs are validated (noise files, then weights) before sampling; images are
    written only after every sample is done, into a staging folder moved into place
    (:func:`difflab.processes.publish_folder`): an ``out_dir`` that holds files is refused
    unless ``overwrite``, which replaces it whole.

    With several processes each samples whole batches (so use ``batch_size`` < the number
    of noises to share the work) and the main process writes. With eta > 0 the per-step
    noise of a batch follows the previous batch's draws from one generator, so then the
    main process samples every batch.
    """
    from difflab.faces.model_io import load_face_unet

    names, noise = load_noise_dir(noise_dir)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    procs = Processes(device)
    model = load_face_unet(unet_path)
    if noise.shape[-1] % model.downscale or noise.shape[-2] % model.downscale:
        raise ValueError(
            f"{Path(noise_dir) / (names[0] + '.pt')}: size {list(noise.shape[-2:])} is not a multiple of {model.downscale}"
        )
    den = face_denoiser(model, procs.device)
    batches = [(i, min(i + batch_size, len(names))) for i in range(0, len(names), batch_size)]
    if recipe.eta > 0 and procs.count > 1:
        mine = batches if procs.is_main else []
        if procs.is_main:
            print(f"faces generate: eta {recipe.eta:g} > 0 draws each batch's noise after the previous batch's, "
                  f"so the main process samples every batch; the other {procs.count - 1} wait", file=sys.stderr)
    else:
        mine = procs.share(batches)
    done = []
    if mine:
        lo, hi = mine[0][0], mine[-1][1]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        done.append((lo, sample_faces(den, noise[lo:hi], recipe, batch_size=batch_size, device=procs.device,
                                      generator=gen, progress=progress and procs.is_main)))
    gathered = procs.gather(done)
    if procs.is_main:
        images = torch.cat([x for _, x in sorted(gathered, key=lambda r: r[0])])
        publish_folder(out_dir, lambda folder: save_images(images, names, folder), overwrite)
    procs.wait()
    return [Path(out_dir) / f"{name}.png" for name in names]
