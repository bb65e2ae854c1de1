"""Logits on the wire: float32, float16, or top-k per row with the rest rebuilt.

top-k sends, per row, the k largest logits (float16), their class indices (uint16) and the
row's log-sum-exp (float32), so the server rebuilds the top-k probabilities exactly (to
float16 precision) and spreads the remaining probability mass evenly over the other classes.
"""

from __future__ import annotations

import numpy as np
import torch

LOGITS, VALUES, INDICES, LOGSUMEXP = "logits", "values", "indices", "logsumexp"


def encode(logits: torch.Tensor, *, method: str, k: int) -> dict[str, np.ndarray]:
    """logits [P, C] float32 -> named arrays for an ArrayRecord."""
    logits = logits.detach().float()
    if method == "float32":
        return {LOGITS: logits.numpy()}
    if method == "float16":
        return {LOGITS: logits.half().numpy()}
    if method == "topk":
        values, indices = logits.topk(min(k, logits.shape[1]), dim=1)  # [P, k]
        return {
            VALUES: values.half().numpy(),
            INDICES: indices.to(torch.int32).numpy().astype(np.uint16),
            LOGSUMEXP: logits.logsumexp(dim=1).numpy(),  # [P]
        }
    raise ValueError(f"unknown compression {method!r}: use float32, float16 or topk")


def expected_arrays(*, method: str, k: int, rows: int, classes: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The (shape, dtype) of every array `encode` produces for a [rows, classes] input."""
    if method == "float32":
        return {LOGITS: ((rows, classes), "float32")}
    if method == "float16":
        return {LOGITS: ((rows, classes), "float16")}
    k = min(k, classes)
    return {VALUES: ((rows, k), "float16"), INDICES: ((rows, k), "uint16"), LOGSUMEXP: ((rows,), "float32")}


def decode(arrays: dict[str, np.ndarray], *, method: str, classes: int) -> torch.Tensor:
    """Named arrays -> logits [P, C] float32 (log-probabilities for top-k)."""
    if method in ("float32", "float16"):
        return torch.from_numpy(np.asarray(arrays[LOGITS], dtype=np.float32))
    values = torch.from_numpy(np.asarray(arrays[VALUES], dtype=np.float32))  # [P, k]
    indices = torch.from_numpy(np.asarray(arrays[INDICES]).astype(np.int64))  # [P, k]
    lse = torch.from_numpy(np.asarray(arrays[LOGSUMEXP], dtype=np.float32)).unsqueeze(1)  # [P, 1]
    top_logp = values - lse  # [P, k]
    rest = classes - values.shape[1]
    out = torch.empty(values.shape[0], classes)
    if rest > 0:
        tail_mass = (1 - top_logp.exp().sum(dim=1, keepdim=True)).clamp_min(1e-12)  # [P, 1]
        out[:] = (tail_mass / rest).log()
    out.scatter_(1, indices, top_logp)
    return out
