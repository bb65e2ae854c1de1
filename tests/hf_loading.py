"""Load an exported student with transformers alone, in a fresh interpreter from which fedistill's
own modules cannot be imported (not even through an editable install), as a user without it would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import importlib.util, json, sys
spec = json.loads(sys.argv[1])
sys.path = [p for p in sys.path if p not in ("", spec["root"]) and "__editable__" not in p]
sys.path_importer_cache.clear()
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
assert all(importlib.util.find_spec(m) is None for m in ("common", "server", "client", "fedistill")), "fedistill importable"
import torch
import transformers
model = getattr(transformers, spec["auto_class"]).from_pretrained(spec["folder"], trust_remote_code=True).eval()
if "texts" in spec:  # the tokenizer saved beside it; config.json names the model's code, so say it is trusted
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["folder"], trust_remote_code=True)
    inputs = tokenizer(spec["texts"], padding="max_length", max_length=model.config.max_length, truncation=True,
                       return_tensors="pt")["input_ids"]  # as the README shows it
else:
    inputs = torch.tensor(spec["inputs"], dtype=torch.float32)
with torch.no_grad():
    logits = model(**{model.main_input_name: inputs}).logits
labels = getattr(model.config, "id2label", None) or {}
print(json.dumps({"logits": logits.tolist(), "labels": [labels.get(int(i)) for i in logits.argmax(-1)]}))
"""


def predict_without_fedistill(folder: Path, auto_class: str, **inputs) -> dict:
    """{"logits": [[...]], "labels": [...]} of the student in `folder` on `inputs` (texts=[...], or
    inputs=nested lists)."""
    spec = {"root": str(ROOT), "folder": str(folder), "auto_class": auto_class, **inputs}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                          cwd=folder, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
