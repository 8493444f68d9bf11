"""The mutation table stays applicable: a refactor that moves a mutant's text fails here, in
the suite, instead of at the next (long) scripts/mutate run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mutants import MUTANTS, Mutant

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("m", MUTANTS, ids=[m.name for m in MUTANTS])
def test_every_mutant_applies_exactly_once(m: Mutant) -> None:
    assert (REPO / m.path).read_text().count(m.old) == 1, f"{m.name}: update tests/mutants.py"
    assert m.old != m.new and m.tests


def test_names_are_unique() -> None:
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))
