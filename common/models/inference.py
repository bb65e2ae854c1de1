"""What a model costs at inference: parameters, size on disk, single-sample latency where it lives; int8 copies."""

from __future__ import annotations

import copy
import io
import time
import warnings

import torch
from safetensors.torch import save
from torch import nn

from common.storage import untied_state


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_bytes(model: nn.Module) -> int:
    """On-disk size of the model's weights: as safetensors, or as `torch.save` writes an int8
    model (its packed weights are not plain tensors, which safetensors holds)."""
    state = untied_state(model)
    if all(isinstance(v, torch.Tensor) and not v.is_quantized for v in state.values()):
        return len(save({k: v.detach().cpu().contiguous() for k, v in state.items()}))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy with every Linear layer dynamically quantized: int8 weights, activations quantized
    per batch at run time. For CPU inference; the copy cannot be trained."""
    with warnings.catch_warnings():
        # torch.ao's eager quantization still works but announces its move to torchao.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


@torch.inference_mode()
def latency_ms(model: nn.Module, example: torch.Tensor, *, repeats: int = 200, budget_s: float = 5.0) -> float:
    """Median single-sample forward latency in milliseconds on the device the model is on (on a
    CPU, one thread), over `repeats` forwards or as many as fit in about `budget_s` (at least 5:
    an LLM's forward takes a second on a CPU).

    One CPU thread, because a single sample gains nothing from more and the figure should not
    depend on what else the machine (e.g. a simulation's workers) is doing.
    """
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    x = example[:1].to(device)
    finished = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            model(x)
        finished()
        times: list[float] = []
        while len(times) < repeats and (len(times) < 5 or sum(times) < budget_s):
            start = time.perf_counter()
            model(x)
            finished()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    times.sort()
    return 1000 * times[len(times) // 2]


def describe(model: nn.Module, example: torch.Tensor, tokens: int | None = None) -> dict:
    """Parameters, size on disk and single-sample latency (ms) of `model` on `example[:1]`, where
    the model is; with
    `tokens` (the predictions one forward makes, a causal LM's), also tokens per second."""
    cost = {"params": count_params(model), "size_bytes": size_bytes(model), "latency_ms": latency_ms(model, example)}
    if tokens:
        cost["tokens_per_s"] = tokens * 1000 / cost["latency_ms"]
    return cost
