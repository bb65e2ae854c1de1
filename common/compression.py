"""A student's outputs on the wire, as log-probabilities: float32, float16, or top-k per row.

Log-probabilities are bounded above by 0 and lose nothing that matters to float16: the
large ones (the likely classes) are the precise ones, whereas raw logits of large magnitude
are not (float16 has a step of 0.5 at 1,000). top-k sends, per row, the k largest
log-probabilities (float16) and their class indices (uint16); the server rebuilds those
probabilities and spreads the remaining mass evenly over the other classes.
"""

from __future__ import annotations

import numpy as np
import torch

LOGITS, VALUES, INDICES = "logits", "values", "indices"


def encode(logits: torch.Tensor, *, method: str, k: int) -> dict[str, np.ndarray]:
    """logits [P, C] -> named arrays of log-probabilities for an ArrayRecord."""
    logp = torch.log_softmax(logits.detach().float(), dim=-1)  # [P, C]
    if method == "float32":
        return {LOGITS: logp.numpy()}
    if method == "float16":
        return {LOGITS: logp.half().numpy()}
    if method == "topk":
        values, indices = logp.topk(min(k, logp.shape[1]), dim=1)  # [P, k]
        return {VALUES: values.half().numpy(), INDICES: indices.to(torch.int32).numpy().astype(np.uint16)}
    raise ValueError(f"unknown compression {method!r}: use float32, float16 or topk")


def expected_arrays(*, method: str, k: int, rows: int, classes: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The (shape, dtype) of every array `encode` produces for a [rows, classes] input."""
    if method == "float32":
        return {LOGITS: ((rows, classes), "float32")}
    if method == "float16":
        return {LOGITS: ((rows, classes), "float16")}
    k = min(k, classes)
    return {VALUES: ((rows, k), "float16"), INDICES: ((rows, k), "uint16")}


def decode(arrays: dict[str, np.ndarray], *, method: str, classes: int) -> torch.Tensor:
    """Named arrays -> log-probabilities [P, C] float32."""
    if method in ("float32", "float16"):
        return torch.from_numpy(np.asarray(arrays[LOGITS], dtype=np.float32))
    top_logp = torch.from_numpy(np.asarray(arrays[VALUES], dtype=np.float32))  # [P, k]
    indices = torch.from_numpy(np.asarray(arrays[INDICES]).astype(np.int64))  # [P, k]
    rest = classes - top_logp.shape[1]
    out = torch.empty(top_logp.shape[0], classes)
    if rest > 0:
        tail_mass = (1 - top_logp.exp().sum(dim=1, keepdim=True)).clamp_min(1e-12)  # [P, 1]
        out[:] = (tail_mass / rest).log()
    out.scatter_(1, indices, top_logp)
    return out
