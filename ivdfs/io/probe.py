"""What a disk's first sectors say: its partition table, its LVM volumes, the filesystem of a
window. The parsers (`ivdfs.formats`) stay pure and synchronous; this
runs them over a `DiskReader`.

Role: `over_reader` bridges a parser that reads through a callback to the async reader, with
every read done in the caller's task (its cancel scope, no thread hop): the parser is re-run
over the bytes read so far until it needs no more. `read_layout` reads the table and the LVM
metadata of a disk, each failure costing one log line and showing less, never an error.

Concurrency: trio thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ivdfs.errors import BackendError
from ivdfs.formats.filesystems import detect_filesystem
from ivdfs.formats.lvm_map import LogicalVolume, LvmScan, scan
from ivdfs.formats.partitions import Partition, PartitionTable, Reader, parse
from ivdfs.io.reader import DiskReader

log = logging.getLogger(__name__)

T = TypeVar("T")

# parse() reads a bounded number of structures (MBR, two GPT headers and arrays, 128 EBRs);
# each round of the bridge below adds one of them.
MAX_TABLE_ROUNDS = 512


class _NeedBytes(Exception):
    def __init__(self, offset: int, length: int) -> None:
        self.offset, self.length = offset, length


async def over_reader(fn: Callable[[Reader], T], reader: DiskReader, max_rounds: int) -> T:
    """Run a pure, synchronous parser whose bytes come through a read callback, with every
    read done here in the caller's task (its cancel scope, no thread hop): the parser is
    re-run over the bytes read so far until it needs no more. Parsers read a bounded number
    of structures, so this ends; `max_rounds` bounds it against a parser bug."""
    have: dict[tuple[int, int], bytes] = {}

    def read(offset: int, length: int) -> bytes:
        data = have.get((offset, length))
        if data is None:
            raise _NeedBytes(offset, length)
        return data

    for _ in range(max_rounds):
        try:
            return fn(read)
        except _NeedBytes as need:
            have[(need.offset, need.length)] = bytes(await reader.read(need.offset, need.length))
    raise BackendError("the disk's metadata needs more reads than any valid layout")


async def read_table(reader: DiskReader, sector_size: int = 512) -> PartitionTable:
    return await over_reader(
        lambda read: parse(read, reader.size, sector_size), reader, MAX_TABLE_ROUNDS
    )


async def read_lvm(reader: DiskReader, partitions: tuple[Partition, ...]) -> LvmScan:
    windows = [(p.start, p.length) for p in partitions] or [(0, reader.size)]
    # Each window costs a label read, each PV a header, an area header and its metadata.
    rounds = 8 * len(windows) + 64
    return await over_reader(lambda read: scan(read, windows), reader, rounds)


@dataclass(frozen=True)
class Layout:
    table: PartitionTable
    logical_volumes: tuple[LogicalVolume, ...]


async def read_layout(reader: DiskReader, sector_size: int, where: str) -> Layout:
    """The disk's partition table (counted in its logical `sector_size`) and LVM volumes. A
    damaged or unreadable table or LVM area is logged (one line, naming `where`) and shows
    less: disk.raw alone, or no LVM volume."""
    try:
        table = await read_table(reader, sector_size)
    except BackendError as e:
        log.warning("%s: cannot read the partition table: %s", where, e)
        table = PartitionTable("none", (), ())
    if table.warnings:
        log.warning(
            "%s: partition table (%s): %s%s",
            where,
            table.scheme,
            "; ".join(table.warnings),
            "" if table.partitions else "; showing disk.raw only",
        )
    try:
        found = await read_lvm(reader, table.partitions)
    except BackendError as e:
        log.warning("%s: cannot read LVM metadata: %s", where, e)
        found = LvmScan()
    if found.warnings:
        log.warning("%s: LVM: %s", where, "; ".join(found.warnings))
    for lv in found.volumes:
        if not lv.supported:
            log.info("%s: LVM volume %s not shown: %s", where, lv.dm_name, lv.reason)
    return Layout(table, found.volumes)


async def filesystem_at(reader: DiskReader, pieces: Sequence[tuple[int, int]]) -> str | None:
    """The filesystem whose first bytes lie at these (disk offset, length) pieces, in order
    (`detect_filesystem`'s name), or None."""
    head = b"".join([bytes(await reader.read(off, n)) for off, n in pieces])
    return detect_filesystem(head)
