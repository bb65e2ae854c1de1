"""Every task kind the app's conf/task/ uses meets the same contract: its settings compose and
survive a site's round trip, its student and teacher agree on shapes, a DP step moves the
student, and the export holds the trained weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from client.dp_train import distill_locally
from common.config import load_config
from common.task_config import task_kinds
from common.policy import policy_from
from common.site_config import site_task_config
from common.step_plan import plan_round
from common.tasks import build_task

SMALL = {  # kind -> the fixture giving small, offline settings of it
    "image": "digits_overrides",
    "lm": "lm_overrides",
    "tabular": "tabular_overrides",
    "text": "text_overrides",
}


@pytest.fixture
def digits_overrides(tmp_path, cache_dir) -> list[str]:
    return ["task=digits", "sites=2", f"run_dir={tmp_path / 'run'}", f"cache_dir={cache_dir}"]


@pytest.fixture
def tabular_overrides(tmp_path, cache_dir) -> list[str]:
    from tests.common.test_tabular_task import table

    table().to_csv(tmp_path / "survey.csv", index=False)
    return ["task=tabular", f"task.data.path={tmp_path / 'survey.csv'}", "task.data.label=outcome",
            "task.teacher.max_iter=50", "sites=2", f"run_dir={tmp_path / 'run'}", f"cache_dir={cache_dir}"]


def test_every_task_kind_of_the_app_is_checked_here():
    assert set(SMALL) == set(task_kinds()), "give the new task kind small settings in SMALL"


def test_the_image_teacher_is_fitted_from_its_seed_whatever_ran_before(tmp_path):
    def fitted(draws: int) -> dict[str, torch.Tensor]:
        torch.rand(draws)
        cache = tmp_path / f"cache-{draws}"
        return build_task(load_config(["task=digits", f"cache_dir={cache}", f"run_dir={tmp_path}"])).teacher().state_dict()
    one, other = fitted(1), fitted(1000)
    assert all(torch.equal(one[name], other[name]) for name in one)


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_a_task_kind_meets_the_contract(kind, request, tmp_path):
    config = load_config(request.getfixturevalue(SMALL[kind]))
    assert config.task.kind == kind and isinstance(config.task, task_kinds()[kind])
    assert config.student.arch in config.task.students
    task = build_task(config)

    # Fitted or loaded from the cache, the teacher leaves the process's RNG as it found it: what
    # a seeded run gives must not depend on what ran before it in the process.
    state = torch.get_rng_state()
    task.teacher()
    assert torch.equal(state, torch.get_rng_state())

    # A simulated site keeps the command's task settings; composed again from them, the task is the same.
    policy = policy_from({"task": config.task.site_settings(), "cache_dir": str(config.cache_path),
                          "task_sources": [config.task.source]})
    assert site_task_config(policy, config.task.name, config.task.source).task == config.task

    records = task.private_data(0, config.sites)
    inputs, labels = (t[:16] for t in records.tensors[:2])
    objective = task.objective(config.distill)
    targets = task.teacher_targets(inputs, objective.target_kinds)
    assert all(len(t) == len(inputs) for t in targets.values())
    torch.manual_seed(0)
    student = task.student(config.student)
    assert torch.isfinite(objective(student, inputs, labels, targets))

    before = {k: v.clone() for k, v in student.state_dict().items()}
    distill = dataclasses.replace(config.distill, sample_rate=0.5, local_epochs=1, batch_size=8, lr=0.1)
    plan = plan_round(distill, config.privacy, len(inputs))
    data = TensorDataset(inputs, labels, *(targets[k] for k in objective.target_kinds))
    result = distill_locally(student, data, objective=objective, distill=distill, privacy=config.privacy,
                             noise_multiplier=1.0, plan=plan, seed=0, generator=torch.Generator().manual_seed(0))
    assert result.steps == plan.steps >= 1
    changed = [v for k, v in student.state_dict().items() if not torch.equal(before[k], v)]
    assert changed

    task.export(student, tmp_path / "export")
    exported = {}
    for file in (tmp_path / "export").rglob("*.safetensors"):
        exported |= load_file(file)
    trained = {name: tensor for name, tensor in student.state_dict().items() if tensor.is_floating_point()}
    assert exported, "the export holds no safetensors file"
    for name, tensor in exported.items():  # each exported tensor is the trained one of that name (the users' prefix aside)
        match = [t for n, t in trained.items() if n.endswith(name) or name.endswith(n)]
        assert match and torch.equal(match[0].to(tensor.dtype), tensor), name
    assert any(torch.equal(t, before_changed) for t in exported.values() for before_changed in changed), \
        "the export holds none of the weights the DP step changed"
