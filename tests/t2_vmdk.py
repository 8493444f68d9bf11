"""The VMDK test bed of issue 24: chains written by tests/testbed/vmdk.py, read through the
stand-in VDDK's local-file mode, and (with IVDFS_TEST_VDDK) through VMware's own library.

What is held to account: every link of a chain reads back byte-exact against its raw image;
VIXDISKLIB_FLAG_OPEN_SINGLE_LINK opens one link (numLinks 1, its parentFileNameHint, only its
own grains, zeros elsewhere); QueryAllocatedBlocks lists the grains of that link alone, or of
all links merged and joined; the builder writes only the grains that changed; malformed files
fail with the codes real VDDK 7.0.2 gives (measured; tests/testbed/standin/README.md); nothing
is written next to the disk but the lock directories VDDK makes while a disk is open (as the
real library does; a read-only filesystem gets none), and a read-only filesystem is fine.

The libraries run in child processes (tests/testbed/vddkprobe.py): VDDK allows one InitEx per
process. The real-VDDK comparisons run only when IVDFS_TEST_VDDK names an unpacked VDDK (it is
proprietary: scripts/setup cannot install it); without it they are skipped, saying so.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mounting import read_only_view
from tests.testbed import vmdk
from tests.testbed.vddkprobe import (
    SINGLE_LINK,
    STANDIN_LIBRARY,
    Job,
    lock_files,
    probe,
    vmware_library,
)

MiB = 1 << 20
SECTOR = 512
GRAIN = vmdk.GRAIN_SECTORS * SECTOR
SIZE = 64 * MiB
CAPACITY = SIZE // SECTOR
STEM = "6b1c5e0d9a8f4c2b8e7d6a5f4e3d2c1b"  # ESXi names FCD files by 32 hex digits

REAL_VDDK = os.environ.get("IVDFS_TEST_VDDK", "")
real_vddk = pytest.mark.skipif(
    not REAL_VDDK,
    reason="real-VDDK comparison off: IVDFS_TEST_VDDK is unset (it names a VDDK unpacked from "
    "VMware's download, e.g. /opt/vddk-7.0.2; proprietary, so scripts/setup cannot install it)",
)


@pytest.fixture(scope="session")
def standin(built_testbed: None) -> Path:
    return STANDIN_LIBRARY


def _sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def _runs(
    grains: Sequence[int], chunk: int, start: int = 0, n: int = CAPACITY
) -> list[tuple[int, int]]:
    """The chunk-aligned runs QueryAllocatedBlocks gives for these grains, joined."""
    gs = vmdk.GRAIN_SECTORS
    chunks = sorted({
        c
        for g in grains
        for c in range(g * gs // chunk, ((g + 1) * gs - 1) // chunk + 1)
        if start <= c * chunk < start + n
    })  # fmt: skip
    out: list[tuple[int, int]] = []
    for c in chunks:
        if out and out[-1][0] + out[-1][1] == c * chunk:
            out[-1] = (out[-1][0], out[-1][1] + chunk)
        else:
            out.append((c * chunk, chunk))
    return out


# --- a chain of four links ----------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    images: list[Path]  # raw image of each link, base first
    links: list[vmdk.Link]
    layout: str

    def top(self, k: int) -> str:
        return str(self.links[k].descriptor)


def _make_images(folder: Path, seed: int) -> list[Path]:
    """A 64 MiB disk and three successors. The base has scattered 4 KiB writes, an 8 MiB run
    and the last grain, and holes everywhere else; each successor changes some grains, and
    between them: a grain zeroed that held data, a grain rewritten with the bytes it had (no
    change), a single byte changed, and the last sector of the disk."""
    rng = random.Random(seed)
    data = bytearray(SIZE)
    for _ in range(200):
        off = rng.randrange(SIZE // 4096) * 4096
        data[off : off + 4096] = rng.randbytes(4096)
    data[16 * MiB : 24 * MiB] = rng.randbytes(8 * MiB)
    data[SIZE - GRAIN :] = rng.randbytes(GRAIN)
    paths = []
    for k in range(4):
        if k:
            for _ in range(25):
                off = rng.randrange(SIZE // 4096) * 4096
                data[off : off + 4096] = rng.randbytes(4096)
        if k == 1:
            data[16 * MiB : 16 * MiB + GRAIN] = bytes(GRAIN)  # zeroed: must still be written
            data[17 * MiB : 17 * MiB + GRAIN] = bytes(data[17 * MiB : 17 * MiB + GRAIN])
        if k == 2:
            data[20 * MiB + 12345] ^= 0xFF
        if k == 3:
            data[SIZE - SECTOR :] = rng.randbytes(SECTOR)
        p = folder / f"image{k}.raw"
        p.write_bytes(data)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _make_images(tmp_path_factory.mktemp("images"), seed=24)


@pytest.fixture(scope="module", params=["sparse", "flat"])
def chain(
    request: pytest.FixtureRequest, images: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Chain:
    folder = tmp_path_factory.mktemp(f"ds-{request.param}") / "fcd"
    names = vmdk.fcd_file_names(STEM, len(images))
    links = vmdk.write_chain(folder, names, images, layout=request.param, seed=7)
    return Chain(images, links, request.param)


def _grains_that_differ(image: Path, previous: Path | None) -> list[int]:
    """Independently of the builder: grain numbers whose bytes differ (from zeros for None)."""
    a = image.read_bytes()
    b = previous.read_bytes() if previous else bytes(len(a))
    return [
        g
        for g in range(len(a) // GRAIN)
        if a[g * GRAIN : (g + 1) * GRAIN] != b[g * GRAIN : (g + 1) * GRAIN]
    ]


def _single_link_bytes(chain: Chain, k: int) -> bytes:
    """What link k alone holds: its grains of its image, zeros elsewhere (a flat base holds
    everything)."""
    image = chain.images[k].read_bytes()
    if k == 0 and chain.layout == "flat":
        return image
    out = bytearray(len(image))
    for g in chain.links[k].grains:
        out[g * GRAIN : (g + 1) * GRAIN] = image[g * GRAIN : (g + 1) * GRAIN]
    return bytes(out)


QUERIES = ((0, CAPACITY, 128), (0, CAPACITY, 2048), (16 * 2048, 48 * 2048, 256))


READS = ((CAPACITY - 1, 1), (CAPACITY, 1), (0, 4096))  # the last sector, past the end, 2 MiB


def _jobs(chain: Chain) -> list[Job]:
    return [
        Job(chain.top(k), flags=flags, queries=QUERIES, reads=READS)
        for k in range(len(chain.links))
        for flags in (0, SINGLE_LINK)
    ]


def test_the_builder_writes_only_the_grains_that_changed(chain: Chain) -> None:
    names = [link.descriptor.name for link in chain.links]
    assert names == [f"{STEM}.vmdk"] + [f"{STEM}-{k:06d}.vmdk" for k in (1, 2, 3)]
    for k, link in enumerate(chain.links):
        assert list(link.grains) == _grains_that_differ(
            chain.images[k], chain.images[k - 1] if k else None
        )
        if k:
            assert link.parent_cid == chain.links[k - 1].cid != link.cid
            text = link.descriptor.read_bytes()[SECTOR : 21 * SECTOR]
            assert f'parentFileNameHint="{names[k - 1]}"'.encode() in text
            assert f"parentCID={chain.links[k - 1].cid:08x}".encode() in text
    # The deltas are real: few grains per child, the zeroed and the one-byte grain among them,
    # the unchanged rewrite not.
    assert all(20 <= len(link.grains) <= 27 for link in chain.links[1:])  # of 1024 grains
    assert 16 * MiB // GRAIN in chain.links[1].grains
    assert 17 * MiB // GRAIN not in chain.links[1].grains
    assert (20 * MiB + 12345) // GRAIN in chain.links[2].grains
    # A sparse link's file holds its metadata (a grain here) and its grains, no more: holes
    # and unchanged grains take no room.
    for link in chain.links[1 if chain.layout == "flat" else 0 :]:
        assert link.descriptor.stat().st_size == GRAIN + len(link.grains) * GRAIN
    if chain.layout == "flat":
        base = chain.links[0]
        assert base.create_type == "vmfs" and base.extents[0].name == f"{STEM}-flat.vmdk"
        assert base.extents[0].stat().st_blocks * 512 <= len(base.grains) * GRAIN  # holes kept
        assert (
            b'RW 131072 VMFS "' + base.extents[0].name.encode() + b'" 0'
            in base.descriptor.read_bytes()
        )


def test_standin_reads_every_link_byte_exact(standin: Path, chain: Chain) -> None:
    seen = probe(standin, _jobs(chain))
    for k in range(len(chain.links)):
        whole, single = seen[2 * k], seen[2 * k + 1]
        image = chain.images[k].read_bytes()
        assert (whole.open_error, whole.capacity, whole.num_links) == (0, CAPACITY, k + 1)
        assert whole.parent_hint is None  # a whole chain: its base's hint, i.e. none
        assert whole.sha256 == _sha(image)
        assert whole.reads == [
            (0, _sha(image[-SECTOR:])),
            (16007, None),
            (0, _sha(image[: 2 * MiB])),
        ]
        # One link: numLinks 1, the link's own hint, its grains and zeros elsewhere.
        assert (single.open_error, single.capacity, single.num_links) == (0, CAPACITY, 1)
        assert single.parent_hint == (chain.links[k - 1].descriptor.name if k else None)
        assert single.sha256 == _sha(_single_link_bytes(chain, k))
        # QueryAllocatedBlocks: the link's own grains, or every link's; a flat extent counts
        # as allocated throughout (measured), holes or not.
        whole_disk = list(range(CAPACITY // vmdk.GRAIN_SECTORS))
        flat_base = chain.layout == "flat"
        own = whole_disk if k == 0 and flat_base else list(chain.links[k].grains)
        every = sorted({g for link in chain.links[: k + 1] for g in link.grains})
        every = whole_disk if flat_base else every
        for q, (start, n, chunk) in enumerate(QUERIES):
            assert single.queries[q] == (0, _runs(own, chunk, start, n)), (k, q)
            assert whole.queries[q] == (0, _runs(every, chunk, start, n)), (k, q)


@real_vddk
def test_vmwares_library_reads_the_builders_chains_as_the_standin_does(
    standin: Path, chain: Chain
) -> None:
    jobs = _jobs(chain)
    real = probe(vmware_library(Path(REAL_VDDK)), jobs)
    assert real == probe(standin, jobs)
    assert real[-2].sha256 == _sha(chain.images[-1].read_bytes())


def test_a_zero_image_makes_a_chain_of_empty_links(standin: Path, tmp_path: Path) -> None:
    zero = tmp_path / "zero.raw"
    zero.write_bytes(bytes(4 * MiB))
    links = vmdk.write_chain(tmp_path / "fcd", ["z.vmdk", "z-000001.vmdk"], [zero, zero])
    assert [link.grains for link in links] == [(), ()]
    seen = probe(standin, [Job(str(links[1].descriptor), queries=((0, 8192, 128),))])
    assert seen[0].sha256 == _sha(bytes(4 * MiB)) and seen[0].queries == [(0, [])]


def test_a_256_mib_disk_with_small_and_large_grains(standin: Path, tmp_path: Path) -> None:
    """The sizes the later mount tests use; grain sizes VMware allows other than 64 KiB."""
    rng = random.Random(3)
    base, top = tmp_path / "base.raw", tmp_path / "top.raw"
    with base.open("wb") as f:
        f.truncate(256 * MiB)
        for _ in range(64):
            f.seek(rng.randrange(256 * MiB // 4096) * 4096)
            f.write(rng.randbytes(4096))
    shutil.copyfile(base, top)
    with top.open("r+b") as f:
        f.seek(255 * MiB)
        f.write(rng.randbytes(MiB))
    for grain in (8, 2048):
        names = ["d.vmdk", "d-000001.vmdk"]
        links = vmdk.write_chain(tmp_path / f"g{grain}", names, [base, top], grain_sectors=grain)
        top_link = str(links[1].descriptor)
        query = ((0, 256 * 2048, 2048),)
        seen = probe(
            standin,
            [Job(top_link), Job(top_link, flags=SINGLE_LINK, digest=False, queries=query)],
        )
        assert seen[0].sha256 == _sha(top.read_bytes())
        assert seen[1].queries == [(0, [(255 * 2048, 2048)])]


# --- malformed files ----------------------------------------------------------------------


def _small_chain(folder: Path) -> list[vmdk.Link]:
    """An 8 MiB base with a few grains and a child changing a few more."""
    rng = random.Random(9)
    base = bytearray(8 * MiB)
    for g in (0, 3, 17, 100):
        base[g * GRAIN : (g + 1) * GRAIN] = rng.randbytes(GRAIN)
    child = bytearray(base)
    for g in (3, 5, 127):
        child[g * GRAIN : (g + 1) * GRAIN] = rng.randbytes(GRAIN)
    (folder / "base.raw").write_bytes(base)
    (folder / "child.raw").write_bytes(child)
    return vmdk.write_chain(folder, ["d.vmdk", "d-000001.vmdk"],
                            [folder / "base.raw", folder / "child.raw"], seed=3)  # fmt: skip


def _header(path: Path, offset: int, fmt: str, value: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _descriptor(path: Path, old: bytes, new: bytes) -> None:
    """Edit the descriptor embedded in a sparse file (sectors 1-20): `old` is a regex."""
    data = bytearray(path.read_bytes())
    text = bytes(data[SECTOR : 21 * SECTOR]).rstrip(b"\0")
    assert re.search(old, text), (old, text)
    data[SECTOR : 21 * SECTOR] = re.sub(old, new, text).ljust(20 * SECTOR, b"\0")
    path.write_bytes(data)


def _gte(path: Path, grain: int, value: int) -> None:
    with path.open("r+b") as f:
        gd = struct.unpack("<Q", f.read(64)[56:64])[0]
        f.seek(gd * SECTOR)
        gt = struct.unpack("<I", f.read(4))[0]
        f.seek(gt * SECTOR + 4 * grain)
        f.write(struct.pack("<I", value))


@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Path], Path]  # damages the chain in a folder, returns the file to open
    whole: int  # Open's error for the whole chain, stand-in and VMware's VDDK 7.0.2
    single: int  # ... with SINGLE_LINK
    read: int = 0  # the whole-disk read's error after a successful Open
    real_differs: bool = False  # VDDK 7.0.2 accepts it; the stand-in refuses (stricter)


def on_child(edit: Callable[[Path], object]) -> Callable[[Path], Path]:
    def damage(d: Path) -> Path:
        edit(d / "d-000001.vmdk")
        return d / "d-000001.vmdk"

    return damage


def on_folder(
    edit: Callable[[Path], object], opened: str = "d-000001.vmdk"
) -> Callable[[Path], Path]:
    def damage(d: Path) -> Path:
        edit(d)
        return d / opened

    return damage


def text_base(extent: str, create: str = "vmfs") -> Callable[[Path], Path]:
    """A text descriptor t.vmdk over a 1 MiB flat.bin."""

    def damage(d: Path) -> Path:
        (d / "flat.bin").write_bytes(random.Random(1).randbytes(MiB))
        (d / "t.vmdk").write_text(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
            f'createType="{create}"\n{extent}\n'
        )
        return d / "t.vmdk"

    return damage


def _truncate_last_grain(p: Path) -> None:
    os.truncate(p, p.stat().st_size - GRAIN + SECTOR)


CASES = [
    Case("intact", on_child(lambda p: None), 0, 0),
    Case("parent missing", on_folder(lambda d: (d / "d.vmdk").unlink()), 16012, 0),
    Case("parent is junk", on_folder(lambda d: (d / "d.vmdk").write_text("junk\n")), 16012, 0),
    Case("parentCID is not the parent's CID",
         on_child(lambda p: _descriptor(p, rb"parentCID=\w+", b"parentCID=12345678")), 16008, 0),
    Case("child of another capacity",
         on_child(lambda p: _descriptor(p, b"RW 16384 ", b"RW 16256 ")), 16067, 0),
    Case("link names itself as parent",
         on_child(lambda p: _descriptor(p, b'"d.vmdk"', b'"d-000001.vmdk"')), 16063, 0),
    Case("bad magic", on_child(lambda p: _header(p, 0, "<I", 0x574D444B)), 16063, 16063),
    Case("truncated header", on_child(lambda p: os.truncate(p, 300)), 16063, 16063),
    Case("empty file", on_child(lambda p: os.truncate(p, 0)), 16063, 16063),
    Case("raw bytes named .vmdk",
         on_folder(lambda d: shutil.copyfile(d / "base.raw", d / "r.vmdk"), "r.vmdk"),
         16063, 16063),
    Case("text that is no descriptor",
         on_folder(lambda d: (d / "j.vmdk").write_text("hello\n"), "j.vmdk"), 16063, 16063),
    Case("unclean shutdown", on_child(lambda p: _header(p, 72, "<B", 1)), 16006, 16006),
    Case("grain of 96 sectors", on_child(lambda p: _header(p, 20, "<Q", 96)), 16006, 16006),
    Case("sparse version 4", on_child(lambda p: _header(p, 4, "<I", 4)), 16011, 16011),
    Case("grain directory past the end", on_child(lambda p: _header(p, 56, "<Q", 10**6)), 1, 1),
    Case("grain past the end", on_child(_truncate_last_grain), 0, 0, read=1),
    Case("unknown createType",
         on_child(lambda p: _descriptor(p, b"monolithicSparse", b"fooSparse")), 16063, 16063),
    Case("a key given twice",
         on_child(lambda p: _descriptor(p, b"version=1", b"version=1\nversion=1")), 16063, 16063),
    Case("a line that is neither setting nor extent",
         on_child(lambda p: _descriptor(p, b"version=1", b"version=1\nthis is junk")),
         16063, 16063),
    Case("missing flat extent", text_base('RW 2048 VMFS "nofile.bin"'), 4, 4),
    Case("flat extent longer than its file", text_base('RW 4096 VMFS "flat.bin" 0'), 16063, 16063),
    Case("monolithicSparse in a text descriptor",
         text_base('RW 2048 FLAT "flat.bin" 0', "monolithicSparse"), 16063, 16063),
    Case("FLAT extent without its offset", text_base('RW 2048 FLAT "flat.bin"'), 16063, 16063),
    Case("createType vmfsThin", text_base('RW 2048 VMFS "flat.bin"', "vmfsThin"), 16063, 16063),
    Case("NOACCESS extent", text_base('NOACCESS 2048 FLAT "flat.bin" 0'), 0, 0, read=13),
    # Laxer in VDDK 7.0.2 than in the specification; the stand-in takes the stricter reading.
    Case("extent size 2x48", text_base('RW 2x48 FLAT "flat.bin" 0'), 16063, 16063,
         real_differs=True),
    Case("extent size 0", text_base('RW 0 FLAT "flat.bin" 0'), 16063, 16063, real_differs=True),
    Case("sparse version 0", on_child(lambda p: _header(p, 4, "<I", 0)), 16011, 16011,
         real_differs=True),
    Case("256 entries per grain table", on_child(lambda p: _header(p, 44, "<I", 256)), 16063, 16063,
         real_differs=True),
]  # fmt: skip


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Case, str]]:
    out = []
    for i, case in enumerate(CASES):
        d = tmp_path_factory.mktemp(f"case{i}")
        _small_chain(d)
        out.append((case, str(case.damage(d))))
    return out


def _case_jobs(damaged: list[tuple[Case, str]]) -> list[Job]:
    # 2048 sectors: inside every disk here (the text descriptors hold 1 MiB).
    return [
        Job(path, flags=f, queries=((0, 2048, 128),))
        for _, path in damaged
        for f in (0, SINGLE_LINK)
    ]


def test_malformed_files_fail_cleanly_with_vddks_codes(
    standin: Path, damaged: list[tuple[Case, str]], tmp_path: Path
) -> None:
    log = tmp_path / "standin.log"
    seen = probe(standin, _case_jobs(damaged), env={"VDDK_STANDIN_LOG": str(log)})
    got = {
        case.name: (whole.open_error, single.open_error, whole.read_error)
        for (case, _), whole, single in zip(damaged, seen[0::2], seen[1::2], strict=True)
    }
    assert got == {c.name: (c.whole, c.single, c.read) for c in CASES}
    assert "VIOLATION" not in log.read_text()


def test_a_zeroed_grain_hides_its_parent_and_is_not_listed(standin: Path, tmp_path: Path) -> None:
    """A grain table entry of 1: VDDK 7.0.2 reads zeros (not the parent's grain) and
    QueryAllocatedBlocks leaves it out, with or without the header's zeroed-grain flag."""
    links = _small_chain(tmp_path)
    _gte(links[1].descriptor, 3, 1)  # grain 3: in the child, and in the base
    child = bytearray((tmp_path / "child.raw").read_bytes())
    child[3 * GRAIN : 4 * GRAIN] = bytes(GRAIN)
    top, query = str(links[1].descriptor), ((0, 16384, 128),)
    seen = probe(standin, [Job(top, queries=query), Job(top, flags=SINGLE_LINK, queries=query)])
    assert seen[0].sha256 == _sha(child)
    assert seen[0].queries == [(0, _runs([0, 3, 5, 17, 100, 127], 128, 0, 16384))]  # base's grain 3
    assert seen[1].queries == [(0, _runs([5, 127], 128, 0, 16384))]


@real_vddk
def test_vmwares_library_fails_the_malformed_files_as_the_standin_does(
    standin: Path, damaged: list[tuple[Case, str]]
) -> None:
    jobs = _case_jobs(damaged)
    real, ours = probe(vmware_library(Path(REAL_VDDK)), jobs), probe(standin, jobs)
    for (case, _), r, s in zip(
        ((c, p) for c, p in damaged for _ in (0, 1)), real, ours, strict=True
    ):
        if case.real_differs:
            assert r.open_error == 0 or r == s, case.name  # the stand-in is the stricter one
        else:
            assert r == s, case.name


# --- nothing written ----------------------------------------------------------------------


def _listing(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(folder.rglob("*"))
    }


def _locks_of(chain: Chain, k: int) -> list[str]:
    """What VDDK leaves beside the links of the chain up to link k while it is open: one lock
    directory per link's descriptor (a flat base's extent gets none), one member in each."""
    return sorted(f"{link.descriptor.name}.lck/M*.lck" for link in chain.links[: k + 1])


def test_the_standin_locks_every_link_while_open_as_vddk_does(
    standin: Path, chain: Chain, tmp_path: Path
) -> None:
    """Real VDDK 7.0.2 makes <link>.lck/M<n>.lck beside every link it opens, read-only or not,
    and removes them at Close: on a writable directory the stand-in does too."""
    folder = chain.links[0].descriptor.parent
    before = _listing(folder)
    top = chain.top(len(chain.links) - 1)
    seen = probe(standin, [Job(top, queries=QUERIES[:1], locks=True),
                           Job(top, flags=SINGLE_LINK, locks=True)])  # fmt: skip
    assert seen[0].sha256 == _sha(chain.images[-1].read_bytes())
    assert seen[0].locks == _locks_of(chain, len(chain.links) - 1)
    assert seen[1].locks == [f"{chain.links[-1].descriptor.name}.lck/M*.lck"]
    assert _listing(folder) == before  # gone at Close; no disk file touched


def test_a_killed_reader_leaves_its_locks_and_the_next_one_clears_them(
    standin: Path, chain: Chain
) -> None:
    folder = chain.links[0].descriptor.parent
    before = _listing(folder)
    top = chain.top(1)
    seen = probe(standin, [Job(top, digest=False, abandon=True)])
    assert seen[0].open_error == 0
    assert lock_files(folder) == _locks_of(chain, 1)  # left behind by the dead process
    seen = probe(standin, [Job(top, digest=False, locks=True)])
    assert seen[0].locks == _locks_of(chain, 1)  # the dead process's members were removed
    assert _listing(folder) == before


def test_the_standin_writes_nothing_on_a_read_only_filesystem(
    standin: Path, chain: Chain, tmp_path: Path
) -> None:
    folder = chain.links[0].descriptor.parent
    before = _listing(folder)
    with read_only_view(folder, tmp_path / "ro") as ro:
        seen = probe(standin, [Job(str(ro / chain.links[-1].descriptor.name), locks=True)])
        assert seen[0].sha256 == _sha(chain.images[-1].read_bytes())
        assert seen[0].locks == []
    assert _listing(folder) == before


@real_vddk
def test_vmwares_library_locks_and_clears_as_the_standin_does(standin: Path, chain: Chain) -> None:
    folder = chain.links[0].descriptor.parent
    before = _listing(folder)
    real_lib = vmware_library(Path(REAL_VDDK))
    top = chain.top(len(chain.links) - 1)
    jobs = [Job(top, digest=False, locks=True), Job(top, flags=SINGLE_LINK, locks=True)]
    real = probe(real_lib, jobs)
    assert real == probe(standin, jobs)
    assert real[0].locks == _locks_of(chain, len(chain.links) - 1)
    assert _listing(folder) == before
    # Killed with the disk open: the locks stay, and the next opener clears them.
    probe(real_lib, [Job(chain.top(1), digest=False, abandon=True)])
    assert lock_files(folder) == _locks_of(chain, 1)
    assert probe(real_lib, [Job(chain.top(1), digest=False, locks=True)])[0].locks == (
        _locks_of(chain, 1)
    )
    assert _listing(folder) == before


@real_vddk
def test_vmwares_library_reads_a_chain_on_a_read_only_filesystem(
    standin: Path, chain: Chain, tmp_path: Path
) -> None:
    """Real VDDK makes <file>.lck directories next to a disk it opens, read-only or not; on a
    read-only filesystem it cannot, and falls back to an implicit shared lock."""
    folder = chain.links[0].descriptor.parent
    before = _listing(folder)
    with read_only_view(folder, tmp_path / "ro") as ro:
        top = str(ro / chain.links[-1].descriptor.name)
        jobs = [Job(top, queries=QUERIES[:1], locks=True), Job(top, flags=SINGLE_LINK)]
        real = probe(vmware_library(Path(REAL_VDDK)), jobs)
        assert real == probe(standin, jobs)
        assert real[0].sha256 == _sha(chain.images[-1].read_bytes())
        assert real[0].locks == []
    assert _listing(folder) == before


def test_a_raw_file_is_still_served_raw_in_local_mode(standin: Path, tmp_path: Path) -> None:
    """The stand-in's own convenience (real VDDK refuses anything but a VMDK with 16063)."""
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(b"x" * 4096)
    seen = probe(standin, [Job(str(raw), queries=((0, 16384, 128),))])
    assert (seen[0].capacity, seen[0].num_links, seen[0].parent_hint) == (16384, 1, None)
    assert seen[0].sha256 == _sha(raw.read_bytes())
    assert seen[0].queries == [(0, [(3 * 2048, 128)])]
