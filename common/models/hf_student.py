"""The text student as a Hugging Face model, for users without fedistill: `export` writes this file
into the student's folder (as modeling_fedistill.py, beside encoder.py; common.models.hf_export) and
names it in config.json's `auto_map`, so that

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

loads it with transformers alone. It reuses encoder.py's modules and forward pass unchanged: the
weights keep their names, and config.json keeps encoder.py's fields beside Hugging Face's.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .encoder import EncoderConfig, StudentEncoder

MODEL_TYPE = "fedistill-student"


class FedistillStudentConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        fields = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(EncoderConfig) if f.name in kwargs}
        super().__init__(**kwargs)
        for name, value in fields.items():  # after Hugging Face's own keys, so that none shadows them
            setattr(self, name, value)

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EncoderConfig)
                                if hasattr(self, f.name)})


class FedistillStudentForSequenceClassification(PreTrainedModel):
    """Token ids [B, T] (the tokenizer saved beside it; padding = `pad_id`) -> class logits [B, C]."""

    config_class = FedistillStudentConfig
    main_input_name = "input_ids"

    def __init__(self, config: FedistillStudentConfig):
        super().__init__(config)
        encoder = StudentEncoder(config.encoder_config())
        for name, module in encoder.named_children():
            self.add_module(name, module)  # encoder.py's modules under their own names
        if encoder.feature_projection is None:
            self.feature_projection = None
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # every weight comes from model.safetensors

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        # The padding mask comes from the token ids, as in training; attention_mask is accepted for pipelines.
        logits = StudentEncoder.distill_outputs(self, input_ids).logits
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


