"""Text teachers: a frozen Hugging Face encoder with a fitted head, a TF-IDF logistic
regression over the same tokens, and their weighted ensemble. All take token ids [B, T]."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def mean_pool(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' states: [B, T, D], [B, T] -> [B, D]."""
    weights = keep.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def sentence_embeddings(encoder: nn.Module, input_ids: torch.Tensor, pad_id: int,
                        attention_layers: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Hugging Face encoder's sentence embeddings [B, D] (mean-pooled, unit length, as
    sentence-transformers computes them for MiniLM) and, for `attention_layers`, its
    attention maps averaged over heads [B, L, T, T]."""
    keep = input_ids != pad_id
    out = encoder(input_ids=input_ids, attention_mask=keep.long(), output_attentions=bool(attention_layers))
    embedding = F.normalize(mean_pool(out.last_hidden_state, keep), dim=-1)
    if not attention_layers:
        return embedding, None
    return embedding, torch.stack([out.attentions[i].mean(dim=1) for i in attention_layers], dim=1)


class EncoderTeacher(nn.Module):
    """A frozen Hugging Face encoder's sentence embedding and a linear head fitted on it."""

    def __init__(self, encoder: nn.Module, num_classes: int, pad_id: int):
        super().__init__()
        self.encoder = encoder
        self.pad_id = pad_id
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, C]
        return self.head(sentence_embeddings(self.encoder, input_ids, self.pad_id)[0])


class TfidfTeacher(nn.Module):
    """scikit-learn's TfidfTransformer (raw counts x smoothed idf, unit length) and a
    LogisticRegression over token ids, as one torch module: it errs differently from the
    encoder, which is what an ensemble needs."""

    def __init__(self, vocab_size: int, num_classes: int, ignore_ids: list[int]):
        super().__init__()
        self.vocab_size = vocab_size
        self.register_buffer("idf", torch.zeros(vocab_size))
        self.register_buffer("counted", torch.ones(vocab_size))
        self.counted[ignore_ids] = 0  # padding and special tokens are not words
        self.linear = nn.Linear(vocab_size, num_classes)

    def tfidf(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, V]
        counts = torch.zeros(input_ids.shape[0], self.vocab_size, device=input_ids.device)
        counts.scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=counts.dtype))
        return F.normalize(counts * self.counted * self.idf, dim=-1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, C]
        return self.linear(self.tfidf(input_ids))


class TeacherEnsemble(nn.Module):
    """log of the weighted mean of the members' class probabilities: [B, T] -> [B, C]."""

    def __init__(self, members: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        total = sum(weights.values())
        self.members = nn.ModuleDict({name: members[name] for name, w in weights.items() if w > 0})
        self.weights = {name: w / total for name, w in weights.items() if w > 0}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.mix({name: member(input_ids) for name, member in self.members.items()}, self.weights)

    @staticmethod
    def mix(member_logits: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
        """log(sum_i w_i softmax(logits_i)) with the weights normalised; [B, C] each -> [B, C]."""
        total = sum(weights[name] for name in member_logits)
        mixed = sum(weights[name] / total * logits.softmax(dim=-1) for name, logits in member_logits.items())
        return mixed.clamp(min=1e-12).log()
