"""The built-in image models: a CNN teacher and a small MLP student."""

from __future__ import annotations

import time

import torch
from safetensors.torch import save
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W] -> [B, classes]
        return self.head(self.features(x))


class StudentMLP(nn.Module):
    """Flatten, then Linear + ReLU per hidden width, then the classifier. Opacus-compatible."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, hidden: list[int]):
        super().__init__()
        width = in_shape[0] * in_shape[1] * in_shape[2]
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W] -> [B, classes]
        return self.net(x)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_bytes(model: nn.Module) -> int:
    """On-disk size of the model's state_dict as a safetensors file."""
    return len(save({k: v.detach().contiguous() for k, v in model.state_dict().items()}))


@torch.inference_mode()
def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 200) -> float:
    """Median single-sample forward latency in milliseconds, on one CPU thread.

    One thread, because a single sample gains nothing from more and the figure should not
    depend on what else the machine (e.g. a simulation's workers) is doing.
    """
    model.eval()
    x = example[:1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(10):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    times.sort()
    return 1000 * times[len(times) // 2]

