"""Shared fixtures: a small, fast configuration composed from the real conf/."""

from __future__ import annotations

import os
from pathlib import Path

# The suite runs several workers and the Flower processes they start on a few cores: one torch
# (and BLAS) thread per process, inherited by those processes, or their thread pools spin
# against each other. Set before numpy and torch are imported, which read it then.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from common.config import Config, load_config  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, worker_id) -> str:
    """One cache for the whole run, shared by pytest-xdist's workers, so each teacher is fitted (or
    converted) once: its entries are filled under a lock (common.storage.filling)."""
    if worker_id == "master":
        return str(tmp_path_factory.mktemp("cache"))
    shared = tmp_path_factory.getbasetemp().parent / "cache"
    shared.mkdir(exist_ok=True)
    return str(shared)


@pytest.fixture
def small_config(tmp_path, cache_dir) -> Config:
    return load_config(["task=digits", "sites=3", "rounds=2", f"run_dir={tmp_path / 'run'}", f"cache_dir={cache_dir}"])


@pytest.fixture(scope="session", autouse=True)
def private_data_home(tmp_path_factory):
    """Sites without a policy file keep ledgers under $XDG_DATA_HOME: never the user's own, in tests.

    Set in the environment, so the Flower processes the tests start inherit it.
    """
    saved = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data-home"))
    yield
    if saved is None:
        del os.environ["XDG_DATA_HOME"]
    else:
        os.environ["XDG_DATA_HOME"] = saved


@pytest.fixture
def write_policy(cache_dir):
    """write_policy(path, **values): a site policy file with `values`, the session's cache, and
    conf/site.yaml's defaults for the rest."""

    def write(path: Path, **values) -> Path:
        path.write_text(OmegaConf.to_yaml(OmegaConf.create({"cache_dir": cache_dir, **values})))
        return path

    return write


TOPICS = {
    "World": ["election", "minister", "treaty", "border", "embassy", "parliament"],
    "Sports": ["match", "goal", "coach", "league", "season", "striker"],
    "Business": ["shares", "profit", "market", "merger", "investor", "bank"],
    "Sci/Tech": ["software", "chip", "internet", "robot", "satellite", "browser"],
}
FILLER = ["the", "a", "new", "report", "says", "today", "after", "with", "on", "week"]


@pytest.fixture(scope="session")
def tiny_text_teacher(tmp_path_factory) -> Path:
    """A randomly initialised BERT-like encoder and its WordPiece tokenizer, saved as a Hugging
    Face folder: the MiniLM teacher's shape at a fraction of its size, made without downloads."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-teacher")
    words = sorted({w for topic in TOPICS.values() for w in topic} | set(FILLER))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    BertTokenizer(vocab={token: i for i, token in enumerate(tokens)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    """A TSV in AG News's format (`text<TAB>label`, no header): 480 short texts on 4 topics."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(480):
        label = list(TOPICS)[i % 4]
        words = list(rng.choice(TOPICS[label], 3)) + list(rng.choice(FILLER, 4))
        rng.shuffle(words)
        lines.append(f"{' '.join(words)}\t{label}")
    path = tmp_path_factory.mktemp("text-data") / "news.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def text_overrides(tiny_text_teacher, text_data, tmp_path, cache_dir) -> list[str]:
    """task=text on the tiny teacher and data, shrunk to run in seconds."""
    return ["task=text", f"task.data.path={text_data}", f"task.teacher.path={tiny_text_teacher}",
            "task.data.max_length=16", "task.split.public=0.1", "student.dim=16", "student.ff=32",
            "sites=2", "rounds=2", "distill.feature_weight=1.0", f"run_dir={tmp_path / 'run'}", f"cache_dir={cache_dir}"]


@pytest.fixture(scope="session")
def tiny_lm_teacher(tmp_path_factory) -> Path:
    """A randomly initialised Llama causal LM and a byte-level BPE tokenizer trained on a few
    standard-library files, saved as a Hugging Face folder: SmolLM2's shape, made without downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from common.tasks.lm_corpus import corpus_files

    folder = tmp_path_factory.mktemp("tiny-lm-teacher")
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # unknown, bos, eos (= pad), as SmolLM2's
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # Large enough that the public corpus and the random teacher's top-k leave tokens outside the student's vocabulary
    files = corpus_files(["stdlib:json", "stdlib:logging", "stdlib:html"], (".py",), what="tokenizer training")
    bpe.train([str(f) for f in files], trainers.BpeTrainer(vocab_size=2000, special_tokens=special,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token=special[0], bos_token=special[1],
                                        eos_token=special[2], pad_token=special[2])
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a confident teacher, as a trained one is: its top-k holds most of the mass
        model.model.norm.weight.mul_(20.0)
    model.save_pretrained(folder)
    return folder


def lm_settings(teacher: Path, run_dir: Path, cache_dir: str | Path) -> list[str]:
    """task=lm on the tiny teacher and small standard-library corpora, shrunk to run in seconds."""
    return ["task=lm", f"task.teacher.path={teacher}", "task.teacher.top_k=4",
            "task.corpus.sites=[[stdlib:json],[stdlib:html]]", "task.corpus.public=[stdlib:logging]",
            "task.corpus.unseen=[stdlib:wsgiref]", "task.corpus.max_length=32",
            "task.corpus.max_records=12", "task.corpus.eval_records=4", "student.dim=16", "student.heads=2",
            "student.ff=32", "student.layers=1", "sites=2", "rounds=2", f"run_dir={run_dir}",
            f"cache_dir={cache_dir}"]


@pytest.fixture
def lm_overrides(tiny_lm_teacher, tmp_path, cache_dir) -> list[str]:
    return lm_settings(tiny_lm_teacher, tmp_path / "run", cache_dir)
