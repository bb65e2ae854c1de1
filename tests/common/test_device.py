"""The `device` setting: what `auto` picks, what is refused and how, that a site's own file
decides for it, and (where this machine has CUDA) that every heavy pass runs there and hands
its model back on the CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from client.dp_train import distill_locally
from common.config import ConfigError, load_config
from common.device import CPU, placed, seeded_on, teacher_dtype, torch_device
from common.losses import DistillationObjective
from common.models.image import StudentMLP
from common.models.inference import quantize_int8
from common.policy import policy_from
from common.public_distill import distill_on_public
from common.request import request_of
from common.site_config import simulated_site_policy, site_config
from common.step_plan import plan_round

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


def test_auto_takes_cuda_then_mps_then_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert torch_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert torch_device("auto") == CPU
    assert teacher_dtype(CPU) == torch.float32  # bf16 on these CPUs measured 7x slower


def test_a_device_this_machine_lacks_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device=cuda:1.*install the CUDA build of torch, or set device=auto"):
        torch_device("cuda:1")
    with pytest.raises(ConfigError, match="device=mps.*set device=auto or cpu"):
        torch_device("mps")


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "CPU", ""])
def test_a_device_name_outside_the_list_is_refused_by_the_config_and_the_site_file(value):
    with pytest.raises(ConfigError, match=f"device must be auto, cpu, cuda, cuda:N or mps, got '{value}'"):
        load_config(["task=digits", f"device='{value}'"])
    with pytest.raises(ConfigError, match="site.device must be auto"):
        policy_from({"device": value})


def test_the_sites_own_file_decides_its_device_and_simulation_passes_the_commands(tmp_path):
    config = load_config(["task=digits", "device=cpu", f"run_dir={tmp_path}"])
    assert simulated_site_policy(config).device == "cpu"
    policy = policy_from({"device": "cuda", "ledger_dir": str(tmp_path)})
    assert site_config(policy, request_of(config)).device == "cuda"  # the request carries no device


def test_an_int8_copy_runs_on_the_cpu_whatever_the_device():
    int8 = quantize_int8(nn.Sequential(nn.Linear(4, 2)))
    with placed(int8, torch.device("cuda")) as where:
        assert where == CPU


def test_on_the_cpu_the_noise_comes_from_the_sites_own_generator():
    generator = torch.Generator()
    assert seeded_on(CPU, generator) is generator


def _dp_round(small_config, device: torch.device) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(96, 1, 8, 8), torch.randint(0, 10, (96,)), torch.randn(96, 10))
    distill = dataclasses.replace(small_config.distill, sample_rate=0.1, local_epochs=3, batch_size=64, lr=0.25)
    student = StudentMLP((1, 8, 8), 10, [16])
    result = distill_locally(student, data, objective=DistillationObjective(distill), distill=distill,
                             privacy=small_config.privacy, noise_multiplier=1.0,
                             plan=plan_round(distill, small_config.privacy, 100), seed=0,
                             generator=torch.Generator().manual_seed(7), device=device)
    return student, result


@cuda
def test_dp_training_runs_on_the_device_and_hands_the_student_back_on_the_cpu(small_config):
    start = StudentMLP((1, 8, 8), 10, [16])
    student, result = _dp_round(small_config, torch.device("cuda"))
    assert result.steps >= 1
    assert all(p.device == CPU for p in student.parameters())
    assert not torch.equal(student.net[1].weight, start.net[1].weight)
    again, _ = _dp_round(small_config, torch.device("cuda"))  # the device's noise is seeded from the site's generator
    assert torch.equal(student.net[1].weight, again.net[1].weight)


@cuda
def test_server_distillation_and_evaluation_on_the_device_agree_with_the_cpu(small_config):
    from common.tasks import build_task

    inputs, targets = torch.rand(64, 1, 8, 8), torch.randn(64, 10)
    fitted = {}
    for device in (CPU, torch.device("cuda")):
        torch.manual_seed(0)
        student = StudentMLP((1, 8, 8), 10, [16])
        distill_on_public(student, inputs, targets, small_config.exchange.server, seed=0, device=device)
        assert all(p.device == CPU for p in student.parameters())
        fitted[device.type] = student
    for name, tensor in fitted["cpu"].state_dict().items():
        assert torch.allclose(tensor, fitted["cuda"].state_dict()[name], atol=1e-3), name
    on_cpu = build_task(dataclasses.replace(small_config, device="cpu")).evaluator()(fitted["cpu"])
    on_cuda = build_task(dataclasses.replace(small_config, device="cuda")).evaluator()(fitted["cpu"])
    assert on_cuda["accuracy"] == pytest.approx(on_cpu["accuracy"], abs=0.01)
