"""What changed between snapshots: <snapshot>/changes/<older>.json and .raw, and `ivdfs changes`.

The module's own vcsim computes changed block tracking from the stand-in VDDK's images (the
launcher is told where they are), so it starts with the images directory given; the conftest's
vcsim starts before there is one. Three snapshots of a tracked IVD carry known edits (writes
inside a block and across a block boundary, a region grown into a hole, a punched hole, the last
sector, a one-byte change); the expected extents come from a block-by-block comparison of the
images here, at the launcher's 64 KiB granularity, independent of ivdfs and of the launcher.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ivdfs.inventory.changes import merge
from ivdfs.tree.nodes import SparseSpan
from tests.mounting import Bed, Mount, call_lines, check_standin_lines, is_warning, wait_for
from tests.t4_check import check, step
from tests.t4_cli import cli, fails, ok
from tests.testbed.vsphere import Ivd, Vcsim, place_image

MiB = 1 << 20
BLOCK = 64 << 10  # the launcher's CBT granularity (Vcsim cbt_block)
CAP = 8 * MiB


@dataclass(frozen=True)
class History:
    ivd: Ivd
    snaps: tuple[str, ...]  # oldest first
    images: dict[str, bytes]  # snapshot id -> its disk
    change_ids: dict[str, str]


def block_extents(old: bytes, new: bytes) -> list[tuple[int, int]]:
    """Blocks whose bytes differ, adjacent ones joined: what CBT must report here."""
    out: list[tuple[int, int]] = []
    for off in range(0, len(new), BLOCK):
        if old[off : off + BLOCK] != new[off : off + BLOCK]:
            if out and sum(out[-1]) == off:
                out[-1] = (out[-1][0], out[-1][1] + BLOCK)
            else:
                out.append((off, BLOCK))
    return out


def delta_view(new: bytes, extents: list[tuple[int, int]]) -> bytes:
    view = bytearray(len(new))
    for s, n in extents:
        view[s : s + n] = new[s : s + n]
    return bytes(view)


def data_extents(path: Path) -> list[tuple[int, int]]:
    """Allocated extents of a file, by SEEK_DATA/SEEK_HOLE."""
    out = []
    with open(path, "rb") as f:
        fd, end, off = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while off < end:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, stop - start))
            off = stop
    return out


def nonzero_extents(data: bytes, granule: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off in range(0, len(data), granule):
        if data[off : off + granule].count(0) != len(data[off : off + granule]):
            if out and sum(out[-1]) == off:
                out[-1] = (out[-1][0], out[-1][1] + granule)
            else:
                out.append((off, granule))
    return out


def edits() -> list[bytes]:
    """Three disks: A, then B and C with known edits."""
    rng = random.Random(14)
    a = bytearray(CAP)
    a[: 3 * MiB] = rng.randbytes(3 * MiB)
    a[5 * MiB : 6 * MiB] = rng.randbytes(MiB)
    b = bytearray(a)
    b[100:110] = rng.randbytes(10)  # inside block 0
    b[3 * BLOCK - 7 : 3 * BLOCK + 13] = rng.randbytes(20)  # across blocks 2 and 3
    b[3 * MiB : 4 * MiB] = rng.randbytes(MiB)  # grown into what was a hole
    b[5 * MiB + 2 * BLOCK : 5 * MiB + 5 * BLOCK] = bytes(3 * BLOCK)  # a hole punched
    b[CAP - 512 :] = rng.randbytes(512)  # the last sector
    c = bytearray(b)
    c[MiB + 5] ^= 0xFF  # one byte
    c[5 * MiB + 2 * BLOCK : 5 * MiB + 3 * BLOCK] = rng.randbytes(BLOCK)  # part of the hole refilled
    c[7 * MiB : 7 * MiB + 100] = rng.randbytes(100)
    return [bytes(a), bytes(b), bytes(c)]


def make_history(
    v: Vcsim, images: Path, name: str, disks: list[bytes], *, cbt: str = "on"
) -> History:
    """An IVD with one snapshot per disk. `cbt`: "on" before the first snapshot; "never";
    "off-after" (on for the snapshots, off since); "restarted" (off and on again between
    the first and the second snapshot: the first one's change id is stale)."""
    capacity = len(disks[0]) // MiB
    ivd = v.create_ivd(name, capacity, "LocalDS_0")
    if cbt != "never":
        v.set_cbt(ivd, True)
    snaps = []
    src = images.parent / "src"
    src.mkdir(exist_ok=True)
    for i, data in enumerate(disks):
        if cbt == "restarted" and i == 1:
            v.set_cbt(ivd, False)
            v.set_cbt(ivd, True)
        snap = v.create_snapshot(ivd, f"{name} {i}")
        path = src / f"{snap}.raw"
        path.write_bytes(data)
        place_image(images, ivd, snap, path)
        snaps.append(snap)
    if cbt == "off-after":
        v.set_cbt(ivd, False)
    change_ids = {s: v.snapshot_details(ivd, s)[1] for s in snaps}
    return History(ivd, tuple(snaps), dict(zip(snaps, disks, strict=True)), change_ids)


@pytest.fixture(scope="module")
def bed(built_testbed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    root = tmp_path_factory.mktemp("changes")
    (root / "images").mkdir()
    # 2 MiB per QueryChangedDiskAreas answer: a query of an 8 MiB disk takes four, as a large
    # disk takes many of vCenter's, and the areas of every one of them must be kept.
    with Vcsim(images_dir=root / "images", cbt_max_span=2 << 20) as v:
        yield Bed(v, root)


@pytest.fixture(scope="module")
def tracked(bed: Bed) -> History:
    return make_history(bed.vcsim, bed.images, "tracked", edits())


@pytest.fixture(scope="module")
def refused(bed: Bed) -> dict[str, History]:
    rng = random.Random(7)
    out = {}
    for how in ("never", "off-after", "restarted"):
        disks = [rng.randbytes(MiB), rng.randbytes(MiB)]
        out[how] = make_history(bed.vcsim, bed.images, f"cbt-{how}", disks, cbt=how)
    return out


def changes_dir(mountpoint: Path, h: History, snap: str) -> Path:
    return mountpoint / h.ivd.datastore_name / h.ivd.id / snap / "changes"


PAIRS = [(0, 1), (1, 2), (0, 2)]


def test_sparse_span_and_merge_against_a_byte_map() -> None:
    """The pure parts (no bed): pieces() covers exactly the asked range, disk bytes where an
    extent is and zeros elsewhere; merge() joins what touches or overlaps."""
    rng = random.Random(5)
    for _ in range(300):
        size = rng.randrange(1, 4000)
        raw = [
            (rng.randrange(0, size + 50), rng.randrange(0, 300)) for _ in range(rng.randrange(6))
        ]
        extents = merge(raw)
        covered = bytearray(size + 400)
        for s, n in raw:
            covered[s : s + n] = b"\x01" * n
        assert extents == merge(extents)
        assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(extents))
        assert bytes(covered) == bytes(
            1 if any(s <= i < s + n for s, n in extents) else 0 for i in range(len(covered))
        )
        span = SparseSpan(size, extents)
        assert span.allocated == sum(covered[:size])
        off, length = rng.randrange(0, size + 10), rng.randrange(0, size + 10)
        pieces = span.pieces(off, length)
        assert sum(n for _, n in pieces) == max(0, min(off + length, size) - off)
        assert all(n > 0 for _, n in pieces)
        pos = off
        for disk_off, n in pieces:
            assert disk_off is None or disk_off == pos
            assert all(covered[i] == (disk_off is not None) for i in range(pos, pos + n))
            pos += n


def test_extents_match_a_block_comparison_of_the_images(
    bed: Bed, tracked: History, mountpoint: Path
) -> None:
    a, b, c = tracked.snaps
    assert all(tracked.change_ids.values())
    with Mount(bed, mountpoint):
        assert os.listdir(changes_dir(mountpoint, tracked, a)) == []
        assert sorted(os.listdir(changes_dir(mountpoint, tracked, b))) == [f"{a}.json", f"{a}.raw"]
        assert sorted(os.listdir(changes_dir(mountpoint, tracked, c))) == sorted(
            f"{s}.{ext}" for s in (a, b) for ext in ("json", "raw")
        )
        first = changes_dir(mountpoint, tracked, c) / f"{a}.json"
        assert first.stat().st_size == 0  # nothing asked before the first open
        for i, j in PAIRS:
            older, newer = tracked.snaps[i], tracked.snaps[j]
            expected = block_extents(tracked.images[older], tracked.images[newer])
            path = changes_dir(mountpoint, tracked, newer) / f"{older}.json"
            text = path.read_bytes()
            doc = json.loads(text)
            assert [(e["offset"], e["length"]) for e in doc["extents"]] == expected, (i, j)
            assert doc["extent_count"] == len(expected)
            assert doc["changed_bytes"] == sum(n for _, n in expected)
            assert doc["change_id"] == tracked.change_ids[older]
            assert doc["covered_bytes"] == CAP
            assert (doc["ivd"], doc["older_snapshot"], doc["snapshot"]) == (
                tracked.ivd.id, older, newer
            )  # fmt: skip
            assert "error" not in doc
            assert path.stat().st_size == len(text)
            if (i, j) == (0, 2):  # the command line says the same, byte for byte
                assert ok(cli(bed, "changes", "tracked", older, newer, "--json")).encode() == text
        # What the edits were: every kind shows, and the untouched data does not.
        ab = block_extents(tracked.images[a], tracked.images[b])
        assert ab[0] == (0, BLOCK) and (2 * BLOCK, 2 * BLOCK) in ab
        assert (3 * MiB, MiB) in ab and (5 * MiB + 2 * BLOCK, 3 * BLOCK) in ab
        assert ab[-1] == (CAP - BLOCK, BLOCK) and len(ab) == 5

    table = ok(cli(bed, "changes", tracked.ivd.id, a, b)).splitlines()
    assert table[0].split() == ["OFFSET", "LENGTH", "END"]
    assert [tuple(int(x) for x in ln.split()[:2]) for ln in table[1:-1]] == ab
    assert table[-1].startswith("5 extents, 1.4 MiB (1507328 bytes, 17.97 %) changed of 8 MiB")
    assert sum(n for _, n in ab) == 1507328
    assert table[-1].endswith(f'change id "{tracked.change_ids[a]}"')
    fails(cli(bed, "changes", "tracked", c, a), 2, "is not older than")


def read_ranges(lines: list[str]) -> list[tuple[int, int]]:
    return [
        (int(r["start"]) * 512, int(r["n"]) * 512)
        for fn in ("Read", "ReadAsync")
        for r in call_lines(lines, fn)
    ]


def test_raw_view_is_the_delta_byte_for_byte(
    bed: Bed, tracked: History, mountpoint: Path, tmp_path: Path
) -> None:
    a, _, c = tracked.snaps
    expected = block_extents(tracked.images[a], tracked.images[c])
    changed = sum(n for _, n in expected)
    view = delta_view(tracked.images[c], expected)
    # One cache block per CBT block and no read-ahead: every VDDK read must touch a change.
    with Mount(bed, mountpoint, "--block-size", "64K", "--prefetch", "0") as m:
        raw = changes_dir(mountpoint, tracked, c) / f"{a}.raw"
        st = raw.stat()
        assert st.st_size == CAP and st.st_blocks == CAP // 512  # an upper bound until known
        before = len(bed.log_lines())
        with open(raw, "rb") as f:
            assert os.fstat(f.fileno()).st_blocks == changed // 512
            # pyfuse3 has no lseek: the kernel takes the whole file for data.
            assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == CAP
            f.seek(0)
            assert f.read() == view
        assert raw.stat().st_blocks == changed // 512
        reads = read_ranges(bed.log_lines()[before:])
        assert reads
        for s, n in reads:
            assert any(s < e + k and e < s + n for e, k in expected), (s, n)

        # cp --sparse=always keeps only the changed extents (less what is zero in them: the
        # punched hole still reads as zeros in C, and cp makes holes of zeros).
        copy = tmp_path / "delta.raw"
        subprocess.run(["cp", "--sparse=always", str(raw), str(copy)], check=True)
        assert copy.read_bytes() == view
        granule = os.stat(copy).st_blksize
        assert data_extents(copy) == nonzero_extents(view, granule)
        assert m.unmount() == 0


@pytest.mark.allow_log(r"ERROR .*open: .*changes since snapshot")
def test_without_tracking_the_reason_is_given_never_no_changes(
    bed: Bed, refused: dict[str, History], mountpoint: Path
) -> None:
    reasons = {
        "never": "has no change id: changed block tracking was off when it was taken",
        "off-after": "changed block tracking is off for IVD cbt-off-after",
        "restarted": "vCenter refuses change id",
    }
    with Mount(bed, mountpoint) as m:
        for how, h in refused.items():
            older, newer = h.snaps
            d = changes_dir(mountpoint, h, newer)
            doc = json.loads((d / f"{older}.json").read_bytes())
            assert reasons[how] in doc["error"], doc
            assert "extents" not in doc and "changed_bytes" not in doc
            for _ in range(2):
                with pytest.raises(OSError) as e, open(d / f"{older}.raw", "rb"):
                    pass
                assert e.value.errno == errno.EIO
        assert m.unmount() == 0
    logged = [ln for ln in m.log().splitlines() if is_warning(ln)]
    assert len(logged) == len(refused), logged  # one line per pair, however often opened
    for how, h in refused.items():
        assert sum(h.snaps[0] in ln and reasons[how] in ln for ln in logged) == 1

    for how, h in refused.items():
        older, newer = h.snaps
        r = cli(bed, "changes", h.ivd.name, older, newer, *(["--json"] if how == "never" else []))
        fails(r, 12, reasons[how])
        if how == "never":
            assert reasons[how] in json.loads(r.stdout)["error"]
        else:
            assert r.stdout == ""


def test_check_names_a_vcenter(bed: Bed, tracked: History) -> None:
    r = check(bed)
    assert r.returncode == 0 and step(r, "login") == "ok", r.stdout + r.stderr
    login = next(ln for ln in r.stdout.splitlines() if ln.split()[1:2] == ["login"])
    assert "vCenter)" in login, login


@pytest.mark.allow_log(r"ERROR .*open: retrieving details of snapshot .*: cannot reach")
def test_listing_and_stat_ask_vcenter_nothing(built_testbed: None, tmp_path: Path) -> None:
    """With vCenter gone after the IVD was listed, its snapshot's changes/ still lists and
    stats (nothing is asked before an open); the first open fails with EIO, not a guess."""
    (tmp_path / "images").mkdir()
    with Vcsim(images_dir=tmp_path / "images") as v:
        own = Bed(v, tmp_path)
        rng = random.Random(3)
        h = make_history(v, own.images, "gone", [rng.randbytes(MiB), rng.randbytes(MiB)])
        older, newer = h.snaps
        with Mount(own, tmp_path / "mnt") as m:
            ivd_dir = m.mountpoint / h.ivd.datastore_name / h.ivd.id
            assert sorted(os.listdir(ivd_dir)) == sorted([*h.snaps, "info.json"])
            v.kill_server()
            d = ivd_dir / newer / "changes"
            assert sorted(os.listdir(d)) == [f"{older}.json", f"{older}.raw"]
            assert (d / f"{older}.json").stat().st_size == 0
            st = (d / f"{older}.raw").stat()
            assert (st.st_size, st.st_blocks) == (MiB, MiB // 512)
            with pytest.raises(OSError) as e:
                (d / f"{older}.json").read_bytes()
            assert e.value.errno == errno.EIO
            assert m.unmount() == 0
        check_standin_lines(own.log_lines())


def test_an_answer_is_kept_for_the_life_of_the_mount(built_testbed: None, tmp_path: Path) -> None:
    """Changed areas never change: once a pair was answered, its .json and .raw open and read
    the same with vCenter gone (no second query), and the .raw's data comes from the cache."""
    (tmp_path / "images").mkdir()
    with Vcsim(images_dir=tmp_path / "images") as v:
        own = Bed(v, tmp_path)
        rng = random.Random(4)
        first = rng.randbytes(MiB)
        second = bytearray(first)
        second[BLOCK : 2 * BLOCK] = rng.randbytes(BLOCK)
        h = make_history(v, own.images, "kept", [first, bytes(second)])
        older, newer = h.snaps
        expected = block_extents(h.images[older], h.images[newer])
        view = delta_view(h.images[newer], expected)
        with Mount(own, tmp_path / "mnt") as m:
            d = changes_dir(m.mountpoint, h, newer)
            doc = (d / f"{older}.json").read_bytes()
            assert [(e["offset"], e["length"]) for e in json.loads(doc)["extents"]] == expected
            assert (d / f"{older}.raw").read_bytes() == view
            v.kill_server()
            for _ in range(2):
                assert (d / f"{older}.json").read_bytes() == doc
                assert (d / f"{older}.raw").read_bytes() == view
            assert m.unmount() == 0
        check_standin_lines(own.log_lines())


def test_a_deleted_older_snapshot_leaves_changes(built_testbed: None, tmp_path: Path) -> None:
    """Once the IVD directory shows that an older snapshot was deleted, the newer snapshots'
    changes/ no longer offer a comparison with it."""
    (tmp_path / "images").mkdir()
    with Vcsim(images_dir=tmp_path / "images") as v:
        own = Bed(v, tmp_path)
        rng = random.Random(9)
        h = make_history(v, own.images, "pruned", [rng.randbytes(MiB) for _ in range(3)])
        a, b, c = h.snaps
        with Mount(own, tmp_path / "mnt", "--refresh", "0.2") as m:
            d = changes_dir(m.mountpoint, h, c)
            pair = [f"{b}.json", f"{b}.raw"]
            assert sorted(os.listdir(d)) == sorted([f"{a}.json", f"{a}.raw", *pair])
            v.delete_snapshot(h.ivd, a)
            ivd_dir = m.mountpoint / h.ivd.datastore_name / h.ivd.id
            wait_for(lambda: a not in os.listdir(ivd_dir), what="the deleted snapshot to go")
            # changes/ is listed again by its own --refresh, after its IVD directory.
            wait_for(lambda: sorted(os.listdir(d)) == pair, what="its comparison to go")
            assert m.unmount() == 0
