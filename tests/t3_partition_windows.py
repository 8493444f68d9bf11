"""Property tests: partition windows through the tree read exactly their bytes (issue 5/6/16).

Random MBR tables (overlapping, out of range, zero length) on an in-memory disk. The windows
the tree shows are checked against what the test wrote into the table, never against the
parser's own offsets (a parser one sector off would agree with itself), and every read of a
window equals the same slice of the source, clamped at the window's end.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivdfs.fs.operations import Operations
from ivdfs.inventory.model import Datastore
from ivdfs.io.block_cache import BlockCache
from ivdfs.tree.nodes import WindowFile
from ivdfs.tree.tree import Tree, TreeSettings
from tests.fakes import FakeDisk, FakeDiskSource, FakeInventory, pattern

pytestmark = pytest.mark.allow_log("partition table \\(mbr\\)")

DISK = 96 * 1024
SECTORS = DISK // 512
CTX: Any = None
# Primary partitions only (extended chains and GPT have their own tests in t1_partitions).
entry = st.tuples(
    st.sampled_from([0x83, 0x07, 0x0C, 0x00]),
    st.integers(0, SECTORS + 64),  # start LBA, sometimes beyond the disk
    st.integers(0, SECTORS + 64),  # length in sectors
)


def mbr(entries: list[tuple[int, int, int]], data: bytearray) -> None:
    # Boot code of zeros: random bytes there could pass for a FAT boot sector.
    data[0:446] = bytes(446)
    data[446:510] = bytes(64)  # unused slots are empty, as a partitioning tool leaves them
    for i, (ptype, start, length) in enumerate(entries):
        off = 446 + 16 * i
        chs = b"\0\0\0"
        data[off : off + 16] = struct.pack("<B3sB3sII", 0, chs, ptype, chs, start, length)
    data[510:512] = b"\x55\xaa"


def expected_windows(entries: list[tuple[int, int, int]]) -> dict[str, tuple[int, int]]:
    """What the table the test wrote means, computed here: slot n is partN.raw when it is in
    use, not empty and inside the disk."""
    out = {}
    for i, (ptype, start, length) in enumerate(entries):
        if ptype and length and (start + length) * 512 <= DISK:
            out[f"part{i + 1}.raw"] = (start * 512, length * 512)
    return out


async def windows_match(data: bytes, entries: list[tuple[int, int, int]],
                        reads: list[tuple[int, int]]) -> int:  # fmt: skip
    inv, src = FakeInventory(), FakeDiskSource()
    inv.add(Datastore("DS", "ds-1"), "ivd", len(data), ["snap"])
    src.disks[("ivd", "snap")] = FakeDisk(data)
    ops = Operations(Tree(inv, src, BlockCache(1 << 20), TreeSettings(block_size=4096)))
    ino = 1
    for name in ("DS", "ivd", "snap"):
        ino = (await ops.lookup(ino, name.encode(), CTX)).st_ino
    tree = ops.tree
    snapdir = tree.get(ino)
    children = await tree.children(snapdir)  # type: ignore[arg-type]
    windows = {n: c for n, c in children.items() if isinstance(c, WindowFile)}
    expected = expected_windows(entries)
    assert sorted(windows) == sorted(expected)
    checked = 0
    for name, node in sorted(windows.items()):
        start, length = expected[name]
        assert node.size == length
        fi = await ops.open(node.ino, os.O_RDONLY, CTX)
        for off, size in reads:
            off %= length + 100
            got = bytes(await ops.read(fi.fh, off, size))
            assert got == data[start + off : start + min(off + size, length)]
            checked += 1
        await ops.release(fi.fh)
    return checked


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.lists(entry, min_size=1, max_size=4),
    reads=st.lists(st.tuples(st.integers(0, DISK), st.integers(0, 20_000)), min_size=1, max_size=6),
)
def test_partition_windows_read_exactly_their_bytes(
    entries: list[tuple[int, int, int]], reads: list[tuple[int, int]]
) -> None:
    data = bytearray(pattern(DISK, "partitions"))
    mbr(entries, data)
    trio.run(windows_match, bytes(data), entries, reads)


def test_a_valid_table_gives_windows() -> None:
    """The property above is not vacuous: a plain table yields windows that get read."""
    data = bytearray(pattern(DISK, "partitions"))
    table = [(0x83, 8, 40), (0x0C, 48, 100)]
    mbr(table, data)
    assert trio.run(windows_match, bytes(data), table, [(0, 512), (20_000, 5000), (100, 1)]) == 6
