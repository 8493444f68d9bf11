"""VMDK descriptors, parsed from bytes: what ivdfs needs to know of a link to follow a chain
and to tell later whether it changed (CID, parentCID, parentFileNameHint, extent files).

Written from VMware's "Virtual Disk Format 1.1" specification. A link is either a text
descriptor file (``vmfs``, ``vmfsSparse``, ``seSparse``, ``monolithicFlat``, ...) naming its
extent files, or a hosted sparse file (magic ``KDMV``) that embeds its descriptor and is its own
extent. VDDK itself reads the disk; this parser only has to agree with it on the chain, so it
is strict: anything it does not understand is a DescriptorError, and the disk is then read
over the network instead (VDDK refuses such files as well, with 16063).

Concurrency: pure functions, no I/O.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

SECTOR = 512
SPARSE_MAGIC = b"KDMV"  # hosted sparse extent, little-endian 0x564D444B
COWD_MAGIC = b"COWD"  # ESX vmfsSparse delta extent
# Longest descriptor accepted: VMware writes about 1 KiB; a file far larger that claims to be a
# descriptor is a raw image named .vmdk, never to be read whole into memory.
MAX_DESCRIPTOR = 64 * 1024
NO_PARENT = 0xFFFFFFFF
# SparseExtentHeader: magic, version, flags, capacity, grainSize, descriptorOffset,
# descriptorSize (sectors), little-endian.
_SPARSE_HEAD = struct.Struct("<4sIIQQQQ")
_EXTENT = re.compile(
    r"(?P<access>RW|RDONLY|NOACCESS)\s+(?P<sectors>\d+)\s+(?P<kind>[A-Z]+)"
    r'(?:\s+"(?P<file>[^"]*)"(?:\s+(?P<offset>\d+))?)?'
)
_KEY = re.compile(r"(?P<key>[A-Za-z][A-Za-z0-9_.]*)\s*=\s*(?P<value>.*)")
_HEX = re.compile(r"[0-9a-fA-F]{1,8}")
# Extent types whose data lies in a file of its own (ZERO has none).
FILE_EXTENTS = frozenset({"FLAT", "VMFS", "SPARSE", "VMFSSPARSE", "SESPARSE", "VSANSPARSE",
                          "VMFSRDM", "VMFSRAW"})  # fmt: skip


class DescriptorError(ValueError):
    """Bytes that are not a VMDK descriptor ivdfs can follow; the message says why."""


@dataclass(frozen=True)
class Extent:
    access: str  # RW, RDONLY, NOACCESS
    sectors: int
    kind: str  # FLAT, VMFS, SPARSE, VMFSSPARSE, SESPARSE, ZERO, ...
    file: str | None  # relative to the descriptor's folder, or absolute; None for ZERO
    offset: int


@dataclass(frozen=True)
class Descriptor:
    cid: int
    parent_cid: int
    create_type: str
    parent_hint: str | None
    extents: tuple[Extent, ...]

    @property
    def capacity(self) -> int:
        """Sectors: the sum of the extents, as VDDK reports a link's capacity."""
        return sum(e.sectors for e in self.extents)


def sparse_descriptor_span(head: bytes) -> tuple[int, int] | None:
    """(byte offset, byte length) of the descriptor that a hosted sparse file embeds, from its
    first sector; None when `head` is not a hosted sparse header. DescriptorError for a sparse
    file that embeds none (an extent of a text descriptor, not a link) or an absurd one."""
    if len(head) < _SPARSE_HEAD.size or head[:4] != SPARSE_MAGIC:
        return None
    _, _, _, _, _, offset, size = _SPARSE_HEAD.unpack_from(head)
    if offset == 0 or size == 0:
        raise DescriptorError("a sparse extent without an embedded descriptor")
    if size * SECTOR > MAX_DESCRIPTOR or offset > 1 << 40:
        raise DescriptorError(f"embedded descriptor of {size} sectors at sector {offset}")
    return offset * SECTOR, size * SECTOR


def looks_like_text(head: bytes) -> bool:
    """Whether the first bytes of a file can be a text descriptor: no NUL, and a createType
    (or the "# Disk DescriptorFile" line VMware writes first)."""
    return b"\0" not in head and (b"createType" in head or b"# Disk DescriptorFile" in head)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        if '"' in inner:
            raise DescriptorError(f"unbalanced quotes in {value!r}")
        return inner
    if '"' in value:
        raise DescriptorError(f"unbalanced quotes in {value!r}")
    return value


def _hex(key: str, value: str) -> int:
    if not _HEX.fullmatch(value):
        raise DescriptorError(f"{key}={value!r} is not a content ID")
    return int(value, 16)


def parse_descriptor(data: bytes) -> Descriptor:
    """The descriptor in `data` (a descriptor file's bytes, or the embedded area of a sparse
    file, which ends at its first NUL)."""
    data = data.split(b"\0", 1)[0]
    if len(data) > MAX_DESCRIPTOR:
        raise DescriptorError(f"{len(data)} bytes is no descriptor")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DescriptorError(f"not UTF-8 text ({e.reason})") from None
    keys: dict[str, str] = {}
    extents: list[Extent] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if (m := _EXTENT.fullmatch(line)) is not None:
            kind = m["kind"]
            if kind in FILE_EXTENTS and not m["file"]:
                raise DescriptorError(f"extent without a file: {line!r}")
            extents.append(Extent(m["access"], int(m["sectors"]), kind,
                                  m["file"] if kind != "ZERO" else None,
                                  int(m["offset"] or 0)))  # fmt: skip
            continue
        if (k := _KEY.fullmatch(line)) is not None:
            key = k["key"]
            if key in keys:
                raise DescriptorError(f"{key} given twice")
            keys[key] = _unquote(k["value"])
            continue
        raise DescriptorError(f"not a descriptor line: {line[:60]!r}")
    if "CID" not in keys:
        raise DescriptorError("no CID")
    if not extents:
        raise DescriptorError("no extent")
    if "createType" not in keys:
        raise DescriptorError("no createType")
    hint = keys.get("parentFileNameHint") or None
    return Descriptor(
        cid=_hex("CID", keys["CID"]),
        parent_cid=_hex("parentCID", keys.get("parentCID", "ffffffff")),
        create_type=keys["createType"],
        parent_hint=hint,
        extents=tuple(extents),
    )
