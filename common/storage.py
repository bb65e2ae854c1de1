"""Atomic file writes (a reader sees the old file or the new one, never half of either) and
the lock under which a cache entry is computed once."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save
from torch import nn


def atomic_write(path: Path, data: bytes, *, durable: bool = False, mode: int = 0o644) -> None:
    """Write `data` to `path` through a temporary file and a rename; the file gets `mode`
    (0644 by default: mkstemp's 0600 would hide reports from the user's other tools).

    `durable` also fsyncs the file and its folder, so the write survives a power loss
    (the privacy ledger needs that; caches and reports do not).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def filling(entry: Path) -> Iterator[None]:
    """Hold `entry`'s lock while checking for it and computing it: processes sharing a cache
    (simulation workers, sites, test workers) wait for the one computing a teacher or its outputs
    and then read its file, instead of each computing it at once."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def private_folder(path: Path) -> Path:
    """`path` as a folder only its owner may enter (0700), created with its parents if missing
    (the parents keep the modes they have or get by default)."""
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], *, durable: bool = False) -> Path:
    """Named tensors as safetensors, written atomically (and fsynced where `durable`)."""
    atomic_write(path, save({k: v.detach().contiguous() for k, v in tensors.items()}), durable=durable)
    return path


def save_model(path: Path, model: nn.Module, *, durable: bool = False) -> Path:
    """The model's state_dict as safetensors, written atomically (and fsynced where `durable`)."""
    return save_tensors(path, untied_state(model), durable=durable)


def untied_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with a tensor tied to several names (a causal LM's embeddings and
    output head) kept once, under its first name, as `safetensors.torch.load_model` expects."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride()) if isinstance(tensor, torch.Tensor) else name
        if key not in seen:
            seen.add(key)
            tensors[name] = tensor
    return tensors


def jsonable(value: Any) -> Any:
    """JSON has no inf or NaN: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(jsonable(obj), indent=2).encode())
