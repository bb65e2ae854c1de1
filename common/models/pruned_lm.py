"""A student pruned from the teacher's own layers (Minitron-style), for Llama-family teachers.

Importance is measured once on public records: a layer's by how much it changes the hidden
state (one minus the cosine of its input and output, ShortGPT's block influence), an
attention head's by the mean norm of its output, an MLP channel's by its mean absolute
activation. The student keeps the most important `layers` in their order, the most
important query heads of each key-value group (the teacher's grouping is kept) and, per
layer, as many MLP channels as the parameter budget leaves. Its token embeddings, output
head (tied to them, so the teacher must tie them) and final norm are the teacher's; the
embeddings stay frozen.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass
class PruneConfig:
    budget: float = 0.1  # the student's non-embedding parameters, as a share of the teacher's
    layers: int = 6      # decoder layers kept, the most important in the teacher's order
    heads: int = 0       # query heads kept per layer (a multiple of the key-value heads); 0: all


@dataclass
class Importance:
    """Per layer [L]; per layer and query head [L, H]; per layer and MLP channel [L, F]."""
    layers: torch.Tensor
    heads: torch.Tensor
    channels: torch.Tensor

    def as_tensors(self) -> dict[str, torch.Tensor]:
        return {"layers": self.layers, "heads": self.heads, "channels": self.channels}


class PruneError(ValueError):
    pass


def decoder_layers(teacher: nn.Module) -> nn.ModuleList:
    """The teacher's decoder layers; PruneError unless it is built as Llama is."""
    layers = getattr(getattr(teacher, "model", None), "layers", None)
    first = layers[0] if layers else None
    if (first is None or not all(hasattr(first.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
            or not all(hasattr(first.mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))):
        raise PruneError(f"student=pruned needs a Llama-family teacher (model.layers[i].self_attn.q/k/v/o_proj and "
                         f"mlp.gate/up/down_proj); {type(teacher).__name__} is not one: use student=llama")
    if not teacher.config.tie_word_embeddings:
        raise PruneError("student=pruned needs a teacher whose output head is its token embeddings "
                         "(tie_word_embeddings, as SmolLM2's): the student's frozen head is the embeddings; "
                         "use student=llama")
    return layers


@torch.inference_mode()
def measure_importance(teacher: nn.Module, inputs: torch.Tensor, pad_id: int, batch_size: int = 8) -> Importance:
    """Layer, head and channel importance of `teacher` on the token ids `inputs` [N, T] (padding not counted)."""
    layers = decoder_layers(teacher)
    config = teacher.config
    heads, (_, head_dim) = config.num_attention_heads, _head_layout(config)
    device = next(teacher.parameters()).device
    influence = torch.zeros(len(layers))
    head_norm = torch.zeros(len(layers), heads)
    channel = torch.zeros(len(layers), config.intermediate_size)
    mask: torch.Tensor | None = None

    def layer_hook(index):
        def hook(module, args, kwargs, output):
            before = (args[0] if args else kwargs["hidden_states"]).float()
            after = (output[0] if isinstance(output, tuple) else output).float()
            cosine = nn.functional.cosine_similarity(before, after, dim=-1)
            influence[index] += float((1 - cosine)[mask].sum())
        return hook

    def head_hook(index):
        def hook(module, args):
            per_head = args[0].float().unflatten(-1, (heads, head_dim)).norm(dim=-1)  # [B, T, H]
            head_norm[index] += per_head[mask].sum(0).cpu()
        return hook

    def channel_hook(index):
        def hook(module, args):
            channel[index] += args[0].float().abs()[mask].sum(0).cpu()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(channel_hook(i)))
    tokens = 0
    try:
        for batch in inputs.split(batch_size):
            batch = batch.to(device)
            mask = batch != pad_id
            mask[:, 0] = True
            teacher(input_ids=batch, attention_mask=mask.long())
            tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return Importance(influence / tokens, head_norm / tokens, channel / tokens)


def _head_layout(config) -> tuple[int, int]:
    """(key-value heads, width of a head) of a Llama-family config."""
    return (config.num_key_value_heads or config.num_attention_heads,
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside the token embeddings and output head."""
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def plan_widths(teacher_config, teacher_params: int, config: PruneConfig) -> tuple[int, int]:
    """(query heads, MLP channels) per kept layer, the channels as many as the budget leaves."""
    tc = teacher_config
    kv_heads, head_dim = _head_layout(tc)
    heads = config.heads or tc.num_attention_heads
    if not 1 <= config.layers <= tc.num_hidden_layers:
        raise PruneError(f"student.layers={config.layers}: the teacher has {tc.num_hidden_layers} layers to keep from")
    if heads % kv_heads or tc.hidden_size % heads or not kv_heads <= heads <= tc.num_attention_heads:
        raise PruneError(f"student.heads={config.heads}: give a multiple of the teacher's {kv_heads} key-value heads "
                         f"that divides its width {tc.hidden_size}, up to its {tc.num_attention_heads} query heads "
                         "(0 keeps them all)")
    attention = tc.hidden_size * head_dim * (2 * heads + 2 * kv_heads)
    norms = 2 * tc.hidden_size
    per_channel = 3 * tc.hidden_size
    budget = config.budget * teacher_params
    channels = int((budget - tc.hidden_size) / config.layers - attention - norms) // per_channel
    if channels < 1:
        needed = (config.layers * (attention + norms + per_channel) + tc.hidden_size) / teacher_params
        raise PruneError(f"student.budget={config.budget} ({budget:,.0f} parameters) cannot hold {config.layers} layers "
                         f"with {heads} heads each: raise student.budget to at least {needed:.3f}, or lower "
                         "student.layers or student.heads")
    return heads, min(channels, tc.intermediate_size)


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, in their original order."""
    return scores.topk(count).indices.sort().values


def prune(teacher: nn.Module, importance: Importance, config: PruneConfig) -> LlamaForCausalLM:
    """A LlamaForCausalLM in fp32 on the CPU holding the teacher's most important parts, within the budget."""
    layers = decoder_layers(teacher)
    tc = teacher.config
    kv_heads, head_dim = _head_layout(tc)
    heads, channels = plan_widths(tc, non_embedding_params(teacher), config)
    settings = {k: v for k, v in tc.to_dict().items() if k in LlamaConfig().to_dict()}
    settings |= {"num_hidden_layers": config.layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                 "head_dim": head_dim, "intermediate_size": channels, "attn_implementation": "eager",
                 "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "float32",
                 "attention_bias": False, "mlp_bias": False}
    settings.pop("model_type")
    student = LlamaForCausalLM(LlamaConfig(**settings))
    per_group = tc.num_attention_heads // kv_heads
    keep_per_group = heads // kv_heads

    def weights(module: nn.Module) -> torch.Tensor:
        return module.weight.detach().float().cpu()

    with torch.no_grad():
        student.model.embed_tokens.weight.copy_(weights(teacher.model.embed_tokens))
        student.model.norm.weight.copy_(weights(teacher.model.norm))
        for target, source in zip(student.model.layers, _top(importance.layers, config.layers).tolist()):
            layer = layers[source]
            kept = torch.cat([group * per_group + _top(importance.heads[source, group * per_group:(group + 1) * per_group],
                                                       keep_per_group) for group in range(kv_heads)])
            rows = (kept[:, None] * head_dim + torch.arange(head_dim)).flatten()
            target.self_attn.q_proj.weight.copy_(weights(layer.self_attn.q_proj)[rows])
            target.self_attn.k_proj.weight.copy_(weights(layer.self_attn.k_proj))
            target.self_attn.v_proj.weight.copy_(weights(layer.self_attn.v_proj))
            target.self_attn.o_proj.weight.copy_(weights(layer.self_attn.o_proj)[:, rows])
            mlp = _top(importance.channels[source], channels)
            target.mlp.gate_proj.weight.copy_(weights(layer.mlp.gate_proj)[mlp])
            target.mlp.up_proj.weight.copy_(weights(layer.mlp.up_proj)[mlp])
            target.mlp.down_proj.weight.copy_(weights(layer.mlp.down_proj)[:, mlp])
            target.input_layernorm.weight.copy_(weights(layer.input_layernorm))
            target.post_attention_layernorm.weight.copy_(weights(layer.post_attention_layernorm))
    student.generation_config = copy.deepcopy(teacher.generation_config)
    student.get_input_embeddings().weight.requires_grad_(False)
    student.get_output_embeddings().weight.requires_grad_(False)
    return student.eval()
