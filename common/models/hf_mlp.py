"""The MLP students of the image and tabular tasks as Hugging Face models, for users without fedistill:
`export` writes this file into the run's student/ folder (as modeling_fedistill.py, beside image.py;
common.models.hf_export), so that

    AutoModel.from_pretrained(folder, trust_remote_code=True)

loads it with transformers alone. It holds image.py's StudentMLP layers under their own names.
Inputs are what the task feeds its student: images [B, C, H, W] in [0, 1], or a table's encoded
rows [B, features] (config.json's `encoding` says how rows are encoded).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .image import StudentMLP

MODEL_TYPE = "fedistill-mlp"


class FedistillMLPConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, input_shape: list[int] | None = None, num_classes: int = 2, hidden: list[int] | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.input_shape, self.num_classes, self.hidden = list(input_shape or [1]), num_classes, list(hidden or [])


class FedistillMLPForClassification(PreTrainedModel):
    """Inputs [B, *input_shape] -> class logits [B, num_classes]."""

    config_class = FedistillMLPConfig
    main_input_name = "inputs"

    def __init__(self, config: FedistillMLPConfig):
        super().__init__(config)
        self.net = StudentMLP(tuple(config.input_shape), config.num_classes, config.hidden).net
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # every weight comes from model.safetensors

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> ImageClassifierOutput:
        logits = self.net(inputs)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)

