"""Corpora for causal-LM tasks: entries resolve to files, bad files get clear errors, records
never span two files, held-out files are whole files."""

from __future__ import annotations

import pytest
import torch

from common.tasks.lm_corpus import CorpusError, corpus_files, cut_records, held_out, sample_records, stdlib_root


def _tokenize(text):
    return [ord(c) for c in text]


def test_stdlib_packages_folders_and_globs_resolve_to_files(tmp_path):
    email = corpus_files(["stdlib:email"], (".py",), what="site 0")
    assert email and all(p.suffix == ".py" and stdlib_root() / "email" in p.parents for p in email)
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "pkg" / "notes.md").write_text("not code\n")
    folder = corpus_files([str(tmp_path / "pkg")], (".py",), what="site 0")
    globbed = corpus_files([str(tmp_path / "pkg" / "**" / "*.py"), str(tmp_path / "pkg" / "a.py")], (".py",), what="site 0")
    assert [p.name for p in folder] == [p.name for p in globbed] == ["a.py", "b.py"]


def test_an_entry_with_no_files_names_the_entry_and_the_forms_accepted(tmp_path):
    with pytest.raises(CorpusError, match=r"site 2: 'stdlib:nonexistent' matches no file.*stdlib:<package>"):
        corpus_files(["stdlib:nonexistent"], (".py",), what="site 2")
    with pytest.raises(CorpusError, match="matches no file"):
        corpus_files([str(tmp_path / "*.py")], (".py",), what="the public corpus")


def test_records_hold_one_file_each_and_the_last_is_padded(tmp_path):
    first, second = tmp_path / "a.py", tmp_path / "b.py"
    first.write_text("abcdefg")  # 7 tokens: records of 3 -> abc, def, g (1 token: too short, dropped)
    second.write_text("hijk")    # hij, k dropped
    records = cut_records([first, second], _tokenize, 3, pad_id=0)
    assert [bytes(r[:n].tolist()).decode() for r, n in zip(records.ids, records.lengths)] == ["abc", "def", "hij"]
    assert records.files == [first, first, second]
    second.write_text("hijkl")   # hij, kl: the last record is padded, never continued from another file
    records = cut_records([second, first], _tokenize, 3, pad_id=0)
    assert records.ids[1].tolist() == [ord("k"), ord("l"), 0] and records.lengths[1] == 2
    assert records.files[2] == first and records.tokens == 3 + 2 + 3 + 3


def test_a_sample_of_records_is_seeded_spread_over_files_and_in_corpus_order(tmp_path):
    files = [tmp_path / f"{name}.py" for name in "abcdefgh"]
    for file in files:
        file.write_text(file.stem * 9)  # 3 records of 3 per file
    records = cut_records(files, _tokenize, 3, pad_id=0)
    sample = sample_records(records, 6, seed=1)
    assert len(sample.ids) == 6 and len(set(sample.files)) > 2  # not the first two files' records
    assert sample.files == sorted(sample.files) and torch.equal(sample.ids, sample_records(records, 6, seed=1).ids)
    assert not torch.equal(sample.ids, sample_records(records, 6, seed=2).ids)
    assert sample_records(records, 0, seed=1) is records and sample_records(records, 99, seed=1) is records


def test_a_file_that_is_not_utf8_names_the_file_and_the_fix(tmp_path):
    bad = tmp_path / "latin.py"
    bad.write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin.py is not UTF-8 text .*iconv"):
        cut_records([bad], _tokenize, 8, pad_id=0)


def test_held_out_files_are_whole_seeded_and_never_all(tmp_path):
    files = [tmp_path / f"{i}.py" for i in range(10)]
    train, test = held_out(files, 0.2, seed=0)
    assert len(test) == 2 and sorted(train + test) == sorted(files) and not set(train) & set(test)
    assert held_out(files, 0.2, seed=0) == (train, test) and held_out(files, 0.2, seed=1) != (train, test)
    assert len(held_out(files[:2], 0.9, seed=0)[0]) == 1
    with pytest.raises(CorpusError, match="at least 2 files"):
        held_out(files[:1], 0.2, seed=0)
