"""A student's folder that transformers alone loads: the model's code (common.models.hf_student or
hf_mlp, and the file it imports) written beside its weights and named in config.json's `auto_map`, so
that `AutoModel...from_pretrained(folder, trust_remote_code=True)` works where fedistill is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from common.models import hf_mlp, hf_student
from common.storage import save_model

MODELING_FILE = "modeling_fedistill"  # the modeling file's name in the folder; the file it imports keeps its own


def export_text_student(folder: Path, labels: list[str]) -> None:
    """Make the student that StudentEncoder.save_pretrained wrote into `folder` loadable with transformers."""
    write_remote_code(folder, hf_student, companion="encoder.py",
                      model_class=hf_student.FedistillStudentForSequenceClassification,
                      auto_class="AutoModelForSequenceClassification", config=id2label(labels))


def export_mlp_student(folder: Path, student: nn.Module, config: dict) -> None:
    """An image or tabular task's StudentMLP as a transformers folder: model.safetensors, config.json
    (`config`: input_shape, num_classes, hidden and what the task adds) and the code."""
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / "model.safetensors", student)
    write_remote_code(folder, hf_mlp, companion="image.py", model_class=hf_mlp.FedistillMLPForClassification,
                      auto_class="AutoModel", config=config)


def write_remote_code(folder: Path, modeling, *, companion: str, model_class: type, auto_class: str,
                      config: dict) -> None:
    """Copy the `modeling` module's file (as modeling_fedistill.py) and the `companion` file beside it that it
    imports relatively, and write config.json: what is there already, `config` on top, and the keys that
    name the code."""
    source = Path(modeling.__file__)
    shutil.copyfile(source, folder / f"{MODELING_FILE}.py")
    shutil.copyfile(source.with_name(companion), folder / companion)
    path = folder / "config.json"
    written = json.loads(path.read_text()) if path.exists() else {}
    written |= config | {
        "model_type": model_class.config_class.model_type,
        "architectures": [model_class.__name__],
        "auto_map": {"AutoConfig": f"{MODELING_FILE}.{model_class.config_class.__name__}",
                     auto_class: f"{MODELING_FILE}.{model_class.__name__}"},
    }
    path.write_text(json.dumps(written, indent=2))


def id2label(names: list[str]) -> dict:
    """Hugging Face's class names ({"0": name, ...}), for pipelines and `model.config.id2label`; {} without names."""
    return {"id2label": {str(i): name for i, name in enumerate(names)}} if names else {}
