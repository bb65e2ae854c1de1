"""A causal LM's public outputs in the logits exchange: top-k per next-token position, checked,
aggregated over the union of the sites' tokens, mixed with the teacher (by a fixed share or one
chosen on held-out public labels), and learned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import compression
from common.config import ConfigError, load_config
from common.losses import TOPK_IDS, TOPK_LOGPROBS, TokenDistillLoss, attention_mask
from common.tasks import build_task
from server.aggregate import aggregate


def _mean(stack, weights):
    return aggregate(stack, weights, method="mean")


@pytest.fixture
def lm_task(lm_overrides):
    config = load_config([*lm_overrides, "exchange=logits", "exchange.topk=4", "exchange.teacher_weight=0",
                          "exchange.choose_teacher_weight=false"])
    return config, build_task(config)


def test_a_student_sends_top_k_at_each_next_token_position_of_the_public_records(lm_task):
    config, task = lm_task
    outputs = task.public_outputs(config.exchange)
    student = task.student(config.student)
    arrays = outputs.encode(student)
    positions = int((task.public_labels() != -100).sum())
    assert {k: (v.shape, str(v.dtype)) for k, v in arrays.items()} == {
        k: spec for k, spec in outputs.expected().items()} == {
        compression.VALUES: ((positions, 4), "float16"), compression.INDICES: ((positions, 4), "uint16")}
    assert outputs.check(arrays) == ""
    # the rows are the student's own top-4 at those positions, in order
    labels = task.public_labels()
    with torch.no_grad():
        logits = student(task.public_inputs()[:1], attention_mask=(labels[:1] != -100).long() | 1)
    first = logits[0][labels[0] != -100].log_softmax(-1).topk(4, dim=-1)
    count = int((labels[0] != -100).sum())
    assert torch.equal(torch.from_numpy(arrays[compression.INDICES][:count].astype(np.int64)), first.indices)
    bad = dict(arrays, **{compression.INDICES: np.full_like(arrays[compression.INDICES], len(task.output_ids))})
    assert "indices must be <" in outputs.check(bad)


def test_the_consensus_is_the_top_k_of_the_sites_mean_log_probabilities(lm_task):
    config, task = lm_task
    outputs = task.public_outputs(config.exchange)
    rows, vocabulary = outputs.rows, len(task.output_ids)

    def site(second):  # both sites put 0.6 on token 9; they differ on the runner-up
        values = np.log(np.tile([0.6, 0.3, 0.05, 0.01], (rows, 1))).astype(np.float16)
        return {compression.VALUES: values, compression.INDICES: np.tile([9, second, 11, 12], (rows, 1)).astype(np.uint16)}

    replies = [site(5), site(7)]
    consensus, share = outputs.combine(replies, np.ones(2), _mean)
    assert share == 0
    assert consensus[TOPK_IDS].shape == (rows, 4) and consensus[TOPK_IDS].max() < vocabulary
    assert (consensus[TOPK_IDS][:, 0] == 9).all()
    assert torch.allclose(consensus[TOPK_LOGPROBS][:, 0].exp(), torch.tensor(0.6), atol=0.01)
    # the same as the dense computation: the top-4 of the mean of each site's log-probabilities
    dense = torch.stack([torch.log_softmax(compression.decode(r, method="topk", classes=vocabulary), 1) for r in replies])
    expected = dense.mean(0).topk(4, dim=1)
    assert torch.allclose(consensus[TOPK_LOGPROBS], expected.values, atol=1e-4)
    assert torch.equal(consensus[TOPK_IDS].sort(1).values, expected.indices.sort(1).values)


def test_the_teacher_is_mixed_in_by_its_weight(lm_overrides):
    config = load_config([*lm_overrides, "exchange=logits", "exchange.topk=4", "exchange.teacher_weight=1",
                          "exchange.choose_teacher_weight=false"])
    task = build_task(config)
    outputs = task.public_outputs(config.exchange)
    student_arrays = outputs.encode(task.student(config.student))
    consensus, _ = outputs.combine([student_arrays], np.ones(1), _mean)
    teacher = task.teacher_targets(task.public_inputs(), (TOPK_LOGPROBS, TOPK_IDS))
    positions = task.public_labels() != -100
    teacher_ids, teacher_values = teacher[TOPK_IDS][positions].long(), teacher[TOPK_LOGPROBS][positions].float()
    # with weight 1 the consensus is the teacher's: its first two choices wherever they are in the
    # output vocabulary, in the same ratio; the unknown token holds the teacher's tail share of every token
    # outside the output vocabulary
    unknown = int(task._to_output[task.unknown_id])
    dense = torch.full((len(teacher_ids), len(task.output_ids)), -torch.inf)
    dense.scatter_(1, consensus[TOPK_IDS], consensus[TOPK_LOGPROBS])
    both = (teacher_ids[:, :2] != unknown).all(1) & (dense.gather(1, teacher_ids[:, :2]) > -torch.inf).all(1)
    assert both.sum() > len(both) / 2
    chosen = dense.gather(1, teacher_ids[:, :2])[both]
    assert torch.allclose(chosen[:, 0] - chosen[:, 1], teacher_values[both, 0] - teacher_values[both, 1], atol=1e-3)
    vocabulary, k = len(task.tokenizer), teacher_ids.shape[1]
    tail = 1 - teacher_values.exp().sum(1)
    share = tail * (vocabulary - len(task.output_ids) + 1) / (vocabulary - k)
    ranked = dense[:, unknown] > -torch.inf
    assert ranked.any() and vocabulary > len(task.output_ids)
    assert torch.allclose(dense[ranked, unknown].exp(), share[ranked], rtol=1e-2)


def _sure_of(tokens: torch.Tensor, rows: int) -> dict[str, np.ndarray]:
    """A reply that puts 0.97 on `tokens` [rows] at each row (and a little on three others)."""
    others = (tokens[:, None] + torch.tensor([1, 2, 3])) % 7 + 1000
    ids = torch.cat([tokens[:, None], others], 1).numpy().astype(np.uint16)
    return {compression.VALUES: np.log(np.tile([0.97, 0.01, 0.01, 0.01], (rows, 1))).astype(np.float16),
            compression.INDICES: ids}


def test_the_teacher_weight_is_chosen_by_the_held_out_public_labels(lm_overrides):
    config = load_config([*lm_overrides, "exchange=logits", "exchange.topk=4", "exchange.choose_teacher_weight=true"])
    outputs = build_task(config).public_outputs(config.exchange)
    labels = outputs.row_labels
    assert labels is not None and len(labels) == outputs.rows
    right = _sure_of(labels, outputs.rows)  # sites that know every next token: the teacher can only hurt
    wrong = _sure_of((labels + 1) % 1000, outputs.rows)  # sites sure of the wrong token: the teacher is better
    assert outputs.combine([right, right], np.ones(2), _mean)[1] == 0
    consensus, share = outputs.combine([wrong, wrong], np.ones(2), _mean)
    assert share >= 0.5
    fixed = load_config([*lm_overrides, "exchange=logits", "exchange.topk=4", f"exchange.teacher_weight={share}",
                         "exchange.choose_teacher_weight=false"])
    expected, _ = build_task(fixed).public_outputs(fixed.exchange).combine([wrong, wrong], np.ones(2), _mean)
    assert all(torch.equal(consensus[name], expected[name]) for name in expected)  # mixed by the share it chose


def test_fitting_the_consensus_moves_the_student_towards_it(lm_task):
    config, task = lm_task
    outputs = task.public_outputs(config.exchange)
    torch.manual_seed(1)
    target = task.student(config.student)
    for parameter in target.parameters():
        if parameter.requires_grad and parameter.dim() == 2:
            torch.nn.init.normal_(parameter, std=0.5)
    consensus, _ = outputs.combine([outputs.encode(target)], np.ones(1), _mean)
    torch.manual_seed(2)
    student = task.student(config.student)
    kl = TokenDistillLoss(temperature=1.0, alpha=1.0)
    positions = outputs.positions
    values = torch.zeros(*positions.shape, 4)
    ids = torch.full((*positions.shape, 4), -1, dtype=torch.long)
    values[positions], ids[positions] = consensus[TOPK_LOGPROBS], consensus[TOPK_IDS]
    labels = task.public_labels()

    def distance():
        with torch.no_grad():
            return float(kl(student(task.public_inputs(), attention_mask=attention_mask(labels)), labels, values, ids))

    before = distance()
    outputs.fit(student, consensus, config.exchange.server, seed=0)
    assert distance() < 0.95 * before  # a tiny student fits a random one only so far; no fit leaves it equal


def test_a_causal_lm_refuses_dense_public_outputs(lm_overrides):
    config = load_config([*lm_overrides, "exchange=logits", "exchange.compression=float16"])
    with pytest.raises(ConfigError, match="exchange.compression=topk"):
        build_task(config).public_outputs(config.exchange)
