"""`python -m bench.mutations`: its mutations still apply: a refactor that moves or rewrites a privacy-critical
line must move its mutation with it, or the benchmark stops checking that line."""

import ast
from pathlib import Path

import pytest

from bench.mutations import MUTATIONS, ROOT, mutated_text


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_each_mutation_changes_its_line_once_and_names_tests_that_exist(mutation):
    original, mutated = mutated_text(mutation)
    assert mutated != original
    for test in mutation.tests:
        path, _, name = test.partition("::")
        functions = {node.name for node in ast.walk(ast.parse(Path(ROOT, path).read_text()))
                     if isinstance(node, ast.FunctionDef)}
        assert name.split("[")[0] in functions, f"{test} names no test"
