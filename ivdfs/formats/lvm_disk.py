"""LVM2's on-disk structures: the label, the PV header, metadata areas and their text.

Role: `read_pv` reads one byte window of a disk (a partition, or the whole disk) as an LVM2
physical volume (PV): its label, PV header and metadata areas, with the committed volume-group
metadata of each area parsed (`ivdfs.formats.lvm_text`). `label_sector` sniffs a label.
Reads are bounded: per window one read of the four label sectors; per metadata area (at most
`MAX_MDAS` per PV) one 512-byte header and at most two pieces of text of at most
`MAX_METADATA_BYTES` in all.

On-disk format (lvm2 ``lib/label/label.h``, ``lib/format_text/layout.h``; checked against
``pvck --dump headers`` of images made by lvm2 2.03):
- label header in one of the first four sectors: ``LABELONE``, its own sector number (u64),
  CRC of bytes 20..511 (u32), offset of the PV header in the sector (u32), ``LVM2 001``;
- PV header: uuid (32 characters), device size (u64), then data areas and metadata areas as
  lists of (offset u64, size u64) each ended by (0, 0);
- a metadata area opens with a 512-byte header: CRC of bytes 4..511, magic, version 1, its own
  start and size (u64), then raw locations (offset u64, size u64, CRC u32, flags u32); the
  first is the committed metadata, text at area start + offset that wraps to area start + 512
  when it reaches the end of the area (a circular buffer);
- every CRC is lvm2's ``calc_crc``: CRC-32 (reflected 0xEDB88320) seeded with 0xf597a6cf,
  without the final inversion.

Pure: every byte comes through the caller's ``read(offset, length)`` callback. Hostile input:
nothing here raises because of what it reads (only the reader's own exceptions propagate);
what it distrusts is a human-readable warning (names shown with repr()).

Concurrency contract: no shared state; any thread.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ivdfs.formats.lvm_text import ConfigError, ConfigValue, parse_config
from ivdfs.units import SECTOR_SIZE

__all__ = [
    "LABEL_SCAN_BYTES",
    "MAX_MDAS",
    "MAX_METADATA_BYTES",
    "FoundPv",
    "MetadataCopy",
    "Window",
    "format_uuid",
    "label_sector",
    "lvm_crc",
    "read_pv",
    "show_name",
]

Reader = Callable[[int, int], bytes]

# LVM looks for its label in the first four sectors of a device (LABEL_SCAN_SECTORS).
LABEL_SCAN_BYTES = 4 * SECTOR_SIZE
# lvm2 writes one or two metadata areas per PV; a header listing more is not lvm2's.
MAX_MDAS = 2
# lvm2's default area is 1 MiB and metadata can never exceed half its area; real VGs with
# thousands of LVs stay below a few MiB. More is refused, not read.
MAX_METADATA_BYTES = 16 << 20

_INITIAL_CRC = 0xF597A6CF
_LABEL_ID = b"LABELONE"
_LABEL_TYPE = b"LVM2 001"
_LABEL_HEADER_SIZE = 32
_PV_UUID_LEN = 32
_MDA_MAGIC = b" LVM2 x[5A%r0N*>"
_MDA_HEADER_SIZE = 512
_RAW_LOCN_IGNORED = 0x1
_MAX_LOCNS = 8  # entries of a location list read before calling it unterminated


def lvm_crc(data: bytes, initial: int = _INITIAL_CRC) -> int:
    """lvm2's calc_crc: zlib's CRC-32 without its pre- and post-inversion."""
    return zlib.crc32(data, initial ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def label_sector(head: bytes) -> int | None:
    """The sector (0-3) of `head` holding a valid LVM2 label, or None. For sniffing."""
    for s in range(LABEL_SCAN_BYTES // SECTOR_SIZE):
        sector = head[s * SECTOR_SIZE : (s + 1) * SECTOR_SIZE]
        if len(sector) == SECTOR_SIZE and _label_problem(sector, s) == "":
            return s
    return None


def _label_problem(sector: bytes, index: int) -> str:
    """Empty if `sector` (number `index` of its device) is a valid LVM2 label, else why not."""
    if sector[:8] != _LABEL_ID:
        return "no label"
    (sector_xl, crc, offset) = struct.unpack_from("<QII", sector, 8)
    if sector_xl != index:
        return f"label claims sector {sector_xl}"
    if lvm_crc(sector[20:]) != crc:
        return "label CRC mismatch"
    if sector[24:32] != _LABEL_TYPE:
        return f"label type {sector[24:32]!r} is not LVM2 001"
    if not _LABEL_HEADER_SIZE <= offset <= SECTOR_SIZE - (_PV_UUID_LEN + 8 + 32):
        return f"PV header offset {offset} is invalid"
    return ""


class Window:
    """The reader bounded to one window: nothing outside it is asked for; short reads: None."""

    def __init__(self, read: Reader, start: int, length: int) -> None:
        self._read = read
        self.start = start
        self.length = length

    def read(self, offset: int, length: int) -> bytes | None:
        if offset < 0 or length <= 0 or offset + length > self.length:
            return None
        data = self._read(self.start + offset, length)
        if len(data) < length:
            return None
        return bytes(data[:length])

    def where(self) -> str:
        return f"LVM PV at disk offset {self.start}"


@dataclass
class MetadataCopy:
    """One metadata area's committed VG metadata, parsed."""

    vg_name: str
    vg_id: str
    seqno: int
    vg: dict[str, ConfigValue]
    source: str  # which PV and area, for messages


@dataclass
class FoundPv:
    uuid: str  # 32 characters, no hyphens (metadata ids are compared without them)
    window: Window
    copies: list[MetadataCopy] = field(default_factory=list)


def show_name(name: str) -> str:
    return repr(name[:64] + ("..." if len(name) > 64 else ""))


def format_uuid(raw: str) -> str:
    cuts = (6, 4, 4, 4, 4, 4, 6)
    parts, pos = [], 0
    for n in cuts:
        parts.append(raw[pos : pos + n])
        pos += n
    return "-".join(parts)


def _locations(hdr: bytes, pos: int) -> tuple[list[tuple[int, int]], int] | None:
    """A (0, 0)-terminated list of (offset, size) from `pos`; None if it runs off the sector."""
    out: list[tuple[int, int]] = []
    for _ in range(_MAX_LOCNS):
        if pos + 16 > len(hdr):
            return None
        offset, size = struct.unpack_from("<QQ", hdr, pos)
        pos += 16
        if offset == 0 and size == 0:
            return out, pos
        out.append((offset, size))
    return None


def read_pv(win: Window, warnings: list[str]) -> FoundPv | None:
    head = win.read(0, min(LABEL_SCAN_BYTES, win.length - win.length % SECTOR_SIZE))
    if head is None:
        return None
    label = None
    for s in range(len(head) // SECTOR_SIZE):
        sector = head[s * SECTOR_SIZE : (s + 1) * SECTOR_SIZE]
        problem = _label_problem(sector, s)
        if problem == "":
            label = sector
            break
        if problem != "no label":
            warnings.append(f"{win.where()}: sector {s}: {problem}; not used")
    if label is None:
        return None
    (offset,) = struct.unpack_from("<I", label, 20)
    raw_uuid = label[offset : offset + _PV_UUID_LEN]
    try:
        uuid = raw_uuid.decode("ascii")
    except UnicodeDecodeError:
        uuid = ""
    if not re.fullmatch(r"[A-Za-z0-9!#]{32}", uuid):  # lvm2's id characters
        warnings.append(f"{win.where()}: PV uuid {raw_uuid!r} is not lvm2's; not used")
        return None
    pv = FoundPv(uuid, win)
    pos = offset + _PV_UUID_LEN + 8  # device_size is not needed: the window is the truth
    data_areas = _locations(label, pos)
    if data_areas is None:
        warnings.append(f"{win.where()}: PV header's data area list is unterminated; not used")
        return None
    mdas = _locations(label, data_areas[1])
    if mdas is None:
        warnings.append(f"{win.where()}: PV header's metadata area list is unterminated")
        return pv
    areas = mdas[0]
    if len(areas) > MAX_MDAS:
        warnings.append(
            f"{win.where()}: PV header lists {len(areas)} metadata areas; reading the first "
            f"{MAX_MDAS}"
        )
    for index, (mda_start, mda_size) in enumerate(areas[:MAX_MDAS]):
        _read_mda(pv, index, mda_start, mda_size, warnings)
    return pv


def _read_mda(pv: FoundPv, index: int, start: int, size: int, warnings: list[str]) -> None:
    win = pv.window
    what = f"{win.where()}: metadata area {index + 1} (at PV offset {start})"
    if size < 2 * _MDA_HEADER_SIZE or start < SECTOR_SIZE or start + size > win.length:
        warnings.append(f"{what}: size {size} or place does not fit the PV; not used")
        return
    hdr = win.read(start, _MDA_HEADER_SIZE)
    if hdr is None:
        warnings.append(f"{what}: unreadable")
        return
    (checksum,) = struct.unpack_from("<I", hdr, 0)
    if lvm_crc(hdr[4:]) != checksum:
        warnings.append(f"{what}: header CRC mismatch; not used")
        return
    magic, version, h_start, h_size = hdr[4:20], *struct.unpack_from("<IQQ", hdr, 20)
    if magic != _MDA_MAGIC or version != 1:
        warnings.append(f"{what}: not an lvm2 metadata area (magic or version); not used")
        return
    if h_start != start or h_size != size:
        warnings.append(f"{what}: header places it at {h_start} (+{h_size}); not used")
        return
    offset, length, text_crc, flags = struct.unpack_from("<QQII", hdr, 40)
    if length == 0 or flags & _RAW_LOCN_IGNORED:
        return  # a PV in no VG yet, or an area lvm2 was told to leave alone
    if not _MDA_HEADER_SIZE <= offset < size or length > size - _MDA_HEADER_SIZE:
        warnings.append(f"{what}: metadata at {offset} (+{length}) lies outside it; not used")
        return
    if length > MAX_METADATA_BYTES:
        warnings.append(f"{what}: {length} bytes of metadata is implausibly large; not read")
        return
    first = min(length, size - offset)
    parts = [win.read(start + offset, first)]
    if first < length:  # the circular buffer wraps to just after the header
        parts.append(win.read(start + _MDA_HEADER_SIZE, length - first))
    if any(p is None for p in parts):
        warnings.append(f"{what}: metadata text unreadable")
        return
    raw = b"".join(p for p in parts if p is not None)
    if lvm_crc(raw) != text_crc:
        warnings.append(f"{what}: metadata text CRC mismatch; not used")
        return
    text = raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")
    try:
        tree = parse_config(text)
    except ConfigError as e:
        warnings.append(f"{what}: metadata text does not parse ({e}); not used")
        return
    vgs = [(k, v) for k, v in tree.items() if isinstance(v, dict) and "physical_volumes" in v]
    if len(vgs) != 1:
        warnings.append(f"{what}: metadata holds {len(vgs)} volume groups, not one; not used")
        return
    name, vg = vgs[0]
    assert isinstance(vg, dict)
    vg_id, seqno = vg.get("id"), vg.get("seqno")
    if not isinstance(vg_id, str) or not isinstance(seqno, int):
        warnings.append(f"{what}: VG {show_name(name)} has no id or seqno; not used")
        return
    pv.copies.append(
        MetadataCopy(name, vg_id, seqno, vg, f"PV {format_uuid(pv.uuid)} area {index + 1}")
    )
