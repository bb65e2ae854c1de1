"""Free transfer inputs: new inputs made from the public ones, at no privacy cost.

The server distills the global student toward the teacher on the public inputs (the warm
start, and after each round); a few dozen public inputs teach a student little. These make
more of them without touching any site's records: images shifted, rotated, scaled and
mixed (mixup), token sequences spliced from two public texts with some tokens dropped.
The teacher labels them, so what the student learns from them is the teacher's, not the
inputs' own labels (there are none).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def augmented_images(images: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` images made from `images` [P, C, H, W] in [0, 1]: each a random affine copy of one
    (shift up to 12% of the side, rotation up to 15 degrees, scale 0.9-1.1), every other one
    mixed with another such copy (weight 0.5-1 on the first). -> [count, C, H, W]"""
    if count <= 0:
        return images[:0]
    first = _affine(images[torch.randint(len(images), (count,), generator=generator)], generator)
    second = _affine(images[torch.randint(len(images), (count,), generator=generator)], generator)
    weight = 0.5 + 0.5 * torch.rand(count, 1, 1, 1, generator=generator)
    weight[1::2] = 1.0  # half are plain augmented copies
    return (weight * first + (1 - weight) * second).clamp(0, 1)


def _affine(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = len(images)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(15)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.24  # in [-1, 1] grid units: 12% of the side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def spliced_tokens(ids: torch.Tensor, count: int, pad_id: int, generator: torch.Generator,
                   drop: float = 0.1) -> torch.Tensor:
    """`count` token sequences made from `ids` [P, L] (right-padded with `pad_id`): the start of one
    public sequence up to a random cut, then the rest of another from the same position, with
    `drop` of the tokens after the first removed. -> [count, L]"""
    if count <= 0:
        return ids[:0]
    length = ids.shape[1]
    first = ids[torch.randint(len(ids), (count,), generator=generator)]
    second = ids[torch.randint(len(ids), (count,), generator=generator)]
    real = (first != pad_id).sum(1).clamp(min=2)
    cut = (torch.rand(count, generator=generator) * real).long().clamp(min=1)
    positions = torch.arange(length)
    spliced = torch.where(positions[None, :] < cut[:, None], first, second)
    keep = (torch.rand(count, length, generator=generator) >= drop) | (positions[None, :] == 0)
    out = torch.full((count, length), pad_id, dtype=ids.dtype)
    for row in range(count):  # drop tokens, close the gaps, pad on the right
        tokens = spliced[row][keep[row] & (spliced[row] != pad_id)]
        out[row, :len(tokens)] = tokens
    return out
