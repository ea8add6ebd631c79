"""Scaled dot-product attention for every network here.

``F.scaled_dot_product_attention`` (torch >= 2.0) when the installed torch has it; else
(the course's torch 1.11) the same product written out: softmax(q k^T / sqrt(d)) v, in
the inputs' dtype. The two agree to float rounding, not bit for bit.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

_SDPA = getattr(F, "scaled_dot_product_attention", None)


def attention(q: Tensor, k: Tensor, v: Tensor, fused: bool = True) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dims: q [..., Lq, d], k [..., Lk, d],
    v [..., Lk, dv] -> [..., Lq, dv]. ``fused=False`` forces the written-out form."""
    if fused and _SDPA is not None:
        return _SDPA(q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.matmul(scores.softmax(dim=-1), v)
