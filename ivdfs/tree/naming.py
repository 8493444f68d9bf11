"""Readable names for the by-name view: safe file names and deterministic clash resolution.

Pure functions, no I/O; safe from any thread. A name never contains '/' or NUL (the kernel
would refuse it) nor other control characters (they break shell scripts), is never '.', '..'
or empty, and fits in NAME_MAX. When several objects want one name, the oldest (then the
smallest id) keeps it and the others get '~' and a prefix of their id, so a newly created
IVD or snapshot never renames an existing entry.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from ivdfs.inventory.model import Snapshot, creation_order

# Leaves room for a "~<id>" suffix within NAME_MAX (255 bytes).
MAX_BASE_BYTES = 200
LATEST = "latest"
# C0, DEL and C1 (\x9b starts a terminal escape as ESC [ does), line and paragraph separators,
# bidirectional overrides and isolates (they make a listing read other than it sorts), and
# lone surrogates (not UTF-8 at all).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f/\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def safe_name(text: str, fallback: str) -> str:
    name = _UNSAFE.sub("_", text).strip()
    # Anything else Unicode calls a control character (Cc) that the pattern missed.
    name = "".join("_" if unicodedata.category(c) == "Cc" else c for c in name)
    encoded = name.encode("utf-8")
    if len(encoded) > MAX_BASE_BYTES:
        name = encoded[:MAX_BASE_BYTES].decode("utf-8", "ignore").rstrip()
    if name in ("", ".", ".."):
        return fallback
    return name


@dataclass(frozen=True)
class Wanted:
    """An object asking for a name: `base` (already safe), ordered by `rank`, told apart by
    `ident` (a UUID)."""

    base: str
    rank: tuple[float, str]
    ident: str


def unique_names(items: Iterable[Wanted], reserved: Iterable[str] = ()) -> dict[str, Wanted]:
    """name -> item. The first by rank keeps its base; later ones get '~' + 8 id characters,
    or the whole id if that is still taken."""
    taken = set(reserved)
    out: dict[str, Wanted] = {}
    for item in sorted(items, key=lambda w: (w.rank, w.ident)):
        for name in (item.base, f"{item.base}~{item.ident[:8]}", f"{item.base}~{item.ident}"):
            if name not in taken:
                break
        else:
            continue  # the same id twice: the inventory repeated itself; one entry is enough
        taken.add(name)
        out[name] = item
    return out


def datastore_names(
    stores: Iterable[tuple[str, str]], reserved: Iterable[str] = ()
) -> dict[str, str]:
    """Root entry name -> moref for datastores given as (name, moref). vSphere lets a datastore
    be named almost anything: the name is made safe, and a name already taken (two datastores
    of one name, or an entry of ivdfs's own such as by-name) gets '~' and the moref. Decided
    in moref order, so the answer does not depend on the order vCenter lists them in."""
    taken = set(reserved)
    out: dict[str, str] = {}
    for base, moref in sorted((safe_name(n, safe_name(m, "datastore")), m) for n, m in stores):
        if moref in out.values():
            continue  # listed twice
        name = base
        if name in taken:
            name = safe_name(f"{base}~{moref}", moref)
        n = 1
        while name in taken:  # a name that happens to look like another's disambiguated one
            n += 1
            name = safe_name(f"{base}~{moref}~{n}", moref)
        taken.add(name)
        out[name] = moref
    return out


def time_label(t: datetime | None) -> str:
    """'2026-01-02T03:04:05Z': UTC, sortable, the same on every machine."""
    if t is None:
        return ""
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def snapshot_names(snapshots: Sequence[Snapshot]) -> dict[str, Snapshot]:
    """'<creation time> <description>' (or either alone, or the id) -> snapshot, plus 'latest'
    for the newest one."""
    by_id = {s.id: s for s in snapshots}
    wanted = []
    for s in snapshots:
        label = " ".join(p for p in (time_label(s.create_time), s.description) if p)
        rank = creation_order(s)
        wanted.append(Wanted(safe_name(label, s.id), rank, s.id))
    names = {name: by_id[w.ident] for name, w in unique_names(wanted, reserved=[LATEST]).items()}
    if wanted:
        newest = max(wanted, key=lambda w: (w.rank, w.ident))
        names[LATEST] = by_id[newest.ident]
    return names
