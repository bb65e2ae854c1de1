"""Small text students on a teacher's tokenizer: a transformer encoder, or a bag of embeddings.

Written for Opacus: attention is Linear q/k/v with an explicit softmax (Opacus's
`DPMultiheadAttention` is wrong with `batch_first=True`), position ids are expanded to
[B, T] so the Embedding grad sampler sees one row per sample, and the padding mask is
built inside `forward` from the token ids. The token embeddings can start from the
teacher's (projected to the student's width) and stay frozen, so that per-sample gradients
and DP noise are spent on the layers that learn. Saved and loaded in Hugging Face format
(`save_pretrained` / `from_pretrained`: config.json + model.safetensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

ARCHS = ("transformer", "bag")


@dataclass
class EncoderConfig:
    vocab_size: int
    num_classes: int
    max_length: int = 64
    arch: str = "transformer"   # transformer | bag (mean of token embeddings, then an MLP)
    dim: int = 128              # token embedding width (and hidden width of the transformer)
    layers: int = 2             # transformer blocks
    heads: int = 4
    ff: int = 256               # hidden width of each block's MLP; of the bag's MLP
    feature_dim: int = 0        # > 0: a projection of the pooled state to the teacher's embedding width
    pad_id: int = 0
    freeze_embeddings: bool = True
    labels: list[str] = field(default_factory=list)  # class names, index = class id


class StudentOutputs(NamedTuple):
    logits: torch.Tensor             # [B, C]
    features: torch.Tensor | None    # [B, feature_dim], the projected pooled state
    attentions: list[torch.Tensor]   # per block [B, T, T], averaged over heads


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"student.dim ({dim}) must be a multiple of student.heads ({heads})")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape  # keep: [B, T], True for real tokens
        q, k, v = (proj(x).view(B, T, self.heads, D // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)  # [B, H, T, T]
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)
        y = (probs @ v).transpose(1, 2).reshape(B, T, D)  # [B, T, D]
        return self.out(y), probs.mean(dim=1)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.attention = SelfAttention(config.dim, config.heads)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(nn.Linear(config.dim, config.ff), nn.GELU(), nn.Linear(config.ff, config.dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, attention = self.attention(self.norm1(x), keep)
        x = x + attended
        return x + self.mlp(self.norm2(x)), attention


class StudentEncoder(nn.Module, PyTorchModelHubMixin):
    """Token ids [B, T] (padding = `pad_id`) -> class logits [B, C]."""

    def __init__(self, config: EncoderConfig | dict):
        super().__init__()
        if isinstance(config, dict):  # from_pretrained passes config.json's contents (with Hugging Face's keys)
            config = EncoderConfig(**{f.name: config[f.name] for f in fields(EncoderConfig) if f.name in config})
        if config.arch not in ARCHS:
            raise ValueError(f"student.arch must be one of {', '.join(ARCHS)}, got {config.arch!r}")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.token_embedding.weight.requires_grad_(not config.freeze_embeddings)
        if config.arch == "transformer":
            self.position_embedding = nn.Embedding(config.max_length, config.dim)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
            self.norm = nn.LayerNorm(config.dim)
            width = config.dim
        else:
            self.hidden = nn.Sequential(nn.Linear(config.dim, config.ff), nn.GELU())
            width = config.ff
        self.classifier = nn.Linear(width, config.num_classes)
        self.feature_projection = nn.Linear(width, config.feature_dim) if config.feature_dim else None

    def load_token_embeddings(self, weights: torch.Tensor) -> None:
        """Start from `weights` [vocab, dim] (e.g. the teacher's, projected); frozen if configured."""
        with torch.no_grad():
            self.token_embedding.weight.copy_(weights)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.distill_outputs(input_ids).logits

    def distill_outputs(self, input_ids: torch.Tensor) -> StudentOutputs:
        keep = input_ids != self.config.pad_id  # [B, T]
        x = self.token_embedding(input_ids)  # [B, T, D]
        attentions = []
        if self.config.arch == "transformer":
            B, T = input_ids.shape
            x = x + self.position_embedding(torch.arange(T, device=input_ids.device).expand(B, T))
            for block in self.blocks:
                x, attention = block(x, keep)
                attentions.append(attention)
            x = self.norm(x)
        weights = keep.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # [B, D]
        if self.config.arch == "bag":
            pooled = self.hidden(pooled)
        features = self.feature_projection(pooled) if self.feature_projection is not None else None
        return StudentOutputs(self.classifier(pooled), features, attentions)


def project_embeddings(weights: torch.Tensor, dim: int) -> torch.Tensor:
    """The teacher's token embeddings [V, D_t] projected on their top `dim` principal axes -> [V, dim].

    Deterministic across machines (each axis's sign is fixed by its largest component),
    so every site builds the same frozen embeddings; scaled to unit variance per axis
    over the vocabulary.
    """
    if dim > weights.shape[1]:
        raise ValueError(f"student.dim ({dim}) cannot exceed the teacher's embedding width ({weights.shape[1]})")
    centred = (weights - weights.mean(dim=0)).double()
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    axes = vectors[:, -dim:].flip(-1)  # [D_t, dim], largest first
    signs = torch.sign(axes.gather(0, axes.abs().argmax(dim=0, keepdim=True)))
    projected = centred @ (axes * signs)
    return (projected / projected.std(dim=0)).float()

