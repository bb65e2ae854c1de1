"""student=pruned: the student holds exactly the teacher's kept layers, heads and channels
(it computes what the teacher computes with the rest removed), importance ranks what
matters, the budget is kept, and Opacus trains it; task=lm builds it from its teacher."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from transformers import LlamaConfig, LlamaForCausalLM

from common.config import ConfigError, load_config
from common.models.pruned_lm import (Importance, PruneConfig, PruneError, measure_importance, non_embedding_params,
                                     plan_widths, prune)
from common.tasks import build_task

LAYERS, HEADS, KV_HEADS, HEAD_DIM, FF, WIDTH = 4, 6, 2, 4, 24, 24


def _teacher(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=WIDTH, intermediate_size=FF, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         max_position_embeddings=32, tie_word_embeddings=tie, attn_implementation="eager")
    teacher = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms off 1, so a copied norm is told from a fresh one
        for name, param in teacher.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    return teacher


def _importance() -> Importance:
    torch.manual_seed(1)
    return Importance(layers=torch.tensor([0.9, 0.1, 0.5, 0.7]), heads=torch.rand(LAYERS, HEADS),
                      channels=torch.rand(LAYERS, FF))


def _logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _removed(teacher: LlamaForCausalLM, importance: Importance, layers: int, heads: int, channels: int) -> LlamaForCausalLM:
    """The teacher with the unkept parts zeroed out of its outputs and the unkept layers removed."""
    reference = copy.deepcopy(teacher)
    kept_layers = importance.layers.topk(layers).indices.sort().values.tolist()
    per_group, keep = HEADS // KV_HEADS, heads // KV_HEADS
    with torch.no_grad():
        for index in kept_layers:
            layer = reference.model.layers[index]
            for head in range(HEADS):
                group = head // per_group
                ranked = importance.heads[index, group * per_group:(group + 1) * per_group].argsort(descending=True)
                if head - group * per_group not in ranked[:keep].tolist():
                    layer.self_attn.o_proj.weight[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
            dropped = importance.channels[index].argsort(descending=True)[channels:]
            layer.mlp.down_proj.weight[:, dropped] = 0
    reference.model.layers = torch.nn.ModuleList(reference.model.layers[i] for i in kept_layers)
    reference.config.num_hidden_layers = layers
    return reference


def test_the_pruned_student_computes_what_the_teacher_does_without_the_unkept_parts():
    teacher, importance = _teacher(), _importance()
    student = prune(teacher, importance, PruneConfig(budget=0.5, layers=3, heads=4))
    heads, channels = plan_widths(teacher.config, non_embedding_params(teacher), PruneConfig(budget=0.5, layers=3, heads=4))
    assert (student.config.num_hidden_layers, student.config.num_attention_heads) == (3, 4)
    assert student.config.intermediate_size == channels < FF
    ids = torch.randint(0, 50, (2, 10))
    assert torch.allclose(_logits(student, ids), _logits(_removed(teacher, importance, 3, heads, channels), ids), atol=1e-5)
    # kept everything: the teacher itself
    whole = prune(teacher, importance, PruneConfig(budget=1.0, layers=LAYERS, heads=0))
    assert torch.allclose(_logits(whole, ids), _logits(teacher, ids), atol=1e-5)
    assert not whole.get_input_embeddings().weight.requires_grad
    assert not whole.get_output_embeddings().weight.requires_grad


def test_the_budget_is_kept_and_filled():
    teacher = _teacher()
    total = non_embedding_params(teacher)
    for budget in (0.3, 0.45, 0.6):
        student = prune(teacher, _importance(), PruneConfig(budget=budget, layers=2))
        assert non_embedding_params(student) <= budget * total
        if budget == 0.6:  # two whole layers fit: the channels stop at the teacher's
            assert student.config.intermediate_size == FF
            continue
        wider = copy.deepcopy(student.config)
        wider.intermediate_size += 1
        assert non_embedding_params(LlamaForCausalLM(wider)) > budget * total  # one more channel would not fit
    with pytest.raises(PruneError, match=r"raise student.budget to at least 0\.\d+"):
        prune(teacher, _importance(), PruneConfig(budget=0.05, layers=LAYERS))
    with pytest.raises(PruneError, match="multiple of the teacher's 2 key-value heads"):
        prune(teacher, _importance(), PruneConfig(budget=0.5, layers=2, heads=3))
    with pytest.raises(PruneError, match="has 4 layers"):
        prune(teacher, _importance(), PruneConfig(budget=0.5, layers=5))
    with pytest.raises(PruneError, match="Llama-family teacher"):
        prune(torch.nn.Linear(2, 2), _importance(), PruneConfig())
    with pytest.raises(PruneError, match="tie_word_embeddings"):
        prune(_teacher(tie=False), _importance(), PruneConfig(budget=0.5, layers=2))


def test_importance_ranks_what_the_teacher_uses():
    teacher = _teacher()
    with torch.no_grad():
        layer = teacher.model.layers[2]  # a layer that adds nothing: its output is its input
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        teacher.model.layers[1].self_attn.v_proj.weight[:HEAD_DIM] = 0  # the first key-value group's values
        teacher.model.layers[1].mlp.up_proj.weight[5] = 0
    ids = torch.randint(3, 50, (4, 12))
    ids[0, 6:] = 0  # padding: not counted
    importance = measure_importance(teacher, ids, pad_id=0, batch_size=3)
    assert importance.layers[2] == pytest.approx(0.0, abs=1e-6)
    assert (importance.layers[[0, 1, 3]] > 1e-3).all()
    assert (importance.heads[1, :HEADS // KV_HEADS] == 0).all() and (importance.heads[1, HEADS // KV_HEADS:] > 0).all()
    assert importance.channels[1, 5] == 0 and (importance.channels[1, :5] > 0).all()
    # the padded positions are not counted: the scores are the token-weighted mean of the unpadded parts'
    short, rest = measure_importance(teacher, ids[:1, :6], pad_id=0), measure_importance(teacher, ids[1:], pad_id=0)
    for kind in ("layers", "heads", "channels"):
        expected = (6 * getattr(short, kind) + 36 * getattr(rest, kind)) / 42
        assert torch.allclose(getattr(importance, kind), expected, atol=1e-5), kind


def test_opacus_computes_per_sample_gradients_of_the_pruned_student():
    student = prune(_teacher(), _importance(), PruneConfig(budget=0.5, layers=2, heads=4)).train()
    wrapped = GradSampleModule(student, batch_first=True, loss_reduction="sum")
    ids = torch.randint(0, 50, (3, 8))
    student(input_ids=ids, use_cache=False).logits.sum().backward()
    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and not any("embed_tokens" in n or "lm_head" in n for n, _ in trainable)
    for name, param in trainable:
        assert param.grad_sample.shape[0] == 3, name
        assert torch.allclose(param.grad_sample.sum(0), param.grad, atol=1e-4), name
    wrapped._close()


def test_task_lm_builds_the_pruned_student_from_its_teacher(lm_overrides):
    lm_overrides = [o for o in lm_overrides if not o.startswith("student.")]  # the tiny llama student's
    config = load_config(lm_overrides + ["student=pruned", "student.layers=1", "student.budget=0.6"])
    task = build_task(config)
    student = task.student(config.student)
    teacher = task._teacher[0]
    assert student.model.config.num_hidden_layers == 1
    assert non_embedding_params(student.model) <= 0.6 * non_embedding_params(teacher)
    assert torch.equal(student.model.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert sorted(task.cache_dir.glob("lm-teacher-importance-*.safetensors"))  # ranked once, kept on disk
    assert task.student(config.student) is not student  # each call its own copy
    scores = task.evaluator()(student)
    assert scores["perplexity"] > 0
    with pytest.raises(ConfigError, match="student.layers=3: the teacher has 2 layers"):
        build_task(config).student(load_config(lm_overrides + ["student=pruned", "student.layers=3"]).student)
