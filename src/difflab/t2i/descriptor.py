"""Stage 1b of ``difflab t2i train`` (with ``p_descriptor`` > 0): the descriptor network.

Some captions put the pseudo-word ``*`` in the name slot; its input embedding is replaced
by a learned projection of the image's *descriptor*: the features of a small digit
network (:class:`DescriptorNet`) trained on the images of the nine *named* digits only,
and frozen. 7s get descriptors too (no label is used to compute one), so the name slot
learns to carry how any digit looks, and textual inversion can reach a digit that has no
word. The network (``OUT/descriptor``) and the projection (in each checkpoint) are
training aids: the exported model is plain SD.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from difflab.data import BalancedDigits, DigitSet
from difflab.io import PathLike, load_tensors, save_tensors
from difflab.t2i.captions import DIGIT_NAMES, HELD_OUT_DIGIT
from difflab.t2i.config import T2ITrainConfig
from difflab.t2i.stages import Run, Stage, init_seed, stage_generator
from difflab.training import LocalAccelerator, Loop, cosine_lr, run_loop, seeded_init

# Its own optimisation, apart from the diffusion options in T2ITrainConfig: a small
# classifier trained from scratch on the CPU, in fp32, for cfg.descriptor_steps steps.
DESCRIPTOR_LR = 2e-3  # peak AdamW rate (default weight decay): a small network from scratch takes a higher rate
DESCRIPTOR_WARMUP = 100  # steps of linear warm-up before the cosine decay
DESCRIPTOR_MIN_LR_RATIO = 0.05  # the cosine ends at this fraction of DESCRIPTOR_LR
DESCRIPTOR_BATCH = 128  # images per step: about 7 of each (dataset, named digit) pair
FINAL_WINDOW = 50  # steps averaged for the recorded training accuracy
DIGIT_SIZE = 28  # the descriptor sees the digits at their native size
MASKED_LOGIT = -1e4  # the held-out digit's logit: exp() is 0 in float32, so it gets no probability or gradient


class DescriptorNet(torch.nn.Module):
    """A digit's form -> a ``features``-number descriptor (and 10 logits, for training).

    It sees only the form: grayscale, standardised per image, so colour and brightness
    cannot pass. Trained as a classifier of the nine named digits (the held-out digit's
    images are never shown to it, and its logit is masked), its features still tell a 7
    apart from the others (a linear probe on them finds held-out MNIST-M 7s:
    ``benchmarks/descriptor_probe.py``).
    """

    def __init__(self, hidden: int = 32, features: int = 32):
        super().__init__()
        act = torch.nn.SiLU()
        side = DIGIT_SIZE // 4  # after two stride-2 convolutions
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, hidden, 3, padding=1), act,
            torch.nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), act,
            torch.nn.Conv2d(hidden, 2 * hidden, 3, padding=1), act,
            torch.nn.Conv2d(2 * hidden, 2 * hidden, 3, stride=2, padding=1), act,
            torch.nn.Flatten(), torch.nn.Linear(2 * hidden * side * side, features),
        )
        self.norm = torch.nn.LayerNorm(features)
        self.head = torch.nn.Linear(features, 10)

    @staticmethod
    def form(x: Tensor) -> Tensor:
        """[B, 3, 28, 28] in [-1, 1] -> per-image standardised grayscale [B, 1, 28, 28]."""
        g = x.float().mean(1, keepdim=True)
        return (g - g.mean(dim=(2, 3), keepdim=True)) / (g.std(dim=(2, 3), keepdim=True) + 1e-3)

    def features(self, x: Tensor) -> Tensor:
        return self.norm(self.body(self.form(x)))

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(F.silu(self.features(x)))
        return logits.index_fill(1, torch.tensor([HELD_OUT_DIGIT], device=logits.device), MASKED_LOGIT)


def named_only(data: BalancedDigits) -> BalancedDigits:
    """The same datasets without any image of the held-out digit."""
    return BalancedDigits([DigitSet(s.name, s.images[s.labels != HELD_OUT_DIGIT], s.labels[s.labels != HELD_OUT_DIGIT])
                           for s in data.sets])


def train_descriptor(data: BalancedDigits, cfg: T2ITrainConfig, progress: bool,
                     aux: Optional[Callable[[DescriptorNet], torch.nn.Module]] = None) -> tuple[DescriptorNet, dict]:
    """Stage 1b: the descriptor network, a classifier of the nine named digits (CPU, fp32).

    :param aux: for experiments (``benchmarks/descriptor_probe.py``): builds, right after
        the network, a module whose ``(net, step)`` call returns a loss added to the
        classification loss; its parameters are trained too. Its batches should come from
        ``stage_generator(seed, Stage.DESCRIPTOR_AUX, step, 0)``.
    """
    named = named_only(data)
    with seeded_init(init_seed(cfg.seed, Stage.DESCRIPTOR)):
        net = DescriptorNet()
        extra = aux(net) if aux is not None else None
    opt = torch.optim.AdamW(list(net.parameters()) + (list(extra.parameters()) if extra is not None else []),
                            lr=DESCRIPTOR_LR)

    def loss_step(step: int):
        x, y, _ = named.batch(stage_generator(cfg.seed, Stage.DESCRIPTOR, step, 0), DESCRIPTOR_BATCH)
        logits = net(x)
        loss = F.cross_entropy(logits, y.long())
        if extra is not None:
            loss = loss + extra(net, step)
        return loss, {"acc": float((logits.argmax(1) == y).float().mean())}

    steps = cfg.descriptor_steps
    history = run_loop(Loop(LocalAccelerator(), opt, loss_step, end=steps, show="acc", desc="t2i descriptor",
                            lr=lambda step: cosine_lr(DESCRIPTOR_LR, DESCRIPTOR_WARMUP, steps, DESCRIPTOR_MIN_LR_RATIO, step),
                            progress=progress))
    recent = history.get("acc", [])[-FINAL_WINDOW:]
    return net.eval().requires_grad_(False), {"descriptor_steps": steps,
                                              "descriptor_train_acc": round(sum(recent) / max(1, len(recent)), 4)}


def read_descriptor_net(path: PathLike) -> DescriptorNet:
    """A saved descriptor network (``OUT/descriptor/descriptor.safetensors``), frozen."""
    net = DescriptorNet()
    net.load_state_dict(load_tensors(path))
    return net.eval().requires_grad_(False)


def descriptor_stage(run: Run) -> Optional[DescriptorNet]:
    """Stage 1b: the run's descriptor network on its device (read from ``OUT/descriptor``,
    or trained and written there first); None when the run has no descriptor captions."""
    if run.cfg.p_descriptor <= 0:
        return None
    path = run.out / "descriptor" / "descriptor.safetensors"
    if path.is_file():
        net = read_descriptor_net(path)
    else:
        net, facts = train_descriptor(run.data, run.cfg, run.show)
        run.facts.update(facts)
        if run.main:
            save_tensors(net.state_dict(), path)
    return net.to(run.accelerator.device)


def splice_descriptors(text, mark_id: int):
    """Install a forward hook on ``text``'s input embedding that replaces the rows of token
    ``mark_id`` by ``state["vectors"][batch row]`` while ``state["vectors"]`` is set.
    Returns (state, hook handle)."""
    state: dict = {"vectors": None}

    def hook(module, inputs, output):
        vectors = state["vectors"]
        if vectors is None:
            return output
        mask = (inputs[0] == mark_id).unsqueeze(-1)
        return torch.where(mask, vectors.to(output.dtype).unsqueeze(1), output)

    return state, text.get_input_embeddings().register_forward_hook(hook)


def name_ids(tokenizer) -> list[int]:
    """Token ids of the nine named digits."""
    return [tokenizer.convert_tokens_to_ids(n + "</w>") for i, n in enumerate(DIGIT_NAMES) if i != HELD_OUT_DIGIT]
