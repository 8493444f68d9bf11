"""Unit tests of ivdfs.formats' LVM parsers (lvm_text, lvm_disk, lvm_map) against disks laid
out by lvm2 itself, and against hostile bytes.

Role: check `scan` against what ``lvs --segments`` and ``pvs`` reported for images built by the
real tools (tests/testbed/images.py: PVs on a partition, on the whole disk, two PVs with a
striped LV and metadata that wrapped around its circular buffer, damaged metadata), check that
the bytes of each LV read through its extents are the filesystem image written there, check
the stripe arithmetic against a byte-by-byte model, and hammer the text parser and the on-disk
structures (hypothesis) to show that nothing read ever raises, reads outside its window or
yields an extent outside its PV.

Images are built once per module (about 6 s; loop devices, root).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivdfs.formats.filesystems import FS_PROBE_SIZE, detect_filesystem
from ivdfs.formats.lvm_disk import LABEL_SCAN_BYTES, label_sector, lvm_crc
from ivdfs.formats.lvm_map import Extent, LogicalVolume, LvmScan, scan
from ivdfs.formats.lvm_text import MAX_DEPTH, ConfigError, parse_config
from tests.mounting import host_vgs
from tests.testbed import images

MiB = 1 << 20
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@dataclass
class Built:
    part: images.DiskManifest
    whole: images.DiskManifest
    striped: images.DiskManifest
    one_copy: images.DiskManifest
    all_copies: images.DiskManifest


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    before = host_vgs()
    d = tmp_path_factory.mktemp("lvm")
    b = Built(
        part=images.lvm_disk(d / "part.img", "partition"),
        whole=images.lvm_disk(d / "whole.img", "whole"),
        striped=images.lvm_striped_disk(d / "striped.img"),
        one_copy=images.corrupt_lvm_disk(d / "one.img", "one-copy"),
        all_copies=images.corrupt_lvm_disk(d / "all.img", "all-copies"),
    )
    yield b
    # The builders' lvm2 ran in a sandbox: nothing of theirs may be left for the host.
    assert host_vgs() == before
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True)
    assert str(d) not in losetup.stdout


class FileDisk:
    """A reader over an image file that records every read and refuses any outside it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        assert 0 <= offset and length > 0 and offset + length <= self.size, (offset, length)
        self.reads.append((offset, length))
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), length, offset)


def windows_of(m: images.DiskManifest) -> list[tuple[int, int]]:
    """What the tree passes: every partition, or the whole disk when there is no table."""
    return [(p.start, p.length) for p in m.partitions] or [(0, m.size)]


def scan_image(m: images.DiskManifest) -> tuple[LvmScan, FileDisk]:
    disk = FileDisk(m.path)
    return scan(disk.read, windows_of(m)), disk


def lv_bytes(path: Path, lv: LogicalVolume, step: int = 3 * MiB + 4096) -> bytes:
    """The LV read through `pieces`, in odd-sized requests that straddle chunks and segments."""
    out = bytearray()
    with open(path, "rb") as f:
        for off in range(0, lv.size, step):
            for disk, n in lv.pieces(off, step):
                out += os.pread(f.fileno(), n, disk)
    return bytes(out)


def assert_matches_lvs(result: LvmScan, m: images.DiskManifest) -> None:
    """Every LV as lvs/pvs placed it: same size, segments, stripes and chunk size."""
    got = {(v.vg, v.name): v for v in result.volumes}
    assert set(got) == {(lv.vg, lv.name) for lv in m.lvs}
    for lv in m.lvs:
        v = got[(lv.vg, lv.name)]
        assert v.size == lv.size, lv.name
        if any(s.segtype not in ("linear", "striped") for s in lv.segments):
            assert not v.supported and v.extents == ()
            assert lv.segments[0].segtype in v.reason
            continue
        assert v.supported and v.reason == "", v.reason
        assert len(v.extents) == len(lv.segments)
        for e, s in zip(v.extents, lv.segments, strict=True):
            assert (e.lv_offset, e.length, e.stripes) == (s.lv_offset, s.length, s.stripes)
            assert e.stripe_size == (s.stripe_size if len(s.stripes) > 1 else s.length)


# --------------------------------------------------------------------------------------------
# Real images


@pytest.mark.parametrize("which", ["part", "whole", "striped"])
def test_extents_match_lvs_and_pvs(built: Built, which: str) -> None:
    m = getattr(built, which)
    result, disk = scan_image(m)
    assert result.warnings == ()
    assert_matches_lvs(result, m)
    assert [(p.start, p.length) for p in result.physical_volumes] == list(m.pvs)
    assert {p.vg for p in result.physical_volumes} == {lv.vg for lv in m.lvs}
    # Bounded: the label sectors of each window, then per PV one header and the text.
    assert len(disk.reads) <= len(windows_of(m)) + 3 * len(m.pvs)


@pytest.mark.parametrize("which", ["part", "whole", "striped"])
def test_lv_bytes_are_the_filesystem_written_there(built: Built, which: str) -> None:
    m = getattr(built, which)
    result, _ = scan_image(m)
    for lv in m.lvs:
        if not lv.sha256:
            continue
        v = next(v for v in result.volumes if v.name == lv.name)
        data = lv_bytes(m.path, v)
        assert len(data) == lv.size
        assert hashlib.sha256(data).hexdigest() == lv.sha256, lv.name
        assert detect_filesystem(data[:FS_PROBE_SIZE]) == lv.fs


def test_two_segments_and_striping_are_real(built: Built) -> None:
    data = next(lv for lv in built.part.lvs if lv.name == "data")
    assert len(data.segments) == 2 and data.fs == "xfs"
    # The second segment is not where the first one ends: logs lies between them.
    first, second = data.segments
    assert second.stripes[0] != first.stripes[0] + first.length
    st_lv = next(lv for lv in built.striped.lvs if lv.name == "st")
    assert st_lv.segments[0].segtype == "striped" and len(st_lv.segments[0].stripes) == 2


def test_wrapped_metadata_is_read(built: Built) -> None:
    # lvm2 was made to rewrite its metadata until the committed copy wrapped (pvck says so).
    assert all(md.wrapped for md in built.striped.metadata)
    result, _ = scan_image(built.striped)
    assert result.warnings == () and len(result.volumes) == 3


def test_partitions_beside_the_pv_are_ignored(built: Built) -> None:
    result, _ = scan_image(built.part)
    assert len(result.physical_volumes) == 1
    assert result.physical_volumes[0].start == built.part.partitions[1].start


def test_one_damaged_copy_costs_a_warning_and_nothing_else(built: Built) -> None:
    result, _ = scan_image(built.one_copy)
    assert_matches_lvs(result, built.one_copy)
    assert len(result.warnings) == 1
    assert "metadata text CRC mismatch" in result.warnings[0]
    assert f"disk offset {built.one_copy.pvs[0][0]}" in result.warnings[0]


def test_all_copies_damaged_lists_no_lv_and_warns(built: Built) -> None:
    result, _ = scan_image(built.all_copies)
    assert result.volumes == ()
    assert len(result.physical_volumes) == 2
    assert all(p.vg == "" for p in result.physical_volumes)
    assert len(result.warnings) == 2
    assert all("CRC mismatch" in w for w in result.warnings)


def test_pv_missing_from_this_disk_makes_its_lvs_unsupported(built: Built) -> None:
    m = built.striped
    result = scan(FileDisk(m.path).read, [m.pvs[0]])  # as if PV 2 were on another disk
    by_name = {v.name: v for v in result.volumes}
    assert not by_name["st"].supported and "is not on this disk" in by_name["st"].reason
    # lin lies wholly on PV 1: still readable.
    assert by_name["lin"].supported
    lin = next(lv for lv in m.lvs if lv.name == "lin")
    assert hashlib.sha256(lv_bytes(m.path, by_name["lin"])).hexdigest() == lin.sha256


def test_names_map_to_device_mapper_style() -> None:
    lv = LogicalVolume("vg-a", "lv-b", 0, (), False, "x")
    assert lv.dm_name == "vg--a-lv--b"
    assert LogicalVolume("ivdvg", "data", 0, (), True).dm_name == "ivdvg-data"


# --------------------------------------------------------------------------------------------
# Stripe arithmetic against a byte model


@FUZZ
@given(
    n=st.integers(1, 5),
    chunk_sectors=st.sampled_from([1, 2, 8]),
    rows=st.integers(1, 6),
    requests=st.lists(st.tuples(st.integers(-100, 40000), st.integers(0, 9000)), max_size=8),
)
def test_striped_pieces_match_a_byte_model(
    n: int, chunk_sectors: int, rows: int, requests: list[tuple[int, int]]
) -> None:
    chunk = chunk_sectors * 512
    per_stripe = rows * chunk
    # Two segments: a striped one and a linear tail, areas spread apart on a small disk.
    stripes = tuple(1000 + i * (per_stripe + 333) for i in range(n))
    tail_at = stripes[-1] + per_stripe + 77
    seg1 = Extent(0, n * per_stripe, stripes, chunk)
    seg2 = Extent(n * per_stripe, 1500, (tail_at,), 1500)
    lv = LogicalVolume("vg", "lv", seg1.length + seg2.length, (seg1, seg2), True)
    # The model: LV byte i lives where dm-stripe puts it, computed one byte at a time.
    where = []
    for i in range(seg1.length):
        c, within = divmod(i, chunk)
        where.append(stripes[c % n] + (c // n) * chunk + within)
    where += [tail_at + i for i in range(seg2.length)]
    for off, length in requests:
        got = [d + k for d, run in lv.pieces(off, length) for k in range(run)]
        lo, hi = max(off, 0), min(off + length, lv.size)
        assert got == (where[lo:hi] if off >= 0 else [])
        pieces = lv.pieces(off, length)
        # Merged: no two consecutive pieces are contiguous on the disk.
        assert all(a[0] + a[1] != b[0] for a, b in itertools.pairwise(pieces))


# --------------------------------------------------------------------------------------------
# The text parser

SAMPLE = """\
# Generated by LVM2
contents = "Text Format Volume Group"
version = 1
description = "a \\"quoted\\" word and a back\\\\slash"

vg1 {
\tid = "754Qz3-dNmz-iGFt-NOuS-a2wP-B4Uv-TGtwcc"
\tseqno = 3
\tstatus = ["RESIZEABLE", "READ", "WRITE"]
\tflags = []
\textent_size = 2048\t\t# 1024 Kilobytes
\tratio = 0.5
\tphysical_volumes {
\t\tpv0 {
\t\t\tid = "1YFOsb-lk1c-u8C8-HZb1-NTFm-JCm7-cdfxcn"
\t\t\tpe_start = 2048
\t\t}
\t}
\t1odd-name.x+y {
\t\tstripes = [
\t\t\t"pv0", 0,
\t\t\t"pv1", -1
\t\t]
\t}
}
"""


def test_parse_config_sample() -> None:
    tree = parse_config(SAMPLE)
    assert tree["contents"] == "Text Format Volume Group"
    assert tree["description"] == 'a "quoted" word and a back\\slash'
    vg = tree["vg1"]
    assert isinstance(vg, dict)
    assert vg["seqno"] == 3 and vg["extent_size"] == 2048 and vg["ratio"] == 0.5
    assert vg["status"] == ["RESIZEABLE", "READ", "WRITE"] and vg["flags"] == []
    assert vg["physical_volumes"] == {
        "pv0": {"id": "1YFOsb-lk1c-u8C8-HZb1-NTFm-JCm7-cdfxcn", "pe_start": 2048}
    }
    assert vg["1odd-name.x+y"] == {"stripes": ["pv0", 0, "pv1", -1]}


@pytest.mark.parametrize(
    "text",
    [
        "a = ",
        "a = [1, 2",
        "a = [1 2]",
        "a = [[1]]",
        "a { b = 1",
        "}",
        'a = "unterminated',
        "a b",
        "= 1",
        "a = 12abc",
        "a = " + "9" * 5000,
        "a " + "{ a " * (MAX_DEPTH + 2) + "}" * (MAX_DEPTH + 2),
    ],
)
def test_parse_config_refuses_broken_text(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(text)


def test_parse_config_keeps_the_first_of_repeated_names() -> None:
    assert parse_config("a = 1\na = 2\n") == {"a": 1}


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("ab01 ={}[],\"#\\\n.-'")), max_size=300))
def test_parse_config_random_text_only_raises_config_error(text: str) -> None:
    try:
        parse_config(text)
    except ConfigError:
        pass


# --------------------------------------------------------------------------------------------
# Hostile on-disk structures (synthetic PVs with valid CRCs, so the checks behind them run)

PV_UUID = b"AbCdEfGhIjKlMnOpQrStUvWxYz012345"
MDA_START, MDA_SIZE = 4096, 65536
PE_START = 1 * MiB


def metadata_text(extra_lv: str = "", stripes: str = '"pv0", 0', extents: int = 4) -> str:
    dashed = "-".join(
        PV_UUID[a:b].decode() for a, b in ((0, 6), (6, 10), (10, 14), (14, 18), (18, 22),
                                            (22, 26), (26, 32))
    )  # fmt: skip
    return f"""vg {{
id = "vgid"
seqno = 1
extent_size = 8192
physical_volumes {{
pv0 {{
id = "{dashed}"
pe_start = {PE_START // 512}
pe_count = 16
}}
}}
logical_volumes {{
lv {{
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 1
segment1 {{
start_extent = 0
extent_count = {extents}
type = "striped"
stripe_count = 1
stripes = [{stripes}]
}}
}}
{extra_lv}
}}
}}
"""


def synthetic_pv(text: bytes, text_offset: int = 512, size: int = 24 * MiB) -> bytearray:
    """A PV as lvm2 lays it out: label in sector 1, one metadata area at 4 KiB."""
    disk = bytearray(PE_START)
    hdr = PV_UUID + struct.pack("<Q", size)
    hdr += struct.pack("<QQQQ", PE_START, 0, 0, 0) + struct.pack("<QQQQ", MDA_START, MDA_SIZE, 0, 0)
    label = bytearray(512)
    label[0:8] = b"LABELONE"
    struct.pack_into("<QII", label, 8, 1, 0, 32)
    label[24:32] = b"LVM2 001"
    label[32 : 32 + len(hdr)] = hdr
    struct.pack_into("<I", label, 16, lvm_crc(bytes(label[20:])))
    disk[512:1024] = label
    mda = bytearray(512)
    mda[4:20] = b" LVM2 x[5A%r0N*>"
    struct.pack_into("<IQQ", mda, 20, 1, MDA_START, MDA_SIZE)
    struct.pack_into("<QQII", mda, 40, text_offset, len(text), lvm_crc(text), 0)
    struct.pack_into("<I", mda, 0, lvm_crc(bytes(mda[4:])))
    disk[MDA_START : MDA_START + 512] = mda
    first = min(len(text), MDA_SIZE - text_offset)
    at = MDA_START + text_offset
    disk[at : at + first] = text[:first]
    rest = text[first:]
    disk[MDA_START + 512 : MDA_START + 512 + len(rest)] = rest
    return disk


class MemDisk:
    """Sparse bytes in memory: `data` at offset 0, zeros up to `size`; reads are checked."""

    def __init__(self, data: bytes | bytearray, size: int) -> None:
        self.data = bytes(data)
        self.size = size
        self.reads = 0

    def read(self, offset: int, length: int) -> bytes:
        assert 0 <= offset and length > 0 and offset + length <= self.size, (offset, length)
        self.reads += 1
        return self.data[offset : offset + length].ljust(min(length, self.size - offset), b"\0")


def check_scan(disk: MemDisk, windows: list[tuple[int, int]]) -> LvmScan:
    result = scan(disk.read, windows)
    assert disk.reads <= len(windows) * (1 + 3 * 2)
    for v in result.volumes:
        assert v.supported == (v.reason == "")
        if not v.supported:
            assert v.extents == ()
            continue
        pos = 0
        for e in v.extents:
            assert e.lv_offset == pos and e.length > 0
            pos += e.length
            per_stripe = e.length // len(e.stripes)
            for s in e.stripes:
                assert any(w <= s and s + per_stripe <= w + n for w, n in windows), (s, windows)
        assert pos == v.size
    return result


def test_synthetic_pv_reads_like_a_real_one() -> None:
    text = metadata_text().encode()
    result = check_scan(MemDisk(synthetic_pv(text), 24 * MiB), [(0, 24 * MiB)])
    assert result.warnings == ()
    (lv,) = result.volumes
    assert lv.supported and lv.extents == (Extent(0, 16 * MiB, (PE_START,), 16 * MiB),)
    # Wrapped around the end of the area: the same answer.
    wrapped = synthetic_pv(text, text_offset=MDA_SIZE - 100)
    assert check_scan(MemDisk(wrapped, 24 * MiB), [(0, 24 * MiB)]).volumes == result.volumes
    assert label_sector(bytes(synthetic_pv(text)[:LABEL_SCAN_BYTES])) == 1


@pytest.mark.parametrize(
    ("extra", "stripes", "extents", "reason"),
    [
        ("", '"pv0", 14', 4, "past the end of its PV's extents"),
        ("", '"pv9", 0', 4, "unknown PV"),
        ("", '"pv0", 0, "pv0", 4', 4, "stripe_count and stripes disagree"),
        ("", '"other", 0', 4, "mapped onto LV"),
        ('other { status = ["VISIBLE"] }', '"pv0", 0', 4, ""),
    ],
)
def test_bad_segments_are_unsupported_with_a_reason(
    extra: str, stripes: str, extents: int, reason: str
) -> None:
    extra = extra or 'other { status = ["READ"] }'  # a hidden LV: a name to map onto
    text = metadata_text(extra, stripes, extents).encode()
    result = check_scan(MemDisk(synthetic_pv(text), 24 * MiB), [(0, 24 * MiB)])
    lv = next(v for v in result.volumes if v.name == "lv")
    if reason:
        assert not lv.supported and reason in lv.reason, lv.reason
    else:
        # "other" is visible but has no segments: listed as unsupported, lv itself is fine.
        assert lv.supported
        other = next(v for v in result.volumes if v.name == "other")
        assert not other.supported and other.reason == "it has no segments"


def test_window_smaller_than_the_pv_cuts_its_extents() -> None:
    text = metadata_text().encode()
    result = check_scan(MemDisk(synthetic_pv(text), 24 * MiB), [(0, 8 * MiB)])
    (lv,) = result.volumes
    assert not lv.supported and "past the end of its PV's window" in lv.reason


def test_hostile_names_are_not_listed() -> None:
    text = metadata_text().replace("lv {", "../../etc {", 1)
    result = check_scan(MemDisk(synthetic_pv(text.encode()), 24 * MiB), [(0, 24 * MiB)])
    assert result.volumes == ()
    assert any("not a valid LVM name" in w for w in result.warnings)


@FUZZ
@given(data=st.data())
def test_mutated_metadata_text_with_valid_crc(data: st.DataObject) -> None:
    text = bytearray(metadata_text().encode())
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        pos = data.draw(st.integers(0, len(text) - 1))
        if op == "flip":
            text[pos] = data.draw(st.sampled_from(b'{}[]=,"#\\\n 0123456789-pvxa'))
        elif op == "delete":
            del text[pos : pos + data.draw(st.integers(1, 40))]
        else:
            text[pos:pos] = data.draw(st.binary(max_size=20))
        if not text:
            text = bytearray(b"x")
    check_scan(MemDisk(synthetic_pv(bytes(text)), 24 * MiB), [(0, 24 * MiB)])


@FUZZ
@given(
    field=st.sampled_from(["label", "pv_header", "mda_header"]),
    offset=st.integers(0, 511),
    value=st.binary(min_size=1, max_size=8),
    window=st.sampled_from([(0, 24 * MiB), (0, 4096), (0, 600), (512, 24 * MiB - 512)]),
)
def test_header_edits_with_valid_crcs(
    field: str, offset: int, value: bytes, window: tuple[int, int]
) -> None:
    disk = synthetic_pv(metadata_text().encode())
    base = {"label": 512, "pv_header": 512, "mda_header": MDA_START}[field]
    if field == "pv_header":
        offset = 32 + offset % 160
    disk[base + offset : base + offset + len(value)] = value[: 512 - offset]
    # Recompute the CRCs, so the parser must survive the edited fields themselves.
    struct.pack_into("<I", disk, 512 + 16, lvm_crc(bytes(disk[512 + 20 : 1024])))
    struct.pack_into("<I", disk, MDA_START, lvm_crc(bytes(disk[MDA_START + 4 : MDA_START + 512])))
    check_scan(MemDisk(disk, 24 * MiB), [window])


@FUZZ
@given(data=st.binary(max_size=LABEL_SCAN_BYTES + 600), size=st.integers(0, 8192))
def test_random_bytes_never_break_scan(data: bytes, size: int) -> None:
    buf = bytearray(data)
    if len(buf) > 520:
        buf[512:520] = b"LABELONE"  # steer into the label checks
    size = max(size, 1)
    check_scan(MemDisk(buf, size), [(0, size), (-5, 10), (size // 2, size - size // 2)])


@FUZZ
@given(data=st.data())
def test_mutated_real_pv(built: Built, data: st.DataObject) -> None:
    """Random edits of the real striped disk's first PV (label, header and wrapped text)."""
    m = built.striped
    start, length = m.pvs[0]
    with open(m.path, "rb") as f:
        head = bytearray(os.pread(f.fileno(), 40960, start))
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(head) - 1))
        head[pos] = data.draw(st.integers(0, 255))
    check_scan(MemDisk(head, length), [(0, length)])
