"""Distillation losses, each a mean over the batch of per-sample terms, so that Opacus's
per-sample gradients (`loss_reduction="mean"`) are exact.

Teacher targets come precomputed per record (see the tasks' `teacher_targets`): `logits`
[B, C] always; `features` [B, D] and `attention` [B, L, T, T] when those terms are on.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from common.config import DistillConfig

LOGITS, FEATURES, ATTENTION = "logits", "features", "attention"


class SoftLabelLoss(nn.Module):
    """Hinton KD blended with hard labels.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

    KL with `batchmean` (plain "mean" would also divide by the number of classes); T^2
    keeps the soft term's gradient scale independent of T.

    Shapes: student_logits [B, C], teacher_logits [B, C], labels [B] -> scalar.
    """

    def __init__(self, *, temperature: float, alpha: float):
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        hard = F.cross_entropy(student_logits, labels)
        return self.alpha * t * t * soft + (1.0 - self.alpha) * hard


class FeatureLoss(nn.Module):
    """1 - cosine similarity between the student's projected pooled state and the teacher's
    sentence embedding, mean over the batch.

    Shapes: student_features [B, D], teacher_features [B, D] -> scalar.
    """

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        return (1.0 - F.cosine_similarity(student_features, teacher_features.to(student_features.dtype), dim=-1)).mean()


class AttentionLoss(nn.Module):
    """KL(teacher's attention row || student's) per query token, averaged over a sample's real
    tokens, over the chosen layer pairs, then over the batch. Both maps are averaged over
    heads and use the same tokenisation.

    Shapes: student [B, T, T] per pair (list of L), teacher [B, L, T, T], keep [B, T] -> scalar.
    """

    def forward(self, student: list[torch.Tensor], teacher: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        queries = keep.to(teacher.dtype if teacher.is_floating_point() else torch.float32)
        per_sample = 0.0
        for layer, student_map in enumerate(student):
            target = teacher[:, layer].to(student_map.dtype).clamp(min=0)  # [B, T, T]
            # Padded keys have probability 0 in both maps; clamping keeps 0 * log 0 at 0.
            kl = (target * (target.clamp(min=1e-8).log() - student_map.clamp(min=1e-8).log())).sum(dim=-1)  # [B, T]
            per_sample = per_sample + (kl * queries.to(kl.dtype)).sum(dim=-1) / queries.sum(dim=-1).clamp(min=1)
        return (per_sample / len(student)).mean()


class DistillationObjective(nn.Module):
    """The local training loss: soft labels, plus feature and attention terms when weighted.

    Called as objective(student, inputs, labels, targets): one forward of the student,
    the sum of the weighted terms. A student that offers `distill_outputs(inputs)` (logits,
    features, attention maps) supports the feature and attention terms.
    """

    def __init__(self, config: DistillConfig):
        super().__init__()
        self.soft_labels = SoftLabelLoss(temperature=config.temperature, alpha=config.alpha)
        self.feature_weight = config.feature_weight
        self.attention_weight = config.attention_weight
        self.student_layers = [pair[0] for pair in config.attention_layers]
        self.features = FeatureLoss()
        self.attention = AttentionLoss()

    @property
    def target_kinds(self) -> tuple[str, ...]:
        """The teacher targets this objective reads."""
        return (LOGITS,) + ((FEATURES,) if self.feature_weight > 0 else ()) + ((ATTENTION,) if self.attention_weight > 0 else ())

    def forward(self, student: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                targets: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.feature_weight > 0 or self.attention_weight > 0:
            outputs = student.distill_outputs(inputs)
            logits = outputs.logits
        else:
            logits = student(inputs)
        loss = self.soft_labels(logits, targets[LOGITS], labels)
        if self.feature_weight > 0:
            loss = loss + self.feature_weight * self.features(outputs.features, targets[FEATURES])
        if self.attention_weight > 0:
            chosen = [outputs.attentions[i] for i in self.student_layers]
            loss = loss + self.attention_weight * self.attention(chosen, targets[ATTENTION], inputs != student.config.pad_id)
        return loss


TOPK_LOGPROBS, TOPK_IDS = "topk_logprobs", "topk_ids"
NO_BUCKET = -1e9  # the log-probability of a bucket that does not exist
REST_FLOOR = -14.0  # log(1 - mass) is kept above this: float32 cannot tell a smaller rest from 0


class TokenDistillLoss(nn.Module):
    """Token-level KD over the teacher's top-k next-token distribution, blended with
    next-token cross-entropy, masked on padding.

    Per next-token position the teacher's distribution is known as k tokens and the mass
    left over. Both models' distributions are cut into the same k + 1 buckets (those
    tokens, and the rest of the vocabulary), and the KD term is the KL between the
    bucketed distributions: at temperature 1 exactly the part of the full KL that top-k
    can see, and it never asks the student to put all its mass on the k tokens (which a
    KL renormalised over them does, and which makes every other next token nearly
    impossible). Temperature T is applied to the buckets on both sides (p^(1/T), renormalised).

    Per position: alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(q, y). A record's loss is
    the mean over its positions with a next token; the batch's is the mean over records
    (so Opacus's per-sample gradients are exact).

    Shapes: student_logits [B, T, V_out]; labels [B, T] (the next token's output id, -100
    where there is none); topk_logprobs [B, T, k] (the teacher's log-probs); topk_ids
    [B, T, k] (their output ids; repeats, such as several tokens outside the output
    vocabulary mapped to its unknown token, are merged; -1: no target) -> scalar.
    """

    def __init__(self, *, temperature: float, alpha: float):
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor, topk_logprobs: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        positions = (labels != -100).to(student_logits.dtype)  # [B, T]
        # One gather for the k tokens and the label: over a [B, T, vocabulary] tensor each pass counts.
        chosen = F.log_softmax(student_logits, dim=-1).gather(-1, torch.cat([topk_ids, labels[..., None]], -1).clamp(min=0))
        teacher, student, kept = _buckets(chosen[..., :-1], topk_logprobs.to(student_logits.dtype), topk_ids,
                                          vocabulary=student_logits.shape[-1])
        # A finite fill: a position with no bucket at all (padding) must not give NaN gradients.
        teacher_t = (teacher / t).masked_fill(~kept, NO_BUCKET).log_softmax(-1)
        student_t = (student / t).masked_fill(~kept, NO_BUCKET).log_softmax(-1)
        per_token_kl = (teacher_t.exp() * (teacher_t - student_t)).masked_fill(~kept, 0.0).sum(-1)  # [B, T]
        per_token = self.alpha * t * t * per_token_kl - (1.0 - self.alpha) * chosen[..., -1]
        per_record = (per_token * positions).sum(-1) / positions.sum(-1).clamp(min=1.0)
        return per_record.mean()


def _buckets(student_top: torch.Tensor, topk_logprobs: torch.Tensor, topk_ids: torch.Tensor,
             vocabulary: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the k + 1 buckets for teacher and student, and which buckets exist.

    The student's log-probabilities at the teacher's top-k ids [B, T, k], the teacher's
    [B, T, k], the ids [B, T, k], the size of the student's vocabulary -> [B, T, k + 1] twice
    (the last bucket: every other token), [B, T, k + 1] bool (a repeated id's bucket is
    merged into its first occurrence; no last bucket where the k tokens are the whole vocabulary).
    """
    valid = topk_ids >= 0
    ids = torch.where(valid, topk_ids, topk_ids.max(-1, keepdim=True).values.clamp(min=0))  # -1: a valid id's repeat
    same = (ids[..., :, None] == ids[..., None, :]) & valid[..., None, :]  # [B, T, k, k]
    first = valid & ~same.tril(diagonal=-1).any(-1)
    # A merged bucket holds the probability of all its repeats (the student's once).
    teacher_top = topk_logprobs[..., None, :].masked_fill(~same, float("-inf")).logsumexp(-1)
    teacher_rest = _rest(topk_logprobs, valid)
    student_rest = _rest(student_top, first)
    has_rest = valid.any(-1, keepdim=True) & (first.sum(-1, keepdim=True) < vocabulary)  # none when k covers it
    teacher = torch.cat([teacher_top, teacher_rest], -1)
    student = torch.cat([student_top, student_rest], -1)
    kept = torch.cat([first, has_rest], -1)
    return teacher.masked_fill(~kept, 0.0), student.masked_fill(~kept, 0.0), kept


def _rest(log_probs: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """log(1 - the mass of the counted tokens) [B, T, 1], at least REST_FLOOR."""
    mass = log_probs.masked_fill(~counted, float("-inf")).logsumexp(-1, keepdim=True).exp()
    return torch.log1p(-mass.clamp(max=1 - math.exp(REST_FLOOR)))


class TokenDistillObjective(nn.Module):
    """The local training loss of causal-LM tasks: `TokenDistillLoss` on one forward.

    Called as objective(student, inputs, labels, targets) with inputs the token ids [B, T]
    (padding where labels are -100 at the previous position) and labels the next tokens'
    output ids [B, T].
    """

    target_kinds = (TOPK_LOGPROBS, TOPK_IDS)

    def __init__(self, config: DistillConfig):
        super().__init__()
        self.tokens = TokenDistillLoss(temperature=config.temperature, alpha=config.alpha)

    def forward(self, student: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                targets: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = student(inputs, attention_mask=attention_mask(labels))
        return self.tokens(logits, labels, targets[TOPK_LOGPROBS], targets[TOPK_IDS])


def attention_mask(labels: torch.Tensor) -> torch.Tensor:
    """Real tokens of a right-padded record [B, T] from its next-token labels: token i is real if it
    predicts something (labels[i] != -100) or follows one that did (the record's last token)."""
    predicts = labels != -100
    follows = torch.nn.functional.pad(predicts[:, :-1], (1, 0), value=True)
    return (predicts | follows).long()
