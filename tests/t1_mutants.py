"""The mutation table stays applicable: a refactor that moves a mutant's text fails here, in
the suite, instead of at the next (long) scripts/mutate run. And every mutant is a program: one
that does not compile (an emptied block) would be "killed" by any test that imports it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mutants import MUTANTS, Mutant

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("m", MUTANTS, ids=[m.name for m in MUTANTS])
def test_every_mutant_applies_exactly_once(m: Mutant) -> None:
    text = (REPO / m.path).read_text()
    assert text.count(m.old) == 1, f"{m.name}: update tests/mutants.py"
    assert m.old != m.new and m.tests
    compile(text.replace(m.old, m.new, 1), m.path, "exec")  # SyntaxError: not a real mutant


def test_names_are_unique() -> None:
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))
