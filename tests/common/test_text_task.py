"""task=text on a tiny BERT-like teacher built in the test: data, teacher targets, students, export."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch.func import functional_call, grad, vmap

from common.config import ConfigError, load_config
from common.losses import ATTENTION, FEATURES, LOGITS
from common.models.encoder import StudentEncoder
from common.models.inference import quantize_int8
from common.tasks import build_task
from common.tasks.text_files import DataFileError
from tests.hf_loading import predict_without_fedistill


@pytest.fixture
def text_task(text_overrides):
    return build_task(load_config(text_overrides + ["student=transformer", "distill.attention_weight=1.0"]))


def test_text_task_splits_the_file_and_every_site_gets_a_share(text_task):
    task = text_task
    assert task.num_classes == 4 and task.label_names == ["Business", "Sci/Tech", "Sports", "World"]
    shares = [task.private_data(i, 2) for i in range(2)]
    total = len(task.public_inputs()) + len(task.test_data()) + sum(len(s) for s in shares)
    assert total + len(task._parts["teacher"]) == 480
    ids = task.public_inputs()
    assert ids.dtype == torch.long and ids.shape[1] == 16 and (ids[:, 0] == task.tokenizer.cls_token_id).all()


def test_teacher_is_fitted_and_targets_have_the_objectives_shapes_and_are_cached(text_task, text_overrides):
    task = text_task
    inputs, labels = task.test_data().tensors
    targets = task.teacher_targets(inputs, (LOGITS, FEATURES, ATTENTION))
    n = len(inputs)
    assert targets[LOGITS].shape == (n, 4)
    assert targets[FEATURES].shape == (n, 32)
    assert torch.allclose(targets[FEATURES].norm(dim=-1), torch.ones(n), atol=1e-5)
    assert targets[ATTENTION].shape == (n, 1, 16, 16)
    real = inputs != task.pad_id
    rows = targets[ATTENTION][:, 0].float().sum(dim=-1)  # each real query's attention sums to 1
    assert torch.allclose(rows[real], torch.ones(int(real.sum())), atol=1e-2)
    # The teacher module and the cached targets agree; the head learned the topics.
    with torch.no_grad():
        assert torch.allclose(task.teacher()(inputs), targets[LOGITS], atol=1e-4)
    assert (targets[LOGITS].argmax(-1) == labels).float().mean() > 0.8
    cached = sorted(task.cache_dir.glob("text-teacher-outputs-*.safetensors"))
    assert cached, "the encoder's outputs are cached on disk"

    again = build_task(load_config(text_overrides))  # a new task object reads them back, not running the encoder
    again._encode = None  # would fail if called
    assert torch.equal(again.teacher_targets(inputs, (LOGITS,))[LOGITS], targets[LOGITS])


def test_two_teachers_blend_probabilities(text_overrides):
    single = build_task(load_config(text_overrides))
    both = build_task(load_config(text_overrides + ["task.teacher.ensemble.tfidf=1"]))
    inputs = single.test_data().tensors[0]
    encoder = single.teacher_targets(inputs, (LOGITS,))[LOGITS].softmax(-1)
    both.teacher()
    tfidf = both._members["tfidf"](inputs)
    mixed = both.teacher_targets(inputs, (LOGITS,))[LOGITS].exp()
    assert torch.allclose(mixed, 0.5 * encoder + 0.5 * tfidf.softmax(-1), atol=1e-5)
    labels = single.test_data().tensors[1]
    assert (tfidf.argmax(-1) == labels).float().mean() > 0.8  # the TF-IDF regression learned the topics too


@pytest.mark.parametrize("student", [["student=transformer", "distill.attention_weight=1.0"], ["student=bag"]],
                         ids=["transformer", "bag"])
def test_opacus_per_sample_gradients_of_the_student_match_torch_func(text_overrides, student):
    config = load_config(text_overrides + student)
    task = build_task(config)
    objective = task.objective(config.distill)
    torch.manual_seed(0)
    student = task.student(config.student)
    inputs, labels = task.test_data().tensors
    inputs, labels = inputs[:4], labels[:4]
    targets = task.teacher_targets(inputs, objective.target_kinds)
    params = {k: v.detach() for k, v in student.named_parameters() if v.requires_grad}
    assert "token_embedding.weight" not in params, "the projected teacher embeddings stay frozen"

    kinds = objective.target_kinds
    as_outputs = _DistillOutputs(student)

    def one_loss(p, x, y, *t):
        # One sample through the same objective, with the parameters as explicit inputs.
        functional = _Functional(as_outputs, p)
        return objective(functional, x.unsqueeze(0), y.unsqueeze(0), {k: v.unsqueeze(0) for k, v in zip(kinds, t)})

    prefixed = {f"student.{k}": v for k, v in params.items()}
    reference = vmap(grad(one_loss), in_dims=(None, 0, 0, *([0] * len(kinds))))(
        prefixed, inputs, labels, *(targets[k] for k in kinds))
    wrapped = GradSampleModule(student, batch_first=True, loss_reduction="mean")
    objective(student, inputs, labels, targets).backward()
    for name, param in student.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad_sample, reference[f"student.{name}"], atol=1e-5), name
    wrapped._close()


class _DistillOutputs(torch.nn.Module):
    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, ids):
        return self.student.distill_outputs(ids)


class _Functional:
    """The student with `params` swapped in (torch.func), offering what the objective calls."""

    def __init__(self, module: _DistillOutputs, params):
        self.module, self.params, self.config = module, params, module.student.config

    def distill_outputs(self, ids):
        return functional_call(self.module, self.params, (ids,))

    def __call__(self, ids):
        return self.distill_outputs(ids).logits


def test_exported_student_loads_with_from_pretrained_and_classifies(text_overrides, tmp_path):
    config = load_config(text_overrides)
    task = build_task(config)
    student = task.student(config.student)
    task.export(student, tmp_path)
    loaded = StudentEncoder.from_pretrained(tmp_path / "student")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    ids = tokenizer(["the coach says the striker scored a goal"], padding="max_length", max_length=16,
                    truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids), student(ids))
        label = loaded.config.labels[int(loaded(ids).argmax())]
    assert label in task.label_names
    int8 = quantize_int8(loaded)
    with torch.no_grad():
        assert int8(ids).shape == (1, 4)


def test_text_needs_a_data_path():
    with pytest.raises(ConfigError, match=r"task.data.path=/path/to/file.csv"):
        load_config(["task=text"])


def test_a_file_too_small_for_the_split_names_the_file_and_the_fix(text_overrides, tmp_path):
    small = tmp_path / "small.tsv"
    small.write_text("".join(f"goal match {i}\tSports\n" for i in range(5)))
    task = build_task(load_config(text_overrides + [f"task.data.path={small}"]))
    with pytest.raises(DataFileError, match=r"small.tsv holds 5 records, too few for the split.*change task.split"):
        task.public_inputs()


def test_a_label_outside_the_configured_set_names_the_line(text_overrides, text_data, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text(text_data.read_text() + "robot chip news\tWeather\n")
    task = build_task(load_config(text_overrides + [f"task.data.path={bad}",
                                                    "task.data.labels=[World,Sports,Business,Sci/Tech]"]))
    with pytest.raises(DataFileError, match=r"bad.tsv:481.*Weather.*task.data.labels"):
        task.public_inputs()


def test_image_tasks_refuse_text_only_distillation_terms():
    with pytest.raises(ConfigError, match="which task=digits.s students do not have"):
        load_config(["task=digits", "distill.feature_weight=1"])
    with pytest.raises(ConfigError, match="student=transformer or student=bag"):
        load_config(["task=text", "task.data.path=/x", "student=mlp"])


def test_frozen_embeddings_never_travel_and_records_must_fit(text_overrides):
    from flwr.app import Array

    from common import payload as P

    config = load_config(text_overrides)
    task = build_task(config)
    sender, receiver = task.student(config.student), task.student(config.student)
    record = P.model_to_record(sender)
    assert "token_embedding.weight" not in record and "classifier.weight" in record
    P.load_record(receiver, record)
    assert torch.equal(receiver.classifier.weight, sender.classifier.weight)
    assert torch.equal(receiver.token_embedding.weight, sender.token_embedding.weight)  # built the same way
    full = P.model_to_record(sender)
    full["token_embedding.weight"] = Array(sender.token_embedding.weight.detach().numpy())
    with pytest.raises(RuntimeError, match="unexpected"):
        P.load_record(receiver, full)



def test_the_exported_student_loads_with_transformers_alone(text_overrides, tmp_path):
    from transformers import AutoTokenizer

    config = load_config(text_overrides)
    task = build_task(config)
    student = task.student(config.student).eval()
    task.export(student, tmp_path)
    texts = ["the coach says the striker scored a goal", "shares fell as the bank cut its forecast"]
    answer = predict_without_fedistill(tmp_path / "student", "AutoModelForSequenceClassification", texts=texts)
    ids = AutoTokenizer.from_pretrained(tmp_path / "student")(texts, padding="max_length", max_length=16,
                                                               truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = student(ids)
    assert torch.allclose(torch.tensor(answer["logits"]), expected, atol=1e-5)
    assert answer["labels"] == [task.label_names[i] for i in expected.argmax(-1).tolist()]
