"""task=lm on a tiny Llama teacher built in the test: records, the output vocabulary, the
teacher's cached top-k, a DP round that trains, evaluation and export."""

from __future__ import annotations

import dataclasses
import math

import pytest

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.dp_train import distill_locally
from common.step_plan import plan_round
from common.config import load_config
from common.losses import TOPK_IDS, TOPK_LOGPROBS
from common.tasks import build_task
from common.tasks.lm import DEVICE_RECORDS, IGNORE


def test_sites_public_and_held_out_records_and_their_next_token_labels(lm_overrides):
    task = build_task(load_config(lm_overrides))
    inputs, labels = task.private_data(0, 2).tensors
    assert inputs.shape == (12, 32) and labels.shape == (12, 32)
    # position i's label is token i + 1 in the output vocabulary, or IGNORE where the record ends
    real = labels != IGNORE
    output_ids = task.output_ids
    following = inputs[:, 1:][real[:, :-1]]
    mapped = output_ids[labels[:, :-1][real[:, :-1]]]
    known = torch.isin(following, output_ids)
    assert torch.equal(mapped[known], following[known]) and not known.all()
    assert (mapped[~known] == task.unknown_id).all()
    # the output vocabulary: every public file's tokens (beyond the sampled records), the teacher's top-k on them
    public_tokens = set(task._public_all.ids.unique().tolist())
    predicted = set(task._top_k(task.public_inputs())["ids"].unique().tolist())
    assert set(output_ids.tolist()) == public_tokens | predicted | {task.unknown_id, task.pad_id, 1, 2}
    assert len(public_tokens) > len(set(task.public_inputs().unique().tolist()))
    assert len(task.test_data().tensors[0]) == 8  # 4 held-out records per site


def test_teacher_top_k_is_cached_and_matches_the_teacher(lm_overrides):
    task = build_task(load_config(lm_overrides))
    inputs = task.private_data(1, 2).tensors[0]
    targets = task.teacher_targets(inputs, (TOPK_LOGPROBS, TOPK_IDS))
    assert targets[TOPK_LOGPROBS].shape == targets[TOPK_IDS].shape == (12, 32, 4)
    with torch.no_grad():
        logits = task.teacher()(inputs[:2], attention_mask=torch.ones_like(inputs[:2]))
    best = logits.log_softmax(-1).topk(4, dim=-1)
    assert torch.allclose(targets[TOPK_LOGPROBS][:2].float(), best.values, atol=1e-2)
    known = torch.isin(best.indices, task.output_ids)
    mapped = task.output_ids[targets[TOPK_IDS][:2]]
    assert torch.equal(mapped[known], best.indices[known]) and (mapped[~known] == task.unknown_id).all()
    assert sorted(task.cache_dir.glob("lm-teacher-topk-*.safetensors"))


def _train(task, config, student, rounds=1):
    objective = task.objective(config.distill)
    inputs, labels = task.private_data(0, 2).tensors
    targets = task.teacher_targets(inputs, objective.target_kinds)
    data = torch.utils.data.TensorDataset(inputs, labels, *(targets[k] for k in objective.target_kinds))
    plan = dataclasses.replace(plan_round(config.distill, config.privacy, 100), sample_rate=0.5, steps=10, expected_batch_size=6)
    return [distill_locally(student, data, objective=objective, distill=config.distill, privacy=config.privacy,
                            noise_multiplier=0.5 if config.privacy.enabled else None, plan=plan, seed=r,
                            generator=torch.Generator().manual_seed(r)).loss  # seeded noise: never passes by luck
            for r in range(rounds)]


def test_distillation_follows_the_teacher_under_dp(lm_overrides):
    # Clipping at 1, not 10: the noise grows with the clipping norm, and at 10 it outweighed
    # 30 steps of learning (the loss rose from round 2 on; this test passed by luck).
    config = load_config(lm_overrides + ["distill.lr=0.05", "privacy.max_grad_norm=1"])
    task = build_task(config)
    torch.manual_seed(0)
    losses = _train(task, config, task.student(config.student), rounds=3)
    assert losses[-1] < losses[0]


def test_training_on_next_tokens_lowers_perplexity_and_the_student_exports(lm_overrides, tmp_path):
    # The tiny teacher is random, so only the next-token term (alpha 0) should lower perplexity.
    config = load_config(lm_overrides + ["distill.lr=0.05", "distill.alpha=0", "privacy=none"])
    task = build_task(config)
    torch.manual_seed(0)
    student = task.student(config.student)
    evaluator = task.evaluator()
    before = evaluator(student)
    _train(task, config, student, rounds=2)
    after = evaluator(student)
    assert after["perplexity"] < before["perplexity"]
    # site 0's perplexity by hand: the unknown token's probability is shared by every token it stands for
    ids, labels = task._dataset(task._site_records(0, "held_out")).tensors
    with torch.no_grad():
        log_probs = student(ids, attention_mask=(labels != IGNORE).long() | (ids != task.pad_id).long()).log_softmax(-1)
    real = labels != IGNORE
    nll = -log_probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0][real]
    unknown = labels[real] == task._to_output[task.unknown_id]
    shared = len(task.tokenizer) - len(task.output_ids) + 1
    assert unknown.any() and shared > 1
    assert after["perplexity_site-0"] == pytest.approx(float((nll + unknown * math.log(shared)).mean().exp()), rel=1e-4)
    assert {"perplexity", "agreement", "perplexity_unseen", "perplexity_site-0", "perplexity_unseen-wsgiref"} <= set(after)
    assert evaluator.teacher["agreement"] == 1.0
    inputs = task.private_data(0, 2).tensors[0]

    task.export(student, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    prompt = tokenizer("def main():\n    ", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    with torch.no_grad():
        assert torch.allclose(model(inputs[:1]).logits[..., task.output_ids], student(inputs[:1]), atol=1e-4)
    # generate never picks a token outside the output vocabulary, whose rows of the head were never trained
    assert torch.isin(out[0, prompt["input_ids"].shape[1]:], task.output_ids).all()
    outside = set(range(len(tokenizer))) - set(task.output_ids.tolist())
    assert set(model.generation_config.suppress_tokens) == outside and outside


def test_records_per_site_default_by_the_device_class_and_travel_filled(monkeypatch):
    assert load_config(["task=lm", "device=cpu"]).task.corpus.max_records == DEVICE_RECORDS[False] == 128
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU, as auto sees it
    config = load_config(["task=lm"])
    assert config.task.corpus.max_records == DEVICE_RECORDS[True] > 128
    assert config.task.site_settings()["corpus"]["max_records"] == DEVICE_RECORDS[True]  # the sites get the number
    assert load_config(["task=lm", "device=cpu"]).task.corpus.max_records == 128
    assert load_config(["task=lm", "task.corpus.max_records=300"]).task.corpus.max_records == 300
