"""LVM2 logical volumes inside a guest disk, as extent maps of the disk's bytes.

Role: `scan` finds the LVM2 physical volumes (PVs) in byte windows of a disk (its partitions,
or the whole disk; `ivdfs.formats.lvm_disk`), takes the newest committed metadata of each
volume group (VG), and describes every visible logical volume (LV) as the disk byte ranges
that hold it. The tree exposes the supported ones as ``lv-<dm_name>.raw`` windows read through
the same block cache as ``disk.raw``. Nothing is activated: neither the host's LVM nor
device-mapper ever sees these disks, so snapshots with identical VG names cannot clash.

Supported: linear and striped segments (LVM's ``striped`` type; linear is one stripe), mapped
exactly. Every other segment type (mirror, raid, thin, cache, snapshot, vdo, ...), an LV whose
PVs are not all on this disk, and an old-style snapshot's COW store are reported with
``supported=False`` and a one-line `reason`, never silently dropped. Hidden LVs (the internal
parts of such volumes) are not listed, as ``lvs`` does not list them.

Pure, like `ivdfs.formats.partitions`: every byte comes through the caller's
``read(offset, length)`` callback.

Concurrency contract: no shared state; every call is independent and may run on any thread.

Hostile input: `scan` never raises because of what it reads (only the reader's own exceptions
propagate), never returns an extent outside its PV's window, and leaves what it distrusted as
human-readable strings in `LvmScan.warnings` (names shown with repr()).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ivdfs.formats.lvm_disk import (
    FoundPv,
    MetadataCopy,
    Reader,
    Window,
    format_uuid,
    read_pv,
    show_name,
)
from ivdfs.formats.lvm_text import ConfigValue
from ivdfs.units import SECTOR_SIZE

__all__ = ["MAX_STRIPES", "Extent", "LogicalVolume", "LvmScan", "PhysicalVolume", "scan"]

# lvm2's own limit (MAX_STRIPES).
MAX_STRIPES = 128
# lvm2's name rule (validate_name): these characters, not starting with '-', not . or ..
_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")


@dataclass(frozen=True)
class Extent:
    """`length` bytes of an LV from `lv_offset`, spread over `stripes`.

    `stripes` holds the disk offset where each stripe's area starts; a linear run has one.
    LV bytes go in `stripe_size` chunks to stripe 0, 1, ... in turn (dm-stripe's layout); a
    linear run's `stripe_size` is its `length`.
    """

    lv_offset: int
    length: int
    stripes: tuple[int, ...]
    stripe_size: int

    @property
    def linear(self) -> bool:
        return len(self.stripes) == 1

    def pieces(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """(disk offset, length) runs for extent-relative bytes [offset, offset + length)."""
        end = min(offset + length, self.length)
        n = len(self.stripes)
        while offset < end:
            chunk, within = divmod(offset, self.stripe_size)
            row, stripe = divmod(chunk, n)
            run = min(self.stripe_size - within, end - offset)
            yield self.stripes[stripe] + row * self.stripe_size + within, run
            offset += run


@dataclass(frozen=True)
class LogicalVolume:
    """A visible LV. `extents` tile [0, size) in order; empty when not `supported` (`size` is
    then what its metadata declares)."""

    vg: str
    name: str
    size: int
    extents: tuple[Extent, ...]
    supported: bool
    reason: str = ""  # why not supported; "" when it is

    @property
    def dm_name(self) -> str:
        """device-mapper's name (``/dev/mapper/<dm_name>``): hyphens doubled, so unambiguous."""
        return f"{self.vg.replace('-', '--')}-{self.name.replace('-', '--')}"

    def pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(disk offset, length) runs holding LV bytes [offset, offset + length), clipped to
        the LV and with disk-contiguous neighbours merged."""
        out: list[tuple[int, int]] = []
        end = min(offset + length, self.size)
        if offset < 0 or offset >= end:
            return out
        starts = [e.lv_offset for e in self.extents]
        i = bisect.bisect_right(starts, offset) - 1
        while offset < end and 0 <= i < len(self.extents):
            e = self.extents[i]
            rel = offset - e.lv_offset
            n = min(end, e.lv_offset + e.length) - offset
            for disk, run in e.pieces(rel, n):
                if out and out[-1][0] + out[-1][1] == disk:
                    out[-1] = (out[-1][0], out[-1][1] + run)
                else:
                    out.append((disk, run))
            offset += n
            i += 1
        return out


@dataclass(frozen=True)
class PhysicalVolume:
    """An LVM2 label found in a window; `vg` is "" for a PV without (readable) metadata."""

    uuid: str  # as lvm2 prints it: 6-4-4-4-4-4-6 characters
    start: int  # the window (disk offset and length) the PV occupies
    length: int
    vg: str = ""


@dataclass(frozen=True)
class LvmScan:
    physical_volumes: tuple[PhysicalVolume, ...] = ()
    volumes: tuple[LogicalVolume, ...] = ()
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Logical volumes


def _int(d: dict[str, ConfigValue], key: str) -> int | None:
    v = d.get(key)
    return v if isinstance(v, int) else None


def _dicts(d: ConfigValue | None) -> list[tuple[str, dict[str, ConfigValue]]]:
    if not isinstance(d, dict):
        return []
    return [(k, v) for k, v in d.items() if isinstance(v, dict)]


class _Unsupported(Exception):
    """This LV cannot be mapped; the message is the reason."""


@dataclass(frozen=True)
class _PvSlot:
    """A PV of the VG as its metadata describes it, with its window if it is on this disk."""

    uuid: str
    pe_start: int  # bytes from the PV's start
    pe_count: int
    window: Window | None


def _vg_volumes(
    copy: MetadataCopy, found: dict[str, FoundPv], warnings: list[str]
) -> list[LogicalVolume]:
    vg = copy.vg
    vg_name = copy.vg_name
    where = f"VG {show_name(vg_name)}"
    if not _NAME.fullmatch(vg_name) or vg_name in (".", ".."):
        warnings.append(f"{where}: name is not a valid LVM name; its LVs are not listed")
        return []
    extent_sectors = _int(vg, "extent_size")
    if extent_sectors is None or extent_sectors <= 0:
        warnings.append(f"{where}: extent_size is missing or invalid; its LVs are not listed")
        return []
    extent = extent_sectors * SECTOR_SIZE
    slots: dict[str, _PvSlot] = {}
    for key, pv in _dicts(vg.get("physical_volumes")):
        pv_id, pe_start, pe_count = pv.get("id"), _int(pv, "pe_start"), _int(pv, "pe_count")
        if not isinstance(pv_id, str) or pe_start is None or pe_count is None:
            warnings.append(f"{where}: PV {show_name(key)} lacks id, pe_start or pe_count")
            continue
        uuid = pv_id.replace("-", "")
        hit = found.get(uuid)
        slots[key] = _PvSlot(uuid, pe_start * SECTOR_SIZE, pe_count, hit.window if hit else None)
    lvs = _dicts(vg.get("logical_volumes"))
    lv_names = {k for k, _ in lvs}
    cow_stores = set()
    for _, lv in lvs:
        for _, seg in _dicts(lv):
            if seg.get("type") == "snapshot" and isinstance(seg.get("cow_store"), str):
                cow_stores.add(seg["cow_store"])
    out = []
    for name, lv in lvs:
        status = lv.get("status")
        if not isinstance(status, list) or "VISIBLE" not in status:
            continue  # an internal part of another LV (lvs does not show these either)
        if not _NAME.fullmatch(name) or name in (".", ".."):
            warnings.append(f"{where}: LV {show_name(name)} is not a valid LVM name; not listed")
            continue
        try:
            if name in cow_stores:
                raise _Unsupported("it is the copy-on-write store of an old-style snapshot")
            extents = _lv_extents(lv, extent, slots, lv_names)
        except _Unsupported as e:
            out.append(LogicalVolume(vg_name, name, _declared_size(lv, extent), (), False, str(e)))
            continue
        size = sum(e.length for e in extents)
        out.append(LogicalVolume(vg_name, name, size, tuple(extents), True))
    return out


def _declared_size(lv: dict[str, ConfigValue], extent: int) -> int:
    """What the segments add up to, for an LV that cannot be mapped (0 if they do not say)."""
    counts = [_int(seg, "extent_count") for _, seg in _dicts(lv)]
    return sum(c for c in counts if c is not None and c > 0) * extent


def _lv_extents(
    lv: dict[str, ConfigValue], extent: int, slots: dict[str, _PvSlot], lv_names: set[str]
) -> list[Extent]:
    segments = []
    for key, seg in _dicts(lv):
        start, count = _int(seg, "start_extent"), _int(seg, "extent_count")
        if start is None or count is None:
            raise _Unsupported(f"segment {show_name(key)} lacks start_extent or extent_count")
        segments.append((start, count, key, seg))
    if not segments:
        raise _Unsupported("it has no segments")
    declared = _int(lv, "segment_count")
    if declared is not None and declared != len(segments):
        raise _Unsupported(f"segment_count {declared} but {len(segments)} segments")
    segments.sort(key=lambda s: s[0])
    out = []
    next_extent = 0
    for start, count, key, seg in segments:
        if start != next_extent or count <= 0:
            raise _Unsupported(
                f"segment {show_name(key)} does not continue at extent {next_extent}"
            )
        out.append(_segment_extent(key, seg, start, count, extent, slots, lv_names))
        next_extent = start + count
    return out


def _segment_extent(
    key: str,
    seg: dict[str, ConfigValue],
    start: int,
    count: int,
    extent: int,
    slots: dict[str, _PvSlot],
    lv_names: set[str],
) -> Extent:
    kind = seg.get("type")
    if kind not in ("striped", "linear"):
        shown = show_name(kind) if isinstance(kind, str) else "(none)"
        raise _Unsupported(f"segment type {shown} (only linear and striped are supported)")
    n = _int(seg, "stripe_count") or 1
    areas = seg.get("stripes")
    if not 1 <= n <= MAX_STRIPES or not isinstance(areas, list) or len(areas) != 2 * n:
        raise _Unsupported(f"segment {show_name(key)}: stripe_count and stripes disagree")
    if count % n:
        raise _Unsupported(f"segment {show_name(key)}: {count} extents over {n} stripes")
    per_stripe = count // n * extent
    chunk = per_stripe  # linear: one chunk is the whole run
    if n > 1:
        chunk_sectors = _int(seg, "stripe_size")
        if (
            chunk_sectors is None
            or chunk_sectors <= 0
            or per_stripe % (chunk_sectors * SECTOR_SIZE)
        ):
            raise _Unsupported(f"segment {show_name(key)}: stripe_size is missing or invalid")
        chunk = chunk_sectors * SECTOR_SIZE
    stripes = []
    for pv_key, pe in zip(areas[0::2], areas[1::2], strict=True):
        if not isinstance(pv_key, str) or not isinstance(pe, int) or pe < 0:
            raise _Unsupported(f"segment {show_name(key)}: malformed stripes list")
        slot = slots.get(pv_key)
        if slot is None:
            if pv_key in lv_names:
                raise _Unsupported(
                    f"it is mapped onto LV {show_name(pv_key)} (pvmove in progress?)"
                )
            raise _Unsupported(f"segment {show_name(key)} names unknown PV {show_name(pv_key)}")
        if slot.window is None:
            raise _Unsupported(f"its PV {format_uuid(slot.uuid)} is not on this disk")
        if pe + count // n > slot.pe_count:
            raise _Unsupported(f"segment {show_name(key)} reaches past the end of its PV's extents")
        offset = slot.pe_start + pe * extent
        if offset + per_stripe > slot.window.length:
            raise _Unsupported(f"segment {show_name(key)} reaches past the end of its PV's window")
        stripes.append(slot.window.start + offset)
    return Extent(start * extent, count * extent, tuple(stripes), chunk)


# --------------------------------------------------------------------------------------------
# Entry point


def scan(read: Reader, windows: Sequence[tuple[int, int]]) -> LvmScan:
    """LVM2 PVs in `windows` ((disk offset, length) each: partitions or the whole disk), and the
    LVs of every VG found in their metadata.

    `read(offset, length)` reads the disk and must return `length` bytes, fewer only at its end.
    An LV is `supported` when all its segments are linear or striped and every PV they use is in
    one of the windows.
    """
    warnings: list[str] = []
    found: dict[str, FoundPv] = {}
    pvs: list[FoundPv] = []
    for start, length in windows:
        if start < 0 or length < SECTOR_SIZE:
            continue
        pv = read_pv(Window(read, start, length), warnings)
        if pv is None:
            continue
        if pv.uuid in found:
            warnings.append(
                f"{pv.window.where()}: PV {format_uuid(pv.uuid)} also found at disk offset "
                f"{found[pv.uuid].window.start} (a cloned PV?); this copy is not used"
            )
            continue
        found[pv.uuid] = pv
        pvs.append(pv)

    # The newest committed metadata of each VG, over all its PVs' areas.
    best: dict[str, MetadataCopy] = {}
    for pv in pvs:
        for c in pv.copies:
            if c.vg_id not in best or c.seqno > best[c.vg_id].seqno:
                best[c.vg_id] = c
    for pv in pvs:
        for c in pv.copies:
            b = best[c.vg_id]
            if c.seqno != b.seqno:
                warnings.append(
                    f"VG {show_name(b.vg_name)}: {c.source} holds older metadata (seqno {c.seqno}) "
                    f"than {b.source} ({b.seqno}); using the newer"
                )
    volumes: list[LogicalVolume] = []
    names: set[str] = set()
    member_of: dict[str, str] = {}
    for copy in best.values():
        if copy.vg_name in names:
            warnings.append(
                f"two VGs named {show_name(copy.vg_name)} (ids differ); the second is not listed"
            )
            continue
        names.add(copy.vg_name)
        for _, section in _dicts(copy.vg.get("physical_volumes")):
            pv_id = section.get("id")
            if isinstance(pv_id, str):
                member_of[pv_id.replace("-", "")] = copy.vg_name
        volumes.extend(_vg_volumes(copy, found, warnings))
    pv_list = tuple(
        PhysicalVolume(
            format_uuid(pv.uuid), pv.window.start, pv.window.length, member_of.get(pv.uuid, "")
        )
        for pv in pvs
    )
    return LvmScan(pv_list, tuple(volumes), tuple(warnings))
