"""Unit tests of ivdfs.formats.partitions and .filesystems against real images and hostile bytes.

Role: check the parser against what parted and sgdisk report for images built by the real tools
(tests/testbed/images.py), check filesystem sniffing on real mkfs output, check that the files the
builders place are readable through the partition windows, and hammer `parse` with random,
truncated and mutated tables (hypothesis) to show it never raises, never reads outside the disk
and never returns a window outside it.

Images are built once per session in a temporary directory (about 1.5 s in all).
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivdfs.formats.filesystems import FS_PROBE_SIZE, detect_filesystem
from ivdfs.formats.partitions import (
    MAX_GPT_ARRAY_BYTES,
    MAX_LOGICAL,
    Partition,
    PartitionTable,
    is_ldm,
    parse,
)
from tests.testbed import images

SECTOR = 512
MiB = 1 << 20
FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@dataclass
class Built:
    gpt: images.DiskManifest
    mbr: images.DiskManifest
    bare: images.DiskManifest
    corrupt: dict[str, images.DiskManifest]


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    d = tmp_path_factory.mktemp("images")
    return Built(
        gpt=images.gpt_disk(d / "gpt.img"),
        mbr=images.mbr_disk(d / "mbr.img"),
        bare=images.bare_fs_disk(d / "bare.img"),
        corrupt={
            k: images.corrupt_gpt_disk(d / f"c-{k}.img", damage=k) for k in images.DAMAGE_KINDS
        },
    )


def parse_file(path: Path, disk_size: int | None = None) -> PartitionTable:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size if disk_size is None else disk_size
        return parse(lambda off, n: os.pread(f.fileno(), n, off), size)


def pread(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


class MemDisk:
    """A disk of `size` bytes in memory: a few captured regions, zeros elsewhere.

    Also records every read, so tests can assert that `parse` stays inside the disk and reads
    a bounded amount.
    """

    def __init__(self, size: int, regions: dict[int, bytes]) -> None:
        self.size = size
        self.regions = {off: bytearray(data) for off, data in regions.items()}
        self.reads: list[tuple[int, int]] = []

    @classmethod
    def capture(cls, path: Path, ranges: list[tuple[int, int]]) -> MemDisk:
        return cls(path.stat().st_size, {off: pread(path, off, n) for off, n in ranges})

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        end = min(offset + length, self.size)
        out = bytearray(max(0, end - offset))
        for start, data in self.regions.items():
            lo, hi = max(offset, start), min(end, start + len(data))
            if lo < hi:
                out[lo - offset : hi - offset] = data[lo - start : hi - start]
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        for start, region in self.regions.items():
            if start <= offset and offset + len(data) <= start + len(region):
                region[offset - start : offset - start + len(data)] = data
                return
        raise AssertionError(f"write at {offset} outside captured regions")

    def u(self, fmt: str, offset: int) -> int:
        return int(struct.unpack(fmt, self.read(offset, struct.calcsize(fmt)))[0])

    def put(self, fmt: str, offset: int, value: int) -> None:
        self.write(offset, struct.pack(fmt, value))

    def copy(self) -> MemDisk:
        return MemDisk(self.size, {o: bytes(d) for o, d in self.regions.items()})

    def parse(self, disk_size: int | None = None) -> PartitionTable:
        self.reads.clear()  # only the parser's own reads count
        return parse(self.read, self.size if disk_size is None else disk_size)


def gpt_mem(path: Path) -> MemDisk:
    """The table sectors of a GPT image: LBA 0-33 and the last 33 sectors."""
    size = path.stat().st_size
    return MemDisk.capture(path, [(0, 34 * SECTOR), (size - 33 * SECTOR, 33 * SECTOR)])


def data_extents(path: Path, lo: int, hi: int) -> Iterator[tuple[int, int]]:
    with open(path, "rb") as f:
        pos = lo
        while pos < hi:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                return
            if start >= hi:
                return
            end = min(os.lseek(f.fileno(), start, os.SEEK_HOLE), hi)
            yield start, end - start
            pos = end


def mbr_mem(m: images.DiskManifest) -> MemDisk:
    """Sector 0 plus whatever is written between the logical partitions: the EBRs."""
    first_logical = min(p.start for p in m.partitions if p.number >= 5)
    ranges = [(0, SECTOR)]
    gaps_from = [p.start + p.length for p in m.partitions if p.number < 5]
    lo = max(gaps_from)
    for p in sorted(m.partitions, key=lambda p: p.start):
        if p.start >= first_logical:
            ranges += list(data_extents(m.path, lo, p.start))
            lo = p.start + p.length
    return MemDisk.capture(m.path, ranges)


def fix_gpt_crcs(mem: MemDisk, lba: int) -> None:
    """Recompute the entry-array and header CRCs of the GPT header at `lba`, whatever it says.

    Lets mutations of header fields reach the parser's sanity checks instead of dying at the
    CRC check.
    """
    hdr = lba * SECTOR
    header_size = min(max(mem.u("<I", hdr + 12), 92), SECTOR)
    entries_lba, num, size = (mem.u("<Q", hdr + 72), mem.u("<I", hdr + 80), mem.u("<I", hdr + 84))
    if num * size <= MAX_GPT_ARRAY_BYTES and entries_lba * SECTOR + num * size <= mem.size:
        mem.put("<I", hdr + 88, zlib.crc32(mem.read(entries_lba * SECTOR, num * size)))
    mem.put("<I", hdr + 16, 0)
    mem.put("<I", hdr + 16, zlib.crc32(mem.read(hdr, header_size)))


def fix_all_gpt_crcs(mem: MemDisk) -> None:
    fix_gpt_crcs(mem, 1)
    fix_gpt_crcs(mem, mem.size // SECTOR - 1)


def check_invariants(table: PartitionTable, disk_size: int, mem: MemDisk | None = None) -> None:
    """What must hold for any input at all."""
    assert table.scheme in ("mbr", "gpt", "none")
    assert all(isinstance(w, str) and w for w in table.warnings)
    numbers = [p.number for p in table.partitions]
    assert len(numbers) == len(set(numbers)) and numbers == sorted(numbers)
    if table.scheme == "none":
        assert table.partitions == ()
    for p in table.partitions:
        assert p.scheme == table.scheme
        assert p.number >= 1
        assert p.length > 0
        assert 0 <= p.start and p.start + p.length <= disk_size
    if mem is not None:
        for off, n in mem.reads:
            assert 0 <= off and n > 0 and off + n <= max(disk_size, 0)
        # Two GPT copies at most, an MBR, a bounded EBR chain per container (4 containers).
        bound = 2 * (MAX_GPT_ARRAY_BYTES + 4096) + 3 * 4096 + 4 * (MAX_LOGICAL + 1) * SECTOR
        assert sum(n for _, n in mem.reads) <= bound


def layout(table: PartitionTable) -> list[tuple[int, int, int]]:
    return [(p.number, p.start, p.length) for p in table.partitions]


def mbr_entry(ptype: int, start: int, count: int, status: int = 0) -> bytes:
    return struct.pack("<B3sB3sII", status, b"\0\0\0", ptype, b"\0\0\0", start, count)


def mbr_sector(*entries: bytes) -> bytes:
    table = b"".join(entries).ljust(64, b"\0")
    return bytes(446) + table + b"\x55\xaa"


# --------------------------------------------------------------------------------------------
# Real images vs the tools


def sgdisk_info(path: Path, number: int) -> dict[str, str]:
    out = subprocess.run(
        ["sgdisk", "-i", str(number), str(path)],
        capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C.UTF-8"},
    ).stdout  # fmt: skip
    info = {}
    for line in out.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            info[key.strip()] = value.strip()
    return info


def test_gpt_layout_matches_parted_and_sgdisk(built: Built) -> None:
    table = parse_file(built.gpt.path)
    assert table.scheme == "gpt" and table.warnings == ()
    # The manifest is parted's `unit B print`, read fresh when the image was built.
    assert layout(table) == [(p.number, p.start, p.length) for p in built.gpt.partitions]
    for p in table.partitions:
        info = sgdisk_info(built.gpt.path, p.number)
        assert info["Partition GUID code"].split()[0].lower() == p.type_id
        assert info["Partition unique GUID"].lower() == p.guid
        assert int(info["First sector"].split()[0]) * SECTOR == p.start
        assert (int(info["Last sector"].split()[0]) + 1) * SECTOR == p.start + p.length
        assert info["Partition name"] == f"'{p.name}'"
        assert p.bootable == bool(int(info["Attribute flags"], 16) & 4)
    assert [p.name for p in table.partitions] == ["linux-root", "fat-data", "données"]
    assert [p.bootable for p in table.partitions] == [True, False, False]


def test_mbr_layout_matches_parted(built: Built) -> None:
    table = parse_file(built.mbr.path)
    assert table.scheme == "mbr" and table.warnings == ()
    # parted also lists the extended container (2); the parser leaves it out on purpose.
    assert layout(table) == [(p.number, p.start, p.length) for p in built.mbr.partitions]
    assert [p.number for p in table.partitions] == [1, 5, 6]
    kinds = {p.number: p.type_id for p in table.partitions}
    assert kinds[1] == kinds[5] == "0x83"
    assert kinds[6] in ("0x0b", "0x0c", "0x06", "0x0e")
    assert [p.bootable for p in table.partitions] == [True, False, False]
    assert all(p.name == "" and p.guid == "" for p in table.partitions)


# What parted makes at each logical sector size. Five logical partitions of different sizes,
# with gaps: each EBR's link is relative to the extended partition's start and its data entry
# to the EBR itself, and only a chain of three or more tells the two bases apart. GPT entry 2
# is removed again, so numbering must keep the empty slot (as /dev/sdX3 stays 3).
PARTED_LAYOUTS = {
    "msdos": [
        "mkpart", "primary", "1MiB", "3MiB",
        "mkpart", "extended", "3MiB", "100%",
        "mkpart", "logical", "4MiB", "6MiB",
        "mkpart", "logical", "8MiB", "9MiB",
        "mkpart", "logical", "11MiB", "15MiB",
        "mkpart", "logical", "16MiB", "17MiB",
        "mkpart", "logical", "20MiB", "23MiB",
    ],
    "gpt": [
        "mkpart", "a", "1MiB", "3MiB",
        "mkpart", "b", "3MiB", "5MiB",
        "mkpart", "c", "6MiB", "9MiB",
        "mkpart", "d", "12MiB", "13MiB",
        "rm", "2",
    ],
}  # fmt: skip


def parted_print(device: str) -> tuple[int, list[tuple[int, int, int]]]:
    """(logical sector size, [(number, start, length)]) from `parted -m unit B print`."""
    out = subprocess.run(
        ["parted", "-m", "-s", device, "unit", "B", "print"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    sector = int(out[1].split(":")[3])
    parts = []
    for line in out[2:]:
        num, start, _end, size, *_ = line.rstrip(";").split(":")
        parts.append((int(num), int(start[:-1]), int(size[:-1])))
    return sector, parts


@pytest.mark.parametrize("sector", [512, 4096])
@pytest.mark.parametrize("label", ["msdos", "gpt"])
def test_tables_match_parted_at_each_sector_size(tmp_path: Path, label: str, sector: int) -> None:
    """parted writes the table (on a loop device with 4096-byte logical sectors for 4Kn) and
    reports its own offsets; the parser, told the sector size, must find exactly those."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    device = str(image)
    if sector != SECTOR:
        device = subprocess.run(
            ["losetup", "--sector-size", str(sector), "-f", "--show", str(image)],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    try:
        subprocess.run(
            ["parted", "-s", "-a", "optimal", device, "mklabel", label, *PARTED_LAYOUTS[label]],
            capture_output=True, check=True,
        )  # fmt: skip
        reported_sector, expected = parted_print(device)
    finally:
        if device != str(image):
            subprocess.run(["losetup", "-d", device], check=True)
    assert reported_sector == sector
    if label == "msdos":  # 2 is the extended container, which the parser leaves out
        expected = [p for p in expected if p[0] != 2]
    assert [n for n, _, _ in expected] == ([1, 5, 6, 7, 8, 9] if label == "msdos" else [1, 3, 4])
    with open(image, "rb") as f:
        table = parse(lambda off, n: os.pread(f.fileno(), n, off), 32 * MiB, sector)
    assert table.scheme == ("mbr" if label == "msdos" else "gpt")
    assert table.warnings == ()
    assert layout(table) == expected


@pytest.mark.parametrize("which", ["gpt", "mbr"])
def test_detect_filesystem_on_each_partition(built: Built, which: str) -> None:
    manifest: images.DiskManifest = getattr(built, which)
    table = parse_file(manifest.path)
    for p, expect in zip(table.partitions, manifest.partitions, strict=True):
        assert detect_filesystem(pread(manifest.path, p.start, FS_PROBE_SIZE)) == expect.fs


def test_bare_filesystem_has_no_table(built: Built) -> None:
    table = parse_file(built.bare.path)
    assert table == PartitionTable("none", (), ())
    assert detect_filesystem(pread(built.bare.path, 0, FS_PROBE_SIZE)) == "ext4"


def extract(path: Path, p: Partition, dest: Path) -> Path:
    """Copy a partition window to its own file, holes kept."""
    with open(dest, "wb") as out:
        out.truncate(p.length)
        for off, n in data_extents(path, p.start, p.start + p.length):
            out.seek(off - p.start)
            out.write(pread(path, off, n))
    return dest


def read_file_in_fs(image: Path, fs: str, rel: str) -> bytes:
    if fs == "ext4":
        argv = ["debugfs", "-R", f"cat /{rel}", str(image)]
    elif fs == "vfat":
        argv = ["mtype", "-i", str(image), f"::/{rel}"]
    else:
        argv = ["ntfscat", str(image), rel]
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    return subprocess.run(argv, capture_output=True, check=True, env=env).stdout


@pytest.mark.parametrize("which", ["gpt", "mbr"])
def test_files_are_readable_through_partition_windows(
    built: Built, which: str, tmp_path: Path
) -> None:
    manifest: images.DiskManifest = getattr(built, which)
    table = parse_file(manifest.path)
    for p, expect in zip(table.partitions, manifest.partitions, strict=True):
        assert expect.fs is not None
        image = extract(manifest.path, p, tmp_path / f"part{p.number}.img")
        for rel, digest in expect.files.items():
            data = read_file_in_fs(image, expect.fs, rel)
            assert hashlib.sha256(data).hexdigest() == digest, (p.number, rel)
        needle = read_file_in_fs(image, expect.fs, "needle.txt")
        assert needle == f"ivdfs-needle-{p.number}\n".encode()
        image.unlink()


@pytest.mark.parametrize("damage", images.DAMAGE_KINDS)
def test_corrupt_gpt_variants(built: Built, damage: str) -> None:
    m = built.corrupt[damage]
    table = parse_file(m.path)
    assert table.scheme == "gpt"
    if damage == "both":
        assert table.partitions == ()
        assert any("no valid GPT" in w for w in table.warnings)
        return
    assert layout(table) == [(p.number, p.start, p.length) for p in m.partitions]
    expected = {
        "primary-header": "primary GPT is invalid (header CRC32",
        "primary-entries": "primary GPT is invalid (entry array CRC32",
        "backup-header": "backup GPT at sector",
    }[damage]
    assert any(w.startswith(expected) for w in table.warnings), table.warnings
    assert detect_filesystem(pread(m.path, table.partitions[0].start, FS_PROBE_SIZE)) == "ext4"


# --------------------------------------------------------------------------------------------
# Filesystem sniffing on real mkfs output


@pytest.mark.parametrize(
    ("argv", "size_mb", "expect"),
    [
        (["mkfs.ext4", "-q", "-F"], 4, "ext4"),
        (["mke2fs", "-q", "-F", "-t", "ext3"], 4, "ext3"),
        (["mke2fs", "-q", "-F", "-t", "ext2"], 4, "ext2"),
        (["mkfs.vfat"], 4, "vfat"),
        (["mkfs.vfat", "-F", "32"], 40, "vfat"),
        (["mkntfs", "-F", "-Q", "-q"], 4, "ntfs"),
        (["mkswap"], 4, "swap"),
        (["mkfs.xfs", "-q", "-f"], 300, "xfs"),
        (["mkfs.btrfs", "-q", "-f"], 128, "btrfs"),
        # An external ext journal holds no files: not worth offering as a filesystem.
        (["mke2fs", "-q", "-F", "-O", "journal_dev"], 4, None),
    ],
)
def test_detect_filesystem_real_mkfs(
    argv: list[str], size_mb: int, expect: str | None, tmp_path: Path
) -> None:
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(size_mb * MiB)
    subprocess.run([*argv, str(image)], capture_output=True, check=True)
    assert detect_filesystem(pread(image, 0, FS_PROBE_SIZE)) == expect
    # Too short a head must not raise, only lose the answer (or keep it).
    assert detect_filesystem(pread(image, 0, 100)) in (None, expect)


def test_detect_filesystem_lvm_label(tmp_path: Path) -> None:
    # pvcreate needs a block device: the builder runs it on a loop device of the image.
    m = images.lvm_disk(tmp_path / "lvm.img", "whole")
    head = pread(m.path, 0, FS_PROBE_SIZE)
    assert detect_filesystem(head) == "LVM2_member"
    # The label sits in sector 1; lvm2 would find it in any of the first four sectors.
    moved = bytearray(FS_PROBE_SIZE)
    moved[1536:2048] = head[512:1024]
    assert detect_filesystem(bytes(moved)) is None  # it still says it is in sector 1
    struct.pack_into("<Q", moved, 1536 + 8, 3)
    assert detect_filesystem(bytes(moved)) == "LVM2_member"
    # The CRC (lvm2's: zlib's without the inversions) covers the rest of the sector.
    moved[1536 + 100] ^= 1
    assert detect_filesystem(bytes(moved)) is None
    crc = zlib.crc32(bytes(moved[1536 + 20 : 2048]), 0xF597A6CF ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
    struct.pack_into("<I", moved, 1536 + 16, crc)
    assert detect_filesystem(bytes(moved)) == "LVM2_member"
    for off in (0, 9, 17, 25, 40):  # id, sector number, CRC, type, uuid
        broken = bytearray(head)
        broken[512 + off] ^= 0x20
        assert detect_filesystem(bytes(broken)) is None, off
    assert detect_filesystem(head[:1000]) is None  # a label cut short is no label


def test_detect_xfs_needs_a_sane_superblock(tmp_path: Path) -> None:
    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(300 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-f", str(image)], capture_output=True, check=True)
    head = pread(image, 0, FS_PROBE_SIZE)
    assert detect_filesystem(head) == "xfs"
    for offset in (4, 0x54, 0x58, 0x66, 0x68):  # block size, AG blocks/count, sector, inode
        broken = bytearray(head)
        broken[offset : offset + 4] = b"\0\0\0\0" if offset in (0x54, 0x58) else b"\0\3\0\0"
        assert detect_filesystem(bytes(broken)) is None, hex(offset)
    assert detect_filesystem(b"XFSB") is None


def test_detect_filesystem_synthetic() -> None:
    # exfatprogs is not in the test bed (and the suite never skips): use the signature its
    # mkfs would write. btrfs: the magic alone, as blkid goes by.
    btrfs = bytearray(FS_PROBE_SIZE)
    btrfs[0x10040:0x10048] = b"_BHRfS_M"
    assert detect_filesystem(bytes(btrfs)) == "btrfs"
    assert detect_filesystem(b"") is None
    assert detect_filesystem(bytes(FS_PROBE_SIZE)) is None
    assert detect_filesystem(images.block_data(1, 1, FS_PROBE_SIZE)) is None
    assert detect_filesystem(mbr_sector(mbr_entry(0x83, 2048, 2048))) is None
    exfat = b"\xeb\x76\x90EXFAT   ".ljust(512, b"\0")[:510] + b"\x55\xaa"
    assert detect_filesystem(exfat) == "exfat"


def test_detect_fat_rejects_broken_bpb(tmp_path: Path) -> None:
    image = tmp_path / "fat.img"
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
    subprocess.run(["mkfs.vfat", str(image)], capture_output=True, check=True)
    head = pread(image, 0, FS_PROBE_SIZE)
    assert detect_filesystem(head) == "vfat"
    for offset, value in ((11, b"\x00\x03"), (13, b"\x03"), (14, b"\x00\x00"), (16, b"\x05")):
        broken = head[:offset] + value + head[offset + len(value) :]
        assert detect_filesystem(broken) is None, offset


@pytest.mark.parametrize("mkfs", [["mkfs.vfat"], ["mkntfs", "-F", "-Q", "-q"]])
def test_superfloppy_is_not_a_partition_table(mkfs: list[str], tmp_path: Path) -> None:
    # FAT and NTFS boot sectors end in 0x55AA like an MBR; their boot code is not a table.
    image = tmp_path / "whole.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run([*mkfs, str(image)], capture_output=True, check=True)
    assert parse_file(image) == PartitionTable("none", (), ())


# --------------------------------------------------------------------------------------------
# Hand-made hostile tables


def test_tiny_blank_and_odd_disks() -> None:
    for size in (0, 1, 511, 512, 4096, 1 * MiB):
        mem = MemDisk(size, {})
        assert mem.parse() == PartitionTable("none", (), ())
    assert parse(lambda o, n: b"", 1 * MiB).scheme == "none"  # a reader that returns nothing
    assert parse(lambda o, n: bytes(n), -5) == PartitionTable("none", (), ())
    odd = parse(lambda o, n: bytes(n), 1 * MiB, sector_size=520)
    assert odd.scheme == "none" and odd.warnings


def test_mbr_entries_outside_disk_or_empty_are_dropped() -> None:
    size = 8 * MiB
    mem = MemDisk(size, {0: mbr_sector(
        mbr_entry(0x83, 2048, 4096, status=0x80),  # fine
        mbr_entry(0x83, 8192, 0),  # zero length
        mbr_entry(0x07, 16000, 2000),  # ends past 8 MiB = 16384 sectors
        mbr_entry(0x0C, 0xFFFFFFFF, 0xFFFFFFFF),  # far beyond
    )})  # fmt: skip
    table = mem.parse()
    check_invariants(table, size, mem)
    assert layout(table) == [(1, MiB, 2 * MiB)]
    assert table.partitions[0].bootable
    assert sum("dropped" in w for w in table.warnings) == 3


def test_invalid_boot_indicator_is_not_a_table() -> None:
    mem = MemDisk(MiB, {0: mbr_sector(mbr_entry(0x83, 2048, 10, status=0x12))})
    table = mem.parse()
    assert table.scheme == "none" and table.partitions == () and table.warnings


def test_ebr_loop_on_real_image_is_cut(built: Built) -> None:
    mem = mbr_mem(built.mbr)
    ext_lba = mem.u("<I", 446 + 16 + 8)  # slot 2 of the MBR is the extended container
    ebr1 = ext_lba * SECTOR
    # First EBR's link -> second EBR; point the second EBR's link back at the first.
    ebr2 = (ext_lba + mem.u("<I", ebr1 + 446 + 16 + 8)) * SECTOR
    mem.write(ebr2 + 446 + 16, mbr_entry(0x05, 0, 100))
    table = mem.parse()
    check_invariants(table, mem.size, mem)
    assert [p.number for p in table.partitions] == [1, 5, 6]
    assert any("loops back" in w for w in table.warnings)


def test_ebr_self_loop_and_long_chain() -> None:
    size = 4 * MiB
    base = 2048
    # Self loop: the first EBR links to offset 0 of the container, i.e. itself.
    ebr = mbr_sector(mbr_entry(0x83, 1, 1), mbr_entry(0x05, 0, 4))
    mem = MemDisk(size, {0: mbr_sector(mbr_entry(0x05, base, 4096)), base * SECTOR: ebr})
    table = mem.parse()
    check_invariants(table, size, mem)
    assert layout(table) == [(5, (base + 1) * SECTOR, SECTOR)]
    assert any("loops back" in w for w in table.warnings)

    # A chain of 200 EBRs 2 sectors apart: cut at MAX_LOGICAL.
    regions: dict[int, bytes] = {0: mbr_sector(mbr_entry(0x0F, base, 4096))}
    for k in range(200):
        regions[(base + 2 * k) * SECTOR] = mbr_sector(
            mbr_entry(0x83, 1, 1), mbr_entry(0x05, 2 * (k + 1), 2)
        )
    mem = MemDisk(size, regions)
    table = mem.parse()
    check_invariants(table, size, mem)
    assert len(table.partitions) == MAX_LOGICAL
    assert table.partitions[-1].number == 4 + MAX_LOGICAL
    assert any("longer than" in w for w in table.warnings)


def test_ebr_pointing_into_a_partition_or_outside_is_cut() -> None:
    size = 4 * MiB
    regions = {
        0: mbr_sector(mbr_entry(0x83, 2048, 1024), mbr_entry(0x05, 4096, 2048)),
        4096 * SECTOR: mbr_sector(mbr_entry(0x83, 1, 100), mbr_entry(0x05, 10, 50)),
        4106 * SECTOR: mbr_sector(mbr_entry(0x83, 1, 100), mbr_entry(0x05, 5000, 50)),
    }
    table = MemDisk(size, regions).parse()
    check_invariants(table, size)
    # EBR 2 (sector 4106) lies inside logical 5 (4097..4196): its entries would be file data.
    assert [p.number for p in table.partitions] == [1, 5]
    assert any("inside partition 5" in w for w in table.warnings)

    # A link past the end of the container, and a reader that stops short of disk_size.
    regions[4096 * SECTOR] = mbr_sector(mbr_entry(0x83, 1, 5), mbr_entry(0x05, 10, 50))
    regions[4106 * SECTOR] = mbr_sector(mbr_entry(0x83, 1, 10), mbr_entry(0x05, 4000, 50))
    table = MemDisk(size, regions).parse()
    assert [p.number for p in table.partitions] == [1, 5, 6]
    assert any("outside its extended partition" in w for w in table.warnings)
    mem = MemDisk(size, regions)
    table = parse(lambda o, n: mem.read(o, n) if o < 4100 * SECTOR else b"", size)
    check_invariants(table, size)
    assert [p.number for p in table.partitions] == [1, 5]
    assert any("unreadable" in w for w in table.warnings)


def test_gpt_mutations_with_valid_crcs(built: Built) -> None:
    base = gpt_mem(built.gpt.path)
    size, last = base.size, base.size // SECTOR - 1
    e1, e2 = 2 * SECTOR, 2 * SECTOR + 128
    backup_e2 = (last - 32) * SECTOR + 128

    def variant(edit: Callable[[MemDisk], None]) -> PartitionTable:
        mem = base.copy()
        edit(mem)
        fix_all_gpt_crcs(mem)
        table = mem.parse()
        check_invariants(table, size, mem)
        return table

    # Entry 2 removed from both copies: numbers 1 and 3 stay.
    def remove_2(m: MemDisk) -> None:
        m.write(e2, bytes(128))
        m.write(backup_e2, bytes(128))

    assert [p.number for p in variant(remove_2).partitions] == [1, 3]

    # Entry 1 reaching past the disk end / ending before its start / zero-ish: dropped.
    for last_lba, word in ((last + 1, "beyond"), (0x7FFF_FFFF_FFFF_FFFF, "beyond"), (5, "before")):

        def bad_entry(m: MemDisk, value: int = last_lba) -> None:
            m.put("<Q", e1 + 40, value)
            m.put("<Q", (last - 32) * SECTOR + 40, value)

        table = variant(bad_entry)
        assert [p.number for p in table.partitions] == [2, 3]
        assert any(word in w for w in table.warnings)

    # Absurd entry count on both copies: no GPT (rather than reading gigabytes).
    def huge(m: MemDisk) -> None:
        m.put("<I", SECTOR + 80, 0xFFFF_FFFF)
        m.put("<I", last * SECTOR + 80, 0xFFFF_FFFF)

    table = variant(huge)
    assert table.partitions == () and any("implausibly large" in w for w in table.warnings)

    # Entry array placed beyond the disk in the primary only: backup used.
    table = variant(lambda m: m.put("<Q", SECTOR + 72, last + 10))
    assert [p.number for p in table.partitions] == [1, 2, 3]
    assert any("using the backup" in w for w in table.warnings)


def test_hybrid_mbr_prefers_gpt(built: Built) -> None:
    mem = gpt_mem(built.gpt.path)
    mem.write(446 + 16, mbr_entry(0x83, 2048, 100))
    table = mem.parse()
    assert table.scheme == "gpt" and [p.number for p in table.partitions] == [1, 2, 3]
    assert any("hybrid" in w for w in table.warnings)


def test_gpt_without_protective_mbr(built: Built) -> None:
    mem = gpt_mem(built.gpt.path)
    mem.write(0, bytes(SECTOR))
    table = mem.parse()
    assert table.scheme == "gpt" and len(table.partitions) == 3
    assert any("without a protective MBR" in w for w in table.warnings)


def test_grown_disk_finds_backup_at_old_end(built: Built) -> None:
    # An IVD extended after partitioning: the backup GPT sits at the old last sector.
    old = gpt_mem(built.gpt.path)
    mem = MemDisk(old.size + 16 * MiB, old.regions)
    table = mem.parse()
    check_invariants(table, mem.size, mem)
    assert len(table.partitions) == 3
    assert any("disk resized" in w for w in table.warnings)


def test_truncated_disk_and_lying_reader(built: Built) -> None:
    # The image is cut short: the backup is gone and windows past the cut are dropped.
    table = parse_file(built.gpt.path, disk_size=30 * MiB)
    check_invariants(table, 30 * MiB)
    assert [p.number for p in table.partitions] == [1]
    # disk_size claims more than the reader can deliver: short reads, no exception.
    table = parse_file(built.mbr.path, disk_size=1 << 40)
    check_invariants(table, 1 << 40)


# --------------------------------------------------------------------------------------------
# Property tests


@FUZZ
@given(
    data=st.binary(max_size=FS_PROBE_SIZE),
    steer=st.sampled_from(
        [
            b"",
            b"LABELONE",
            b"XFSB",
            b"_BHRfS_M",
            b"\x53\xef",
            b"NTFS    ",
            b"LUKS\xba\xbe",
            b"-FVE-FS-",
        ]
    ),
    at=st.sampled_from([0, 3, 512, 1024 + 0x38, 1536, 0x10040]),
)
def test_detect_filesystem_never_raises(data: bytes, steer: bytes, at: int) -> None:
    head = bytearray(data)
    head[at : at + len(steer)] = steer
    assert detect_filesystem(bytes(head)) in {
        None, "ext2", "ext3", "ext4", "vfat", "exfat", "ntfs", "xfs", "btrfs", "swap",
        "LVM2_member", "linux_raid_member", "crypto_LUKS", "BitLocker",
    }  # fmt: skip


@FUZZ
@given(data=st.binary(min_size=0, max_size=8192), mbr_sig=st.booleans(), gpt_type=st.booleans())
def test_random_bytes_never_break_parse(data: bytes, mbr_sig: bool, gpt_type: bool) -> None:
    buf = bytearray(data.ljust(1024, b"\0") if (mbr_sig or gpt_type) else data)
    if mbr_sig:
        buf[510:512] = b"\x55\xaa"
    if gpt_type:
        buf[446 + 4] = 0xEE  # steer into the GPT path
    mem = MemDisk(len(buf), {0: bytes(buf)})
    check_invariants(mem.parse(), len(buf), mem)


_u32s = st.one_of(
    st.sampled_from([0, 1, 2, 63, 2047, 2048, 4095, 0xFFFFFFFF]), st.integers(0, 2**32 - 1)
)
_types = st.sampled_from([0x00, 0x05, 0x0F, 0x85, 0x83, 0x07, 0xEE, 0x0C])
_entries = st.lists(
    st.builds(mbr_entry, _types, _u32s, _u32s, st.sampled_from([0, 0x80])), min_size=4, max_size=4
)


@FUZZ
@given(
    mbr=_entries,
    ebrs=st.lists(st.tuples(st.integers(0, 4095), _entries), max_size=6),
)
def test_random_mbr_and_ebr_tables(mbr: list[bytes], ebrs: list[tuple[int, list[bytes]]]) -> None:
    size = 2 * MiB
    regions = {0: mbr_sector(*mbr)}
    for lba, ents in ebrs:
        if lba:
            regions[lba * SECTOR] = mbr_sector(*ents)
    mem = MemDisk(size, regions)
    check_invariants(mem.parse(), size, mem)


def _flips(limit: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    return st.lists(
        st.tuples(st.integers(0, limit - 1), st.integers(1, 255)), min_size=1, max_size=24
    )


@pytest.fixture(scope="session")
def gpt_tables(built: Built) -> MemDisk:
    return gpt_mem(built.gpt.path)


@pytest.fixture(scope="session")
def mbr_tables(built: Built) -> MemDisk:
    return mbr_mem(built.mbr)


@FUZZ
@given(
    flips=_flips(34 * SECTOR),
    tail=_flips(33 * SECTOR),
    refresh_crc=st.booleans(),
    tail_too=st.booleans(),
)
def test_mutated_real_gpt(
    gpt_tables: MemDisk,
    flips: list[tuple[int, int]],
    tail: list[tuple[int, int]],
    refresh_crc: bool,
    tail_too: bool,
) -> None:
    mem = gpt_tables.copy()
    for off, x in flips:
        mem.write(off, bytes([mem.read(off, 1)[0] ^ x]))
    if tail_too:
        t0 = mem.size - 33 * SECTOR
        for off, x in tail:
            mem.write(t0 + off, bytes([mem.read(t0 + off, 1)[0] ^ x]))
    if refresh_crc:
        fix_all_gpt_crcs(mem)
    check_invariants(mem.parse(), mem.size, mem)


_HEADER_FIELDS = [
    (12, "<I"),
    (24, "<Q"),
    (32, "<Q"),
    (40, "<Q"),
    (48, "<Q"),
    (72, "<Q"),
    (80, "<I"),
    (84, "<I"),
]
_ENTRY_FIELDS = [(32, "<Q"), (40, "<Q")]


@FUZZ
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["primary", "backup", "entry"]),
            st.integers(0, 7),
            st.integers(0, 3),
            st.one_of(
                st.sampled_from(
                    [0, 1, 2, 33, 34, 127, 128, 131071, 131072, 2**32 - 1, 2**63, 2**64 - 1]
                ),
                st.integers(0, 2**64 - 1),
            ),
        ),
        min_size=1,
        max_size=6,
    ),
    disk_size=st.one_of(st.just(64 * MiB), st.integers(0, 70 * MiB)),
)
def test_gpt_field_edits_with_valid_crcs(
    gpt_tables: MemDisk, edits: list[tuple[str, int, int, int]], disk_size: int
) -> None:
    mem = gpt_tables.copy()
    last = mem.size // SECTOR - 1
    for where, field, entry, value in edits:
        if where == "entry":
            off, fmt = _ENTRY_FIELDS[field % 2]
            base = 2 * SECTOR + 128 * entry
        else:
            off, fmt = _HEADER_FIELDS[field]
            base = SECTOR if where == "primary" else last * SECTOR
        mem.put(fmt, base + off, value % (1 << (8 * struct.calcsize(fmt))))
    fix_all_gpt_crcs(mem)
    check_invariants(mem.parse(disk_size), disk_size, mem)


@FUZZ
@given(data=st.data(), disk_size=st.integers(0, 64 * MiB))
def test_mutated_and_truncated_real_mbr(
    mbr_tables: MemDisk, data: st.DataObject, disk_size: int
) -> None:
    mem = mbr_tables.copy()
    sectors = [(off, len(r)) for off, r in mem.regions.items()]
    for _ in range(data.draw(st.integers(0, 12))):
        off, n = data.draw(st.sampled_from(sectors))
        # Aim at the partition entries: that is where the damage matters.
        pos = off + data.draw(st.integers(440, min(n, 512) - 1))
        mem.write(pos, bytes([mem.read(pos, 1)[0] ^ data.draw(st.integers(1, 255))]))
    check_invariants(mem.parse(disk_size), disk_size, mem)


def test_mbr_entries_win_over_a_stale_bpb(tmp_path: Path) -> None:
    # GRUB keeps the BPB of whatever sector 0 held before; sane entries still make it an MBR.
    image = tmp_path / "fat.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["mkfs.vfat", str(image)], capture_output=True, check=True)
    sector = pread(image, 0, 446) + mbr_sector(mbr_entry(0x83, 2048, 4096))[446:]
    table = MemDisk(8 * MiB, {0: sector}).parse()
    assert table.scheme == "mbr" and layout(table) == [(1, MiB, 2 * MiB)]
    assert any("vfat boot sector" in w for w in table.warnings)


# --------------------------------------------------------------------------------------------
# The raw-data builders used by benchmarks


def test_sparse_and_random_disks(tmp_path: Path) -> None:
    m = images.sparse_disk(tmp_path / "sparse.img", 24, allocated_fraction=0.5, seed=3)
    assert 0 < len(m.allocated) < 24 and m.size == 24 * MiB
    digest = hashlib.sha256()
    for i in range(24):
        block = pread(m.path, i * MiB, MiB)
        assert block == (images.block_data(3, i) if i in m.allocated else bytes(MiB)), i
        digest.update(block)
    assert digest.hexdigest() == m.sha256
    # Holes really are holes: what SEEK_DATA reports is exactly the allocated blocks.
    found = {off // MiB + k for off, n in data_extents(m.path, 0, m.size) for k in range(n // MiB)}
    assert found == set(m.allocated)
    assert images.sparse_disk(tmp_path / "again.img", 24, seed=3).allocated == m.allocated

    r = images.random_disk(tmp_path / "random.img", 8, seed=1)
    data = pread(r.path, 0, r.size)
    assert hashlib.sha256(data).hexdigest() == r.sha256 and r.allocated == tuple(range(8))
    assert data[:MiB] != data[MiB : 2 * MiB]
    assert parse(lambda o, n: data[o : o + n], len(data)).partitions == ()


def test_detect_md_members_and_encrypted_volumes(tmp_path: Path) -> None:
    """md 1.2 members and LUKS2 volumes (images.guestvol_disk: our superblocks, cryptsetup's
    LUKS) are named as blkid names them, so that every mode can say what they are."""
    m = images.guestvol_disk(tmp_path / "g.img", "one", "two")
    table = parse_file(m.path)
    for p, expect in zip(table.partitions, m.partitions, strict=True):
        assert detect_filesystem(pread(m.path, p.start, FS_PROBE_SIZE)) == expect.fs
    assert [p.fs for p in m.partitions] == ["linux_raid_member"] * 2 + ["crypto_LUKS"] * 2
    # Metadata 1.1 keeps the superblock at the very start.
    md = pread(m.path, m.partitions[0].start + 4096, 512)
    assert detect_filesystem(md + bytes(FS_PROBE_SIZE - 512)) == "linux_raid_member"
    luks1 = tmp_path / "luks1.img"
    luks1.write_bytes(bytes(4 * MiB))
    subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks1", "--pbkdf-force-iterations",
                    "1000", "--key-file", "-", str(luks1)], input=b"k", check=True)  # fmt: skip
    assert detect_filesystem(pread(luks1, 0, FS_PROBE_SIZE)) == "crypto_LUKS"


def test_ldm_partitions_are_known(tmp_path: Path) -> None:
    dyn, _layout = images.ldm_disk(tmp_path / "ldm.img")
    table = parse_file(dyn.path)
    assert [(p.type_id, is_ldm(p)) for p in table.partitions] == [("0x42", True)]
    gpt = parse_file(images.gpt_disk(tmp_path / "gpt.img").path)
    assert not any(is_ldm(p) for p in gpt.partitions)
