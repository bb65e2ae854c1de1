"""Where tensors run: the `device` setting (the run's config; a site's own file for that site).

`auto` takes CUDA, then Apple's MPS, else the CPU. Models and data live on the CPU between
steps (payloads, caches and exports are CPU tensors); the heavy passes (the teacher's, DP
training, the server's distillation, evaluation) move the model there for the pass and
each batch as it is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from common.config_base import ConfigError, check_device

CPU = torch.device("cpu")


def torch_device(name: str) -> torch.device:
    """The device `name` says; ConfigError when this machine has none such, with the fix."""
    check_device(name, where="device")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ConfigError(f"device={name}, but this torch sees {torch.cuda.device_count()} CUDA device(s) "
                          f"(torch {torch.__version__}): install the CUDA build of torch, or set device=auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name}, but MPS is not available here: set device=auto or cpu")
    return device


def has_accelerator(name: str) -> bool:
    """Whether `name` means an accelerator here (auto: one is present), for defaults by device
    class; it does not check that a named one exists (torch_device does)."""
    if name == "auto":
        return torch.cuda.is_available() or torch.backends.mps.is_available()
    return name != "cpu"


def describe_device(name: str) -> str:
    """The device `name` resolves to, in words, for benchmark results: its kind, model and torch."""
    device = torch_device(name)
    model = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return f"{device.type}{': ' + model if model else ''}, torch {torch.__version__}"


def teacher_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a CUDA device with bf16 units; float32 elsewhere: on CPUs without bf16
    hardware the teacher's bf16 pass measured seven times slower than fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def placed(model: nn.Module, device: torch.device) -> Iterator[torch.device]:
    """`model` on `device` for the block, back on the CPU after it (also on failure); yields
    where it runs: the CPU for an int8 copy, whose kernels run there only."""
    if any(module.__module__.startswith("torch.ao.nn.quantized") for module in model.modules()):
        device = CPU
    model.to(device)
    try:
        yield device
    finally:
        model.to(CPU)


def seeded_on(device: torch.device, generator: torch.Generator) -> torch.Generator:
    """A generator on `device` seeded from `generator` (a CPU one), for noise drawn where the
    parameters are: under DP `generator` is seeded from the operating system, so this one is too."""
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)
