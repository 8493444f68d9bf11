"""LVM2 inside a guest disk: physical volumes, their metadata, logical volumes as extent maps.

Role: find LVM2 physical volumes (PVs) in byte windows of a disk (its partitions, or the whole
disk), read each one's label, PV header and metadata areas, parse the newest volume-group (VG)
metadata in LVM's text format, and describe every visible logical volume (LV) as the disk byte
ranges that hold it. The tree exposes the supported ones as ``lv-<dm_name>.raw`` windows read
through the same block cache as ``disk.raw``. Nothing is activated: neither the host's LVM nor
device-mapper ever sees these disks, so snapshots with identical VG names cannot clash.

Supported: linear and striped segments (LVM's ``striped`` type; linear is one stripe), mapped
exactly. Every other segment type (mirror, raid, thin, cache, snapshot, vdo, ...), an LV whose
PVs are not all on this disk, and an old-style snapshot's COW store are reported with
``supported=False`` and a one-line `reason`, never silently dropped. Hidden LVs (the internal
parts of such volumes) are not listed, as ``lvs`` does not list them.

Pure, like `ivdfs.io.partitions`: every byte comes through the caller's ``read(offset, length)``
callback. Reads are bounded: per window one read of the four label sectors; per metadata area
(at most `MAX_MDAS` per PV) one 512-byte header and at most two pieces of text of at most
`MAX_METADATA_BYTES` in all.

Concurrency contract: no shared state; every call is independent and may run on any thread.

Hostile input: `scan` never raises because of what it reads (only the reader's own exceptions
propagate), never returns an extent outside its PV's window, and leaves what it distrusted as
human-readable strings in `LvmScan.warnings` (names shown with repr()). The text parser has no
recursion beyond `MAX_DEPTH` and no integer longer than Python's own digit limit.

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
"""

from __future__ import annotations

import bisect
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

__all__ = [
    "LABEL_SCAN_BYTES",
    "MAX_DEPTH",
    "MAX_MDAS",
    "MAX_METADATA_BYTES",
    "ConfigError",
    "ConfigValue",
    "Extent",
    "LogicalVolume",
    "LvmScan",
    "PhysicalVolume",
    "label_sector",
    "lvm_crc",
    "parse_config",
    "scan",
]

Reader = Callable[[int, int], bytes]

SECTOR = 512
# LVM looks for its label in the first four sectors of a device (LABEL_SCAN_SECTORS).
LABEL_SCAN_BYTES = 4 * SECTOR
# lvm2 writes one or two metadata areas per PV; a header listing more is not lvm2's.
MAX_MDAS = 2
# lvm2's default area is 1 MiB and metadata can never exceed half its area; real VGs with
# thousands of LVs stay below a few MiB. More is refused, not read.
MAX_METADATA_BYTES = 16 << 20
# VG { logical_volumes { lv { segment { } } } } is four deep; anything much deeper is hostile.
MAX_DEPTH = 32
# lvm2's own limit (MAX_STRIPES).
MAX_STRIPES = 128

_INITIAL_CRC = 0xF597A6CF
_LABEL_ID = b"LABELONE"
_LABEL_TYPE = b"LVM2 001"
_LABEL_HEADER_SIZE = 32
_PV_UUID_LEN = 32
_MDA_MAGIC = b" LVM2 x[5A%r0N*>"
_MDA_HEADER_SIZE = 512
_RAW_LOCN_IGNORED = 0x1
_MAX_LOCNS = 8  # entries of a location list read before calling it unterminated
# lvm2's name rule (validate_name): these characters, not starting with '-', not . or ..
_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")


def lvm_crc(data: bytes, initial: int = _INITIAL_CRC) -> int:
    """lvm2's calc_crc: zlib's CRC-32 without its pre- and post-inversion."""
    return zlib.crc32(data, initial ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def label_sector(head: bytes) -> int | None:
    """The sector (0-3) of `head` holding a valid LVM2 label, or None. For sniffing."""
    for s in range(LABEL_SCAN_BYTES // SECTOR):
        sector = head[s * SECTOR : (s + 1) * SECTOR]
        if len(sector) == SECTOR and _label_problem(sector, s) == "":
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
    if not _LABEL_HEADER_SIZE <= offset <= SECTOR - (_PV_UUID_LEN + 8 + 32):
        return f"PV header offset {offset} is invalid"
    return ""


# --------------------------------------------------------------------------------------------
# Results


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
# LVM's configuration syntax (libdm-config): name = value, name { ... }, # comments; values
# are "strings", integers, floats or [ flat, lists ].

ConfigValue = str | int | float | list["ConfigValue"] | dict[str, "ConfigValue"]


class ConfigError(ValueError):
    """The text is not LVM configuration syntax; the message says where."""


_TOKEN = re.compile(
    r"""(?:\s+|\#[^\n]*)*(?:
        (?P<punct>[{}\[\],=])
      | "(?P<dq>(?:[^"\\]|\\.)*)"
      | '(?P<sq>(?:[^'\\]|\\.)*)'
      | (?P<word>[^\s{}\[\],=\#"']+)
      | (?P<end>\Z)
    )""",
    re.X | re.S,
)
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+)")
_ESCAPE = re.compile(r"\\(.)", re.S)


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def next(self) -> tuple[str, str]:
        """(kind, text): kind is "punct", "string", "word" or "end"."""
        m = _TOKEN.match(self.text, self.pos)
        if m is None:
            raise ConfigError(f"unexpected character at offset {self.pos}")
        self.pos = m.end()
        if m["punct"] is not None:
            return "punct", m["punct"]
        if m["dq"] is not None:
            return "string", _ESCAPE.sub(r"\1", m["dq"])
        if m["sq"] is not None:
            return "string", _ESCAPE.sub(r"\1", m["sq"])
        if m["word"] is not None:
            return "word", m["word"]
        return "end", ""


def parse_config(text: str) -> dict[str, ConfigValue]:
    """Parse LVM configuration text; ConfigError for anything that is not its syntax.

    A repeated name keeps its first value (libdm's lookups find the first node too).
    """
    lex = _Lexer(text)
    return _parse_block(lex, depth=0)


def _parse_block(lex: _Lexer, depth: int) -> dict[str, ConfigValue]:
    if depth > MAX_DEPTH:
        raise ConfigError(f"sections nested deeper than {MAX_DEPTH}")
    out: dict[str, ConfigValue] = {}
    while True:
        kind, tok = lex.next()
        if kind == "end":
            if depth:
                raise ConfigError("unterminated section at the end of the text")
            return out
        if (kind, tok) == ("punct", "}"):
            if not depth:
                raise ConfigError(f"unbalanced '}}' at offset {lex.pos}")
            return out
        if kind != "word":
            raise ConfigError(f"expected a name at offset {lex.pos}, found {tok!r:.40}")
        name = tok
        kind, tok = lex.next()
        value: ConfigValue
        if (kind, tok) == ("punct", "{"):
            value = _parse_block(lex, depth + 1)
        elif (kind, tok) == ("punct", "="):
            value = _parse_value(lex)
        else:
            raise ConfigError(f"expected '=' or '{{' after {name!r:.40} at offset {lex.pos}")
        out.setdefault(name, value)


def _parse_value(lex: _Lexer) -> ConfigValue:
    kind, tok = lex.next()
    if (kind, tok) == ("punct", "["):
        items: list[ConfigValue] = []
        kind, tok = lex.next()
        if (kind, tok) == ("punct", "]"):
            return items
        while True:
            items.append(_scalar(kind, tok, lex))
            kind, tok = lex.next()
            if (kind, tok) == ("punct", "]"):
                return items
            if (kind, tok) != ("punct", ","):
                raise ConfigError(f"expected ',' or ']' at offset {lex.pos}")
            kind, tok = lex.next()
    return _scalar(kind, tok, lex)


def _scalar(kind: str, tok: str, lex: _Lexer) -> ConfigValue:
    if kind == "string":
        return tok
    if kind == "word":
        try:
            if _INT.fullmatch(tok):
                return int(tok)
            if _FLOAT.fullmatch(tok):
                return float(tok)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise ConfigError(f"number too long at offset {lex.pos}") from None
    raise ConfigError(f"expected a value at offset {lex.pos}, found {tok!r:.40}")


# --------------------------------------------------------------------------------------------
# Reading physical volumes


class _Window:
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
class _Copy:
    """One metadata area's committed VG metadata, parsed."""

    vg_name: str
    vg_id: str
    seqno: int
    vg: dict[str, ConfigValue]
    source: str  # which PV and area, for messages


@dataclass
class _Pv:
    uuid: str  # 32 characters, no hyphens (metadata ids are compared without them)
    window: _Window
    copies: list[_Copy] = field(default_factory=list)


def _show(name: str) -> str:
    return repr(name[:64] + ("..." if len(name) > 64 else ""))


def _format_uuid(raw: str) -> str:
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


def _read_pv(win: _Window, warnings: list[str]) -> _Pv | None:
    head = win.read(0, min(LABEL_SCAN_BYTES, win.length - win.length % SECTOR))
    if head is None:
        return None
    label = None
    for s in range(len(head) // SECTOR):
        sector = head[s * SECTOR : (s + 1) * SECTOR]
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
    pv = _Pv(uuid, win)
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


def _read_mda(pv: _Pv, index: int, start: int, size: int, warnings: list[str]) -> None:
    win = pv.window
    what = f"{win.where()}: metadata area {index + 1} (at PV offset {start})"
    if size < 2 * _MDA_HEADER_SIZE or start < SECTOR or start + size > win.length:
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
        warnings.append(f"{what}: VG {_show(name)} has no id or seqno; not used")
        return
    pv.copies.append(_Copy(name, vg_id, seqno, vg, f"PV {_format_uuid(pv.uuid)} area {index + 1}"))


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
    window: _Window | None


def _vg_volumes(copy: _Copy, found: dict[str, _Pv], warnings: list[str]) -> list[LogicalVolume]:
    vg = copy.vg
    vg_name = copy.vg_name
    where = f"VG {_show(vg_name)}"
    if not _NAME.fullmatch(vg_name) or vg_name in (".", ".."):
        warnings.append(f"{where}: name is not a valid LVM name; its LVs are not listed")
        return []
    extent_sectors = _int(vg, "extent_size")
    if extent_sectors is None or extent_sectors <= 0:
        warnings.append(f"{where}: extent_size is missing or invalid; its LVs are not listed")
        return []
    extent = extent_sectors * SECTOR
    slots: dict[str, _PvSlot] = {}
    for key, pv in _dicts(vg.get("physical_volumes")):
        pv_id, pe_start, pe_count = pv.get("id"), _int(pv, "pe_start"), _int(pv, "pe_count")
        if not isinstance(pv_id, str) or pe_start is None or pe_count is None:
            warnings.append(f"{where}: PV {_show(key)} lacks id, pe_start or pe_count")
            continue
        uuid = pv_id.replace("-", "")
        hit = found.get(uuid)
        slots[key] = _PvSlot(uuid, pe_start * SECTOR, pe_count, hit.window if hit else None)
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
            warnings.append(f"{where}: LV {_show(name)} is not a valid LVM name; not listed")
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
            raise _Unsupported(f"segment {_show(key)} lacks start_extent or extent_count")
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
            raise _Unsupported(f"segment {_show(key)} does not continue at extent {next_extent}")
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
        shown = _show(kind) if isinstance(kind, str) else "(none)"
        raise _Unsupported(f"segment type {shown} (only linear and striped are supported)")
    n = _int(seg, "stripe_count") or 1
    areas = seg.get("stripes")
    if not 1 <= n <= MAX_STRIPES or not isinstance(areas, list) or len(areas) != 2 * n:
        raise _Unsupported(f"segment {_show(key)}: stripe_count and stripes disagree")
    if count % n:
        raise _Unsupported(f"segment {_show(key)}: {count} extents over {n} stripes")
    per_stripe = count // n * extent
    chunk = per_stripe  # linear: one chunk is the whole run
    if n > 1:
        chunk_sectors = _int(seg, "stripe_size")
        if chunk_sectors is None or chunk_sectors <= 0 or per_stripe % (chunk_sectors * SECTOR):
            raise _Unsupported(f"segment {_show(key)}: stripe_size is missing or invalid")
        chunk = chunk_sectors * SECTOR
    stripes = []
    for pv_key, pe in zip(areas[0::2], areas[1::2], strict=True):
        if not isinstance(pv_key, str) or not isinstance(pe, int) or pe < 0:
            raise _Unsupported(f"segment {_show(key)}: malformed stripes list")
        slot = slots.get(pv_key)
        if slot is None:
            if pv_key in lv_names:
                raise _Unsupported(f"it is mapped onto LV {_show(pv_key)} (pvmove in progress?)")
            raise _Unsupported(f"segment {_show(key)} names unknown PV {_show(pv_key)}")
        if slot.window is None:
            raise _Unsupported(f"its PV {_format_uuid(slot.uuid)} is not on this disk")
        if pe + count // n > slot.pe_count:
            raise _Unsupported(f"segment {_show(key)} reaches past the end of its PV's extents")
        offset = slot.pe_start + pe * extent
        if offset + per_stripe > slot.window.length:
            raise _Unsupported(f"segment {_show(key)} reaches past the end of its PV's window")
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
    found: dict[str, _Pv] = {}
    pvs: list[_Pv] = []
    for start, length in windows:
        if start < 0 or length < SECTOR:
            continue
        pv = _read_pv(_Window(read, start, length), warnings)
        if pv is None:
            continue
        if pv.uuid in found:
            warnings.append(
                f"{pv.window.where()}: PV {_format_uuid(pv.uuid)} also found at disk offset "
                f"{found[pv.uuid].window.start} (a cloned PV?); this copy is not used"
            )
            continue
        found[pv.uuid] = pv
        pvs.append(pv)

    # The newest committed metadata of each VG, over all its PVs' areas.
    best: dict[str, _Copy] = {}
    for pv in pvs:
        for c in pv.copies:
            if c.vg_id not in best or c.seqno > best[c.vg_id].seqno:
                best[c.vg_id] = c
    for pv in pvs:
        for c in pv.copies:
            b = best[c.vg_id]
            if c.seqno != b.seqno:
                warnings.append(
                    f"VG {_show(b.vg_name)}: {c.source} holds older metadata (seqno {c.seqno}) "
                    f"than {b.source} ({b.seqno}); using the newer"
                )
    volumes: list[LogicalVolume] = []
    names: set[str] = set()
    member_of: dict[str, str] = {}
    for copy in best.values():
        if copy.vg_name in names:
            warnings.append(
                f"two VGs named {_show(copy.vg_name)} (ids differ); the second is not listed"
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
            _format_uuid(pv.uuid), pv.window.start, pv.window.length, member_of.get(pv.uuid, "")
        )
        for pv in pvs
    )
    return LvmScan(pv_list, tuple(volumes), tuple(warnings))
