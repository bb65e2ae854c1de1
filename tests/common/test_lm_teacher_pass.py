"""The teacher's top-k pass: chunks written as they are done, a pass interrupted midway
resumes from them with the same result, and the chunks are removed once the whole is saved."""

from __future__ import annotations

import pytest
import torch

from common.models import lm_teacher
from common.models.lm_teacher import finish_pass, load_teacher, top_k_pass


class _Stopping(torch.nn.Module):
    """The teacher, counting forwards, failing at forward number `fail_at` (None: never)."""

    def __init__(self, model, fail_at=None):
        super().__init__()
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def forward(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.model(**kwargs)


def test_an_interrupted_pass_resumes_from_its_chunks(tiny_lm_teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(lm_teacher, "CHUNK", 4)
    monkeypatch.setattr(lm_teacher, "CPU_BATCH", 2)  # two forwards per chunk
    model, tokenizer, _ = load_teacher(tiny_lm_teacher, tmp_path)
    torch.manual_seed(0)
    inputs = torch.randint(3, len(tokenizer), (10, 12))
    inputs[3, 8:] = 2  # padding
    whole = top_k_pass(model, inputs, pad_id=2, top_k=3, path=tmp_path / "whole.safetensors")

    path = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        top_k_pass(_Stopping(model, fail_at=4), inputs, pad_id=2, top_k=3, path=path)  # in the second chunk
    assert sorted(p.name for p in (tmp_path / "resumed.safetensors.parts").iterdir()) == ["0000000000.safetensors"]
    again = _Stopping(model)
    resumed = top_k_pass(again, inputs, pad_id=2, top_k=3, path=path)
    assert again.calls == 3  # chunks 2 and 3 (4 + 2 records), not chunk 1
    for key in ("values", "ids", "next_nll"):
        assert torch.equal(resumed[key], whole[key]), key
    assert whole["ids"].shape == (10, 12, 3) and whole["values"].dtype == torch.float16
    with torch.no_grad():
        logits = model(input_ids=inputs[:1], attention_mask=torch.ones_like(inputs[:1])).logits
    assert torch.equal(whole["ids"][0].long(), logits[0].topk(3, dim=-1).indices)
    finish_pass(path)
    assert not (tmp_path / "resumed.safetensors.parts").exists()
