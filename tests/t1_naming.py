"""by-name naming rules: safe names and deterministic clash resolution (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

from ivdfs.inventory.model import Snapshot
from ivdfs.tree.naming import (
    LATEST,
    Wanted,
    datastore_names,
    safe_name,
    snapshot_names,
    unique_names,
)


def test_safe_name() -> None:
    assert safe_name("db/primary", "x") == "db_primary"
    assert safe_name("a\x00b\nc", "x") == "a_b_c"
    for bad in ("", ".", "..", "  "):
        assert safe_name(bad, "fallback") == "fallback"
    long = safe_name("é" * 300, "x")
    assert len(long.encode()) <= 200 and long == "é" * 100


def test_clashes_are_resolved_by_age_then_id_whatever_the_order() -> None:
    items = [
        Wanted("web", (2.0, "b"), "bbbbbbbb-2"),
        Wanted("web", (1.0, "c"), "cccccccc-1"),
        Wanted("web", (2.0, "a"), "aaaaaaaa-3"),
        Wanted("db", (0.0, "d"), "dddddddd"),
    ]
    expected = {
        "web": "cccccccc-1",
        "web~aaaaaaaa": "aaaaaaaa-3",
        "web~bbbbbbbb": "bbbbbbbb-2",
        "db": "dddddddd",
    }
    for order in (items, list(reversed(items))):
        assert {n: w.ident for n, w in unique_names(order).items()} == expected
    # A shared id prefix falls back to the whole id.
    same_prefix = [Wanted("x", (0.0, "1"), "12345678-a"), Wanted("x", (1.0, "2"), "12345678-b"),
                   Wanted("x", (2.0, "3"), "12345678-c")]  # fmt: skip
    assert sorted(unique_names(same_prefix)) == ["x", "x~12345678", "x~12345678-c"]


def test_snapshot_names() -> None:
    t = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    snaps = [
        Snapshot("s1", "i", t, "nightly"),
        Snapshot("s2", "i", t.replace(microsecond=5), "nightly"),
        Snapshot("s3", "i", None, ""),
        Snapshot("s4", "i", None, LATEST),
    ]
    names = {n: s.id for n, s in snapshot_names(snaps).items()}
    assert names == {
        "2026-01-02T03:04:05Z nightly": "s1",
        "2026-01-02T03:04:05Z nightly~s2": "s2",
        "s3": "s3",
        "latest~s4": "s4",
        LATEST: "s2",
    }
    assert snapshot_names([]) == {}


def test_every_control_character_is_replaced() -> None:
    # C1 too: \x9b is CSI (a terminal escape on its own), \x85 NEL a line break.
    assert safe_name("a\x85b\x9b[2Jc\x80\x9f", "x") == "a_b_[2Jc__"
    assert safe_name("l\u2028r\u202ed\u2066", "x") == "l_r_d_"
    assert safe_name("\ud800", "x") == "_"
    assert all(safe_name(chr(c), "x") in ("_", "x") for c in [*range(0x20), *range(0x7F, 0xA0)])


def test_datastore_names_are_safe_unique_and_leave_our_own_entries_alone() -> None:
    stores = [("by-name", "ds-1"), ("a/b", "ds-2"), ("x", "ds-4"), ("x", "ds-3"), ("..", "ds-5")]
    names = datastore_names(reversed(stores), reserved=("by-name", ".ivdfs"))
    assert names == datastore_names(stores, reserved=("by-name", ".ivdfs"))  # order-free
    assert names == {
        "by-name~ds-1": "ds-1",
        "a_b": "ds-2",
        "x": "ds-3",
        "x~ds-4": "ds-4",
        "ds-5": "ds-5",
    }
