"""A small Llama-style causal LM student on a teacher's tokenizer, written for Opacus.

The student is a Hugging Face `LlamaForCausalLM` (so it saves with `save_pretrained` and
loads with `AutoModelForCausalLM.from_pretrained`) whose token embeddings are the
teacher's, projected to the student's width, tied to the output head and frozen: a
student sharing a 49k-token vocabulary is otherwise almost all embedding, and DP noise and
per-sample gradients would be spent on it. During distillation the logits are computed
over an output vocabulary (the tokens a public corpus uses), since the [B, T, vocab]
logits dominate a CPU step; the exported model keeps the full head, whose rows are the same
frozen embeddings (the task tells `generate` to leave out the rows outside the output vocabulary).

Opacus computes per-sample gradients of `nn.Linear` itself; Llama's RMSNorm gets the
grad sampler below (Opacus ships one for `nn.RMSNorm` only). Attention is the eager
implementation: Linear q/k/v/o and an explicit softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm


@dataclass
class StudentLMConfig:
    dim: int = 128       # hidden width (and the projected embeddings' width)
    layers: int = 2
    heads: int = 4
    ff: int = 384        # width of each block's gated MLP
    max_length: int = 128  # tokens per record


@register_grad_sampler(LlamaRMSNorm)
def rms_norm_grad_sample(layer: LlamaRMSNorm, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-sample gradient of RMSNorm's weight: sum over positions of x / rms(x) * dL/dy."""
    x = activations[0]
    if not layer.weight.requires_grad:
        return {}
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.variance_epsilon)
    return {layer.weight: (normed * backprops).reshape(x.shape[0], -1, x.shape[-1]).sum(1)}


class StudentLM(nn.Module):
    """Token ids [B, T] and a padding mask -> next-token logits [B, T, len(output_ids)]."""

    def __init__(self, model: LlamaForCausalLM, output_ids: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("output_ids", output_ids, persistent=False)

    @property
    def config(self) -> LlamaConfig:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the output vocabulary: the exported model's logits at `output_ids`."""
        hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden @ self.model.model.embed_tokens.weight[self.output_ids].T  # frozen: no per-sample gradient


def build_student(config: StudentLMConfig, embeddings: torch.Tensor, output_ids: torch.Tensor, *,
                  bos_id: int | None, eos_id: int | None, pad_id: int | None) -> StudentLM:
    """A student whose frozen, tied embeddings are `embeddings` [V, config.dim] (the teacher's,
    projected with `project_embeddings`)."""
    if config.dim % config.heads:
        raise ValueError(f"student.dim ({config.dim}) must be a multiple of student.heads ({config.heads})")
    llama = LlamaConfig(
        vocab_size=embeddings.shape[0], hidden_size=config.dim, intermediate_size=config.ff,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=config.max_length, tie_word_embeddings=True,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, attn_implementation="eager",
    )
    model = LlamaForCausalLM(llama)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embeddings)
    model.model.embed_tokens.weight.requires_grad_(False)  # tied: the head is frozen with it
    with torch.no_grad():
        # Unit-variance embeddings as the head would give logits of standard deviation
        # sqrt(dim) from a unit-RMS state: start the last norm at 1 / sqrt(dim) (it is trained).
        model.model.norm.weight.fill_(config.dim ** -0.5)
    return StudentLM(model, output_ids)
