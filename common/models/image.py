"""The built-in small models: a CNN teacher for images and an MLP student over any flat input."""

from __future__ import annotations

import math

import torch
from torch import nn


class TeacherCNN(nn.Module):
    """Conv blocks (conv 3x3, ReLU, max-pool 2) then a hidden layer and the classifier."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, channels: list[int], hidden: int):
        super().__init__()
        c, h, w = in_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, *in_shape] -> [B, classes]
        return self.head(self.features(x))


class StudentMLP(nn.Module):
    """Flatten, then Linear + ReLU per hidden width, then the classifier. Opacus-compatible."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: list[int]):
        super().__init__()
        width = math.prod(in_shape)  # an image's [C, H, W], a table's encoded [features]
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, *in_shape] -> [B, classes]
        return self.net(x)
