"""Partition-table parsing (MBR, extended/logical, GPT).

Role: turn the table sectors of a disk into byte windows (`Partition`) that the tree exposes as
``partN.raw`` beside ``disk.raw``. Pure: every byte comes through the caller's
``read(offset, length)`` callback, so the same code runs over a VDDK handle, a plain file or bytes
in memory (tests), and the caller decides about caching and threads.

Concurrency contract: no shared state; every call is independent and may run on any thread. The
reader is called synchronously and a bounded number of times: at most two GPT headers and entry
arrays (each array capped at `MAX_GPT_ARRAY_BYTES`), one MBR and `MAX_LOGICAL` EBRs.

Hostile input: a disk image is untrusted data. `parse` never raises because of what it reads (only
exceptions raised by the reader itself propagate: those are I/O failures, not bad tables), and it
never returns a partition with zero length or reaching outside ``[0, disk_size)``. Whatever it
drops or distrusts leaves a human-readable string in `PartitionTable.warnings`.

Numbering follows Linux, so ``partN.raw`` matches what ``/dev/sdaN`` would be on a restore host:
MBR primaries are 1-4 by slot, logicals count from 5 in chain order; GPT partitions are the
entry index + 1, with empty entries skipped but their numbers kept. Extended-partition containers
are not listed: they hold only EBRs, and exposing them would invite reading garbage.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from ivdfs.formats.filesystems import detect_filesystem

__all__ = [
    "MAX_GPT_ARRAY_BYTES",
    "MAX_LOGICAL",
    "Partition",
    "PartitionTable",
    "Reader",
    "parse",
]

Reader = Callable[[int, int], bytes]

# A chain longer than this is a loop or an attack; Linux itself stops after 100 hops per link.
MAX_LOGICAL = 128
# 128 entries x 128 bytes is the norm (16 KiB); 1 MiB leaves room for odd but honest tables while
# keeping a hostile header from making us read gigabytes.
MAX_GPT_ARRAY_BYTES = 1 << 20

_MBR_SIGNATURE = b"\x55\xaa"
_MBR_TABLE_OFFSET = 446
_MBR_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
_MBR_GPT_PROTECTIVE = 0xEE
_GPT_SIGNATURE = b"EFI PART"
_GPT_MIN_HEADER = 92
_GPT_MIN_ENTRY = 128
_GPT_ATTR_LEGACY_BOOTABLE = 1 << 2
_SUPPORTED_SECTOR_SIZES = frozenset({512, 1024, 2048, 4096})
# Windows dynamic disks (LDM): the MBR type, and GPT's LDM metadata and LDM data types. Such a
# partition holds an LDM database or pieces of the volumes it describes, not a filesystem.
LDM_TYPES = frozenset(
    {"0x42", "5808c8aa-7e8f-42e0-85d2-e1e90434cfb3", "af9b60a0-1431-4f62-bc68-3311714a69ad"}
)


@dataclass(frozen=True)
class Partition:
    """One partition as a byte window of the disk; ``start + length <= disk_size`` always."""

    number: int
    start: int
    length: int
    scheme: str
    type_id: str
    name: str
    guid: str
    bootable: bool


def is_ldm(p: Partition) -> bool:
    """Is `p` a partition of a Windows dynamic disk (LDM)?"""
    return p.type_id in LDM_TYPES


@dataclass(frozen=True)
class PartitionTable:
    """What `parse` found: scheme ``"mbr"``, ``"gpt"`` or ``"none"``, and what it distrusted."""

    scheme: str
    partitions: tuple[Partition, ...]
    warnings: tuple[str, ...]


class _Disk:
    """The reader, bounded: nothing outside the disk is asked for and short reads become None."""

    def __init__(self, read: Reader, size: int, sector_size: int) -> None:
        self._read = read
        self.size = size
        self.sector_size = sector_size
        self.total_lbas = size // sector_size

    def read(self, offset: int, length: int) -> bytes | None:
        if offset < 0 or length <= 0 or offset + length > self.size:
            return None
        data = self._read(offset, length)
        # A reader may hand back a bytearray or memoryview; a short one means the disk is smaller
        # than disk_size claimed, and the caller treats the structure there as missing.
        if len(data) < length:
            return None
        return bytes(data[:length])


def _window_ok(what: str, start: int, length: int, disk_size: int, warnings: list[str]) -> bool:
    """True if [start, start+length) is a usable, non-empty window inside the disk."""
    if length <= 0:
        warnings.append(f"{what}: zero length; dropped")
        return False
    if start < 0 or start >= disk_size or start + length > disk_size:
        warnings.append(
            f"{what}: bytes {start}-{start + length} extend beyond the end of the disk "
            f"({disk_size} bytes); dropped"
        )
        return False
    return True


# --------------------------------------------------------------------------------------------
# MBR


@dataclass(frozen=True)
class _MbrEntry:
    slot: int
    status: int
    type: int
    start_lba: int
    sectors: int


def _mbr_entries(sector: bytes) -> list[_MbrEntry]:
    entries = []
    for slot in range(4):
        raw = sector[_MBR_TABLE_OFFSET + 16 * slot : _MBR_TABLE_OFFSET + 16 * (slot + 1)]
        status, ptype, start, count = raw[0], raw[4], *struct.unpack_from("<II", raw, 8)
        entries.append(_MbrEntry(slot + 1, status, ptype, start, count))
    return entries


def _parse_mbr(disk: _Disk, entries: list[_MbrEntry], warnings: list[str]) -> list[Partition]:
    ss = disk.sector_size
    parts: list[Partition] = []
    containers: list[_MbrEntry] = []
    for e in entries:
        if e.type == 0:
            # Type 0 marks an unused slot (fdisk, sfdisk, Windows); its other fields are noise.
            continue
        if e.type in _MBR_EXTENDED_TYPES:
            containers.append(e)
            continue
        what = f"MBR partition {e.slot} (type 0x{e.type:02x})"
        start, length = e.start_lba * ss, e.sectors * ss
        if _window_ok(what, start, length, disk.size, warnings):
            parts.append(_mbr_partition(e.slot, start, length, e))

    next_number = 5
    visited: set[int] = set()
    for c in containers:
        what = f"extended partition {c.slot}"
        start, length = c.start_lba * ss, c.sectors * ss
        if not _window_ok(what, start, length, disk.size, warnings):
            continue
        next_number = _walk_ebr_chain(disk, c, next_number, visited, parts, warnings)
    return parts


def _mbr_partition(number: int, start: int, length: int, e: _MbrEntry) -> Partition:
    return Partition(
        number=number,
        start=start,
        length=length,
        scheme="mbr",
        type_id=f"0x{e.type:02x}",
        name="",
        guid="",
        bootable=e.status == 0x80,
    )


def _walk_ebr_chain(
    disk: _Disk,
    container: _MbrEntry,
    next_number: int,
    visited: set[int],
    parts: list[Partition],
    warnings: list[str],
) -> int:
    """Append the logical partitions of one extended container; return the next free number.

    Each EBR holds data entries relative to itself and at most one link relative to the start
    of the outermost container. Like Linux, all data entries of an EBR are taken before its link.
    """
    ss = disk.sector_size
    base = container.start_lba
    container_end = base + container.sectors
    ebr_lba = base
    for _hop in range(MAX_LOGICAL):
        if ebr_lba in visited:
            warnings.append(f"EBR chain loops back to sector {ebr_lba}; chain stopped")
            return next_number
        visited.add(ebr_lba)
        if not base <= ebr_lba < container_end:
            warnings.append(
                f"EBR at sector {ebr_lba} lies outside its extended partition; chain stopped"
            )
            return next_number
        inside = next((p for p in parts if p.start <= ebr_lba * ss < p.start + p.length), None)
        if inside is not None:
            # An EBR inside a partition we already expose means the chain overlaps data: reading
            # on would turn file contents into partition entries.
            warnings.append(
                f"EBR at sector {ebr_lba} lies inside partition {inside.number}; chain stopped"
            )
            return next_number
        # The EBR is only the first 512 bytes of its sector, whatever the sector size.
        sector = disk.read(ebr_lba * ss, 512)
        if sector is None:
            warnings.append(f"EBR at sector {ebr_lba} is unreadable; chain stopped")
            return next_number
        if sector[510:512] != _MBR_SIGNATURE:
            warnings.append(f"EBR at sector {ebr_lba} has no 0x55AA signature; chain stopped")
            return next_number
        link: _MbrEntry | None = None
        for e in _mbr_entries(sector):
            if e.type == 0:
                continue
            if e.type in _MBR_EXTENDED_TYPES:
                if link is None and e.sectors:
                    link = e
                continue
            if e.sectors == 0:
                warnings.append(f"entry in EBR at sector {ebr_lba}: zero length; dropped")
                continue
            number = next_number
            next_number += 1
            what = f"logical partition {number} (type 0x{e.type:02x})"
            start, length = (ebr_lba + e.start_lba) * ss, e.sectors * ss
            if _window_ok(what, start, length, disk.size, warnings):
                parts.append(_mbr_partition(number, start, length, e))
        if link is None:
            return next_number
        ebr_lba = base + link.start_lba
    warnings.append(f"EBR chain longer than {MAX_LOGICAL} links; the rest is ignored")
    return next_number


# --------------------------------------------------------------------------------------------
# GPT


@dataclass(frozen=True)
class _GptHeader:
    my_lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    disk_guid: bytes
    entries_lba: int
    num_entries: int
    entry_size: int
    entries_crc: int


@dataclass(frozen=True)
class _Gpt:
    header: _GptHeader
    entries: bytes


def _load_gpt(disk: _Disk, lba: int) -> tuple[_Gpt | None, str]:
    """Read and fully validate the GPT header at `lba` and its entry array; (gpt, "") or reason."""
    ss = disk.sector_size
    raw = disk.read(lba * ss, ss)
    if raw is None:
        return None, f"sector {lba} is beyond the end of the disk"
    if raw[:8] != _GPT_SIGNATURE:
        return None, "no 'EFI PART' signature"
    (header_size, crc) = struct.unpack_from("<II", raw, 12)
    if not _GPT_MIN_HEADER <= header_size <= ss:
        return None, f"header size {header_size} is invalid"
    check = raw[:16] + b"\0\0\0\0" + raw[20:header_size]
    if zlib.crc32(check) != crc:
        return None, "header CRC32 mismatch"
    my_lba, alt_lba, first_usable, last_usable = struct.unpack_from("<QQQQ", raw, 24)
    disk_guid = raw[56:72]
    entries_lba, num_entries, entry_size, entries_crc = struct.unpack_from("<QIII", raw, 72)
    hdr = _GptHeader(
        my_lba, alt_lba, first_usable, last_usable, disk_guid,
        entries_lba, num_entries, entry_size, entries_crc,
    )  # fmt: skip
    if my_lba != lba:
        return None, f"header claims to be at sector {my_lba}, found at {lba}"
    if entry_size < _GPT_MIN_ENTRY or entry_size % 8:
        return None, f"entry size {entry_size} is invalid"
    array_bytes = num_entries * entry_size
    if array_bytes > MAX_GPT_ARRAY_BYTES:
        return None, f"entry array of {num_entries} x {entry_size} bytes is implausibly large"
    # A last usable sector beyond the end is tolerated (unlike Linux): a truncated image still
    # shows the partitions that fit, and each window is checked against the disk anyway.
    if first_usable > last_usable:
        return None, f"usable sectors {first_usable}-{last_usable} are reversed"
    entries = disk.read(entries_lba * ss, array_bytes) if array_bytes else b""
    if entries is None:
        return None, f"entry array at sector {entries_lba} lies beyond the end of the disk"
    if zlib.crc32(entries) != entries_crc:
        return None, "entry array CRC32 mismatch"
    return _Gpt(hdr, entries), ""


def _find_gpt(disk: _Disk, warnings: list[str]) -> _Gpt | None:
    """Pick the GPT copy to trust: primary if valid, else backup; warn about any disagreement."""
    last_lba = disk.total_lbas - 1
    if last_lba < 2:
        warnings.append("disk too small to hold a GPT")
        return None
    primary, why_primary = _load_gpt(disk, 1)
    backup, why_backup = _load_gpt(disk, last_lba)
    if backup is None and primary is not None and primary.header.alternate_lba != last_lba:
        # A disk grown after partitioning (IVDs are often extended) keeps its backup where the
        # old end was; the primary tells us where.
        moved, _ = _load_gpt(disk, primary.header.alternate_lba)
        if moved is not None:
            warnings.append(
                f"backup GPT header is at sector {primary.header.alternate_lba}, not at the "
                f"last sector {last_lba} (disk resized?)"
            )
            backup, why_backup = moved, ""
    if primary is not None:
        if backup is None:
            warnings.append(f"backup GPT at sector {last_lba} is invalid ({why_backup})")
        elif not _same_table(primary, backup):
            warnings.append("backup GPT differs from the primary; using the primary")
        return primary
    if backup is not None:
        warnings.append(
            f"primary GPT is invalid ({why_primary}); using the backup at sector "
            f"{backup.header.my_lba}"
        )
        return backup
    warnings.append(f"no valid GPT (primary: {why_primary}; backup: {why_backup})")
    return None


def _same_table(a: _Gpt, b: _Gpt) -> bool:
    ha, hb = a.header, b.header
    return (
        ha.disk_guid == hb.disk_guid
        and ha.first_usable == hb.first_usable
        and ha.last_usable == hb.last_usable
        and ha.entry_size == hb.entry_size
        and ha.num_entries == hb.num_entries
        and a.entries == b.entries
    )


def _guid(raw: bytes) -> str:
    # GPT stores GUIDs mixed-endian, which is exactly uuid's bytes_le layout.
    return str(uuid.UUID(bytes_le=raw))


def _gpt_partitions(disk: _Disk, gpt: _Gpt, warnings: list[str]) -> list[Partition]:
    ss = disk.sector_size
    hdr = gpt.header
    parts: list[Partition] = []
    if hdr.last_usable >= disk.total_lbas:
        warnings.append(
            f"GPT describes sectors up to {hdr.last_usable} but the disk has {disk.total_lbas} "
            "(truncated image?)"
        )
    for index in range(hdr.num_entries):
        raw = gpt.entries[index * hdr.entry_size : index * hdr.entry_size + _GPT_MIN_ENTRY]
        type_guid = raw[0:16]
        if type_guid == bytes(16):
            continue
        number = index + 1
        first, last, attrs = struct.unpack_from("<QQQ", raw, 32)
        what = f"GPT partition {number}"
        if last < first:
            warnings.append(f"{what}: ends (sector {last}) before it starts ({first}); dropped")
            continue
        start, length = first * ss, (last - first + 1) * ss
        if not _window_ok(what, start, length, disk.size, warnings):
            continue
        if first < hdr.first_usable or last > hdr.last_usable:
            # Still inside the disk, so safe to expose; it may overlap the table itself.
            warnings.append(f"{what}: lies outside the usable sectors of the GPT")
        name = raw[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        parts.append(
            Partition(
                number=number,
                start=start,
                length=length,
                scheme="gpt",
                type_id=_guid(type_guid),
                name=name,
                guid=_guid(raw[16:32]),
                bootable=bool(attrs & _GPT_ATTR_LEGACY_BOOTABLE),
            )
        )
    return parts


# --------------------------------------------------------------------------------------------
# Entry point


def parse(read: Reader, disk_size: int, sector_size: int = 512) -> PartitionTable:
    """Parse the partition table of a disk of `disk_size` bytes read through `read`.

    `read(offset, length)` must return exactly `length` bytes, fewer only at the end of the disk.
    """
    warnings: list[str] = []
    if sector_size not in _SUPPORTED_SECTOR_SIZES:
        warnings.append(f"unsupported sector size {sector_size}")
        return PartitionTable("none", (), tuple(warnings))
    disk = _Disk(read, max(disk_size, 0), sector_size)
    lba0 = disk.read(0, 512)
    if lba0 is None:
        return PartitionTable("none", (), ())

    if lba0[510:512] != _MBR_SIGNATURE:
        # No MBR at all. The spec wants a protective MBR before a GPT, but a GPT whose LBA 0 was
        # wiped is still worth reading: both headers are CRC-checked, so this cannot misfire on
        # a bare filesystem or random data.
        scratch: list[str] = []
        gpt = _find_gpt(disk, scratch)
        if gpt is None:
            return PartitionTable("none", (), ())
        warnings.append("GPT found without a protective MBR")
        warnings.extend(scratch)
        parts = _gpt_partitions(disk, gpt, warnings)
        return _finish("gpt", parts, warnings)

    entries = _mbr_entries(lba0)
    if any(e.type == _MBR_GPT_PROTECTIVE for e in entries):
        if any(e.type not in (0, _MBR_GPT_PROTECTIVE) for e in entries):
            warnings.append("hybrid MBR: using the GPT and ignoring the MBR entries")
        gpt = _find_gpt(disk, warnings)
        if gpt is None:
            # Like Linux, refuse to fall back to the MBR: its 0xEE entry says the real table is
            # the GPT, and any other entries of a hybrid MBR may be stale.
            return PartitionTable("gpt", (), tuple(warnings))
        return _finish("gpt", _gpt_partitions(disk, gpt, warnings), warnings)

    # FAT and NTFS boot sectors end in 0x55AA too: a whole-disk filesystem ("superfloppy") is no
    # partition table, and its boot code would parse as garbage entries. Like Linux, trust the
    # entries over the BPB when they look sane: GRUB keeps an old BPB when it takes over an MBR.
    vbr = detect_filesystem(lba0)
    if any(e.status not in (0x00, 0x80) for e in entries):
        if vbr is None:
            warnings.append(
                "sector 0 ends in 0x55AA but its boot indicators are invalid; not a partition table"
            )
        return PartitionTable("none", (), tuple(warnings))
    if vbr is not None:
        if all(e.type == 0 for e in entries):
            return PartitionTable("none", (), ())
        warnings.append(f"sector 0 holds both a {vbr} boot sector and partition entries")
    return _finish("mbr", _parse_mbr(disk, entries, warnings), warnings)


def _finish(scheme: str, parts: list[Partition], warnings: list[str]) -> PartitionTable:
    """Sort by number and note overlaps (kept: read-only windows inside the disk are harmless)."""
    parts.sort(key=lambda p: p.number)
    reach: Partition | None = None  # the partition reaching furthest so far, by start order
    for p in sorted(parts, key=lambda p: p.start):
        if reach is not None and p.start < reach.start + reach.length:
            warnings.append(f"partitions {reach.number} and {p.number} overlap")
        if reach is None or p.start + p.length > reach.start + reach.length:
            reach = p
    return PartitionTable(scheme, tuple(parts), tuple(warnings))
