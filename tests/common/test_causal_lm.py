"""The causal-LM student: Opacus's per-sample gradients through a Llama student and the
token-level distillation loss match a torch.func reference; the student exports to and
reloads from Hugging Face format."""

from __future__ import annotations

import torch
from opacus import GradSampleModule
from torch.func import functional_call, grad, vmap
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from common.config import load_config
from common.losses import TOPK_IDS, TOPK_LOGPROBS, TokenDistillObjective
from common.models.causal_lm import StudentLMConfig, build_student, rms_norm_grad_sample
from common.models.encoder import project_embeddings

VOCAB, TEACHER_WIDTH, K = 40, 16, 4


def _student(output_ids):
    torch.manual_seed(0)
    embeddings = project_embeddings(torch.randn(VOCAB, TEACHER_WIDTH), 8)
    student = build_student(StudentLMConfig(dim=8, layers=2, heads=2, ff=16, max_length=8), embeddings,
                            output_ids, bos_id=1, eos_id=2, pad_id=2)
    with torch.no_grad():  # move the norms off 1 so their per-sample gradients are not trivial
        for name, param in student.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return student


def _batch(output_ids):
    torch.manual_seed(1)
    to_output = torch.full((VOCAB,), -1, dtype=torch.long)
    to_output[output_ids] = torch.arange(len(output_ids))
    inputs = torch.randint(3, VOCAB, (3, 8))
    lengths = torch.tensor([8, 5, 3])
    real = torch.arange(8)[None, :] < lengths[:, None]
    inputs[~real] = 2
    next_tokens = torch.nn.functional.pad(inputs[:, 1:], (0, 1), value=2)
    labels = to_output[next_tokens].clamp(min=0)  # out-of-vocabulary tokens: output id 0 (the unknown token)
    labels[~torch.nn.functional.pad(real[:, 1:], (0, 1), value=False)] = -100
    teacher_logits = torch.randn(3, 8, VOCAB)
    values, ids = teacher_logits.log_softmax(-1).topk(K, dim=-1)
    return inputs, labels, {TOPK_LOGPROBS: values.half(), TOPK_IDS: to_output[ids].clamp(min=0)}  # repeats of 0


def test_opacus_per_sample_gradients_of_the_lm_student_match_torch_func():
    output_ids = torch.cat([torch.tensor([0]), torch.arange(3, VOCAB, 2)])
    student = _student(output_ids)
    inputs, labels, targets = _batch(output_ids)
    objective = TokenDistillObjective(load_config(["distill.alpha=0.5"]).distill)
    params = {k: v.detach() for k, v in student.named_parameters() if v.requires_grad}
    assert not any("embed_tokens" in k or "lm_head" in k for k in params), "the vocabulary layers stay frozen"
    assert any("norm" in k for k in params)

    def one_loss(p, x, y, values, ids):
        functional = lambda ids_, attention_mask=None: functional_call(student, p, (ids_,), {"attention_mask": attention_mask})  # noqa: E731
        return objective(functional, x[None], y[None], {TOPK_LOGPROBS: values[None], TOPK_IDS: ids[None]})

    reference = vmap(grad(one_loss), in_dims=(None, 0, 0, 0, 0))(
        params, inputs, labels, targets[TOPK_LOGPROBS], targets[TOPK_IDS])
    assert GradSampleModule.GRAD_SAMPLERS[LlamaRMSNorm] is rms_norm_grad_sample  # not Opacus's generic fallback
    wrapped = GradSampleModule(student, batch_first=True, loss_reduction="mean")
    objective(student, inputs, labels, targets).backward()
    for name, param in student.named_parameters():
        if param.requires_grad:
            assert param.grad_sample.abs().max() > 0, name
            assert torch.allclose(param.grad_sample, reference[name], atol=1e-6), name
    wrapped._close()


def test_lm_student_exports_with_its_full_head_and_reloads(tmp_path):
    output_ids = torch.arange(0, VOCAB, 3)
    student = _student(output_ids)
    inputs, labels, _ = _batch(output_ids)
    student.model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        full = loaded(inputs[:1]).logits  # [1, T, VOCAB]
        restricted = student.eval()(inputs[:1])
    assert full.shape[-1] == VOCAB
    assert torch.allclose(full[..., output_ids], restricted, atol=1e-5)
    generated = loaded.generate(inputs[:1, :3], max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert generated.shape == (1, 7)


def test_the_frozen_tied_embeddings_and_head_never_travel(lm_overrides):
    from common import payload as P
    from common.config import load_config
    from common.tasks import build_task

    config = load_config(lm_overrides)
    task = build_task(config)
    student = task.student(config.student)
    record = P.model_to_record(student)
    assert not any("embed_tokens" in name or "lm_head" in name for name in record.keys())
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert sum(array.numpy().size for array in record.values()) == trained
    fresh = task.student(config.student)
    P.load_record(fresh, record)  # what a site receives loads into the model it builds
