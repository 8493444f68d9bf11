"""Direct datastore access, below VDDK (issue 24): where a vSphere path lies under DIR, and the
identity of a snapshot's VMDK chain (ivdfs.datastore), on chains that tests/testbed/vmdk.py
writes as ESXi names an FCD's files.

What is held to account: the recorded chain is the one VDDK reads (same links, CIDs and
capacity as the stand-in's GetInfo); a rewrite as consolidation does it (a new file renamed
over a link), an in-place write (even with the mtime put back), and a removal are all seen;
nothing of a chain may lie outside DIR; concurrent readers share checks and never pass one that
began before their read ended.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from ivdfs.datastore.access import DirectAccess, NotDirect, check_directory
from ivdfs.datastore.identity import (
    ChainChanged,
    ChainIdentity,
    ChainRegistry,
    ChainUnusable,
    ChainWatch,
    check_chain,
    read_fresh,
    record_chain,
)
from ivdfs.datastore.paths import NotOnDatastore, datastore_file, split_datastore_path
from ivdfs.errors import UserError
from ivdfs.settings import parse_datastore_path
from tests.mounting import read_only_view
from tests.testbed import vmdk
from tests.testbed.vddkprobe import SINGLE_LINK, STANDIN_LIBRARY, Job, probe

MiB = 1 << 20
STEM = "6b1c5e0d9a8f4c2b8e7d6a5f4e3d2c1b"


def images(folder: Path, count: int, seed: int, size: int = 4 * MiB) -> list[Path]:
    rng = random.Random(seed)
    data = bytearray(size)
    out = []
    for k in range(count):
        for _ in range(5):
            g = rng.randrange(size // 65536)
            data[g * 65536 : (g + 1) * 65536] = rng.randbytes(65536)
        out.append(folder / f"img{k}.raw")
        out[-1].write_bytes(data)
    return out


def chain(tmp_path: Path, layout: vmdk.Layout = "sparse", links: int = 3) -> list[vmdk.Link]:
    root = tmp_path / "ds"
    return vmdk.write_chain(
        root / "fcd", vmdk.fcd_file_names(STEM, links), images(tmp_path, links, 7),
        layout=layout, seed=11,
    )  # fmt: skip


# --- paths ---------------------------------------------------------------------------------


def test_a_datastore_path_maps_under_its_directory(tmp_path: Path) -> None:
    root = (tmp_path / "ds").resolve()
    (root / "fcd").mkdir(parents=True)
    assert split_datastore_path("[NFS 1] fcd/x.vmdk") == ("NFS 1", Path("fcd/x.vmdk"))
    assert datastore_file(root, "NFS 1", "[NFS 1] fcd/x.vmdk") == root / "fcd" / "x.vmdk"
    assert datastore_file(root, "ds", "[ds]fcd/x.vmdk") == root / "fcd" / "x.vmdk"
    for path, reason in [
        ("[other] fcd/x.vmdk", "on datastore other"),
        ("[ds] fcd/../../etc/passwd", "leaves the datastore"),
        ("[ds] /etc/passwd", "leaves the datastore"),
        ("fcd/x.vmdk", "not a datastore path"),
        ("[ds] ", "not a datastore path"),
        ("[] fcd/x.vmdk", "not a datastore path"),
    ]:
        with pytest.raises(NotOnDatastore, match=reason):
            datastore_file(root, "ds", path)


def test_symbolic_links_may_not_lead_out_of_the_directory(tmp_path: Path) -> None:
    root = (tmp_path / "ds").resolve()
    (root / "fcd").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "out").symlink_to(tmp_path / "outside")
    (root / "fcd" / "up.vmdk").symlink_to("../../outside/x.vmdk")
    (root / "alias").symlink_to("fcd")
    for path in ("[ds] out/x.vmdk", "[ds] fcd/up.vmdk"):
        with pytest.raises(NotOnDatastore, match="leads out of"):
            datastore_file(root, "ds", path)
    # A link that stays inside is followed, and the caller gets the real folder.
    assert datastore_file(root, "ds", "[ds] alias/x.vmdk") == root / "fcd" / "x.vmdk"


# --- recording ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sparse", "flat"])
def test_the_recorded_chain_is_the_one_vddk_reads(
    tmp_path: Path, built_testbed: None, layout: vmdk.Layout
) -> None:
    links = chain(tmp_path, layout)
    root = (tmp_path / "ds").resolve()
    top = links[-1].descriptor
    ident = record_chain(top, root)
    assert [link.descriptor for link in ident.links] == [str(x.descriptor) for x in links[::-1]]
    assert [(link.cid, link.parent_cid) for link in ident.links] == [
        (x.cid, x.parent_cid) for x in links[::-1]
    ]
    assert [[f.path for f in link.files] for link in ident.links] == [
        [str(x.descriptor), *(str(e) for e in x.extents if e != x.descriptor)] for x in links[::-1]
    ]
    seen = probe(STANDIN_LIBRARY, [Job(str(top), digest=False)])[0]
    assert (seen.num_links, seen.capacity) == (len(ident.links), ident.links[0].capacity)
    single = record_chain(top, root, single_link=True)
    assert single.links == ident.links[:1]
    seen = probe(STANDIN_LIBRARY, [Job(str(top), flags=SINGLE_LINK, digest=False)])[0]
    assert seen.num_links == 1
    # Recording again finds the same chain; the registry keeps the first.
    registry = ChainRegistry()
    assert registry.admit(ident) is ident
    again = record_chain(top, root)
    assert again == ident and registry.admit(again) is ident and len(registry) == 1


def test_read_fresh_reads_exact_bytes_at_any_offset(tmp_path: Path) -> None:
    f = tmp_path / "f"
    data = os.urandom(3 * 4096 + 100)
    f.write_bytes(data)
    for off, n in [(0, 10), (4000, 200), (4096, 4096), (12000, 1000), (20000, 5)]:
        got, ident = read_fresh(str(f), off, n)
        assert got == data[off : off + n]
        assert (ident.size, ident.ino) == (len(data), f.stat().st_ino)


# --- changes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sparse", "flat"])
def test_a_link_rewritten_as_consolidation_would_is_a_change(
    tmp_path: Path, layout: vmdk.Layout
) -> None:
    """Deleting the snapshot of link 1 merges link 2's grains into it: ESXi writes the link
    anew. The test bed writes it under a temporary name and renames it over the old one."""
    links = chain(tmp_path, layout)
    root = (tmp_path / "ds").resolve()
    ident = record_chain(links[-1].descriptor, root)
    check_chain(ident)
    imgs = images(tmp_path, 3, 7)
    vmdk.write_chain(
        root / "fcd", vmdk.fcd_file_names(STEM, 2), [imgs[0], imgs[2]], layout=layout, seed=11
    )
    with pytest.raises(ChainChanged) as e:
        check_chain(ident)
    # The first file checked that changed: the top link stays, the next one was written anew.
    assert e.value.path == str(links[1].descriptor) and e.value.what == "inode"
    registry = ChainRegistry()
    registry.admit(ident)
    with pytest.raises(ChainChanged):
        registry.admit(record_chain(links[-1].descriptor, root))


def test_an_in_place_write_is_a_change_even_with_the_mtime_put_back(tmp_path: Path) -> None:
    links = chain(tmp_path, "flat")
    root = (tmp_path / "ds").resolve()
    ident = record_chain(links[-1].descriptor, root)
    flat = links[0].extents[0]
    st = flat.stat()
    with open(flat, "r+b") as f:
        f.write(b"consolidated")
    with pytest.raises(ChainChanged, match="mtime"):
        check_chain(ident)
    os.utime(flat, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ChainChanged, match="ctime") as e:
        check_chain(ident)
    assert e.value.path == str(flat)


def test_a_removed_link_is_a_change(tmp_path: Path) -> None:
    links = chain(tmp_path)
    ident = record_chain(links[-1].descriptor, (tmp_path / "ds").resolve())
    links[1].descriptor.unlink()
    with pytest.raises(ChainChanged) as e:
        check_chain(ident)
    assert (e.value.path, e.value.what) == (str(links[1].descriptor), "removed")


def test_a_symlink_put_in_a_files_place_is_a_change(tmp_path: Path) -> None:
    links = chain(tmp_path)
    ident = record_chain(links[-1].descriptor, (tmp_path / "ds").resolve())
    keep = tmp_path / "moved.vmdk"
    os.rename(links[0].descriptor, keep)
    links[0].descriptor.symlink_to(keep)
    with pytest.raises(ChainChanged, match="no longer a regular file"):
        check_chain(ident)


# --- what is not read directly ----------------------------------------------------------------


def _descriptor(folder: Path, name: str, *, cid: int, parent: str | None = None,
                parent_cid: int = 0xFFFFFFFF, extent: str) -> Path:  # fmt: skip
    lines = [f"CID={cid:08x}", f"parentCID={parent_cid:08x}", 'createType="vmfs"']
    if parent is not None:
        lines.append(f'parentFileNameHint="{parent}"')
    lines.append(extent)
    p = folder / name
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("raw", "not a VMDK descriptor"),
        ("parent-outside", "leads out of"),
        ("parent-absolute", "leads out of"),
        ("extent-outside", "leads out of"),
        ("loop", "its own ancestor"),
        ("cid", "is not the CID"),
        ("rdm", "VMFSRDM extent"),
        ("fifo", "not a regular file"),
        ("missing-parent", "parent of"),
        ("missing-extent", "No such file"),
    ],
)
def test_chains_that_are_not_read_directly(tmp_path: Path, case: str, reason: str) -> None:
    root = (tmp_path / "ds").resolve()
    fcd = root / "fcd"
    fcd.mkdir(parents=True)
    (fcd / "x-flat.vmdk").write_bytes(bytes(MiB))
    outside = tmp_path / "outside.vmdk"
    _descriptor(tmp_path, "outside.vmdk", cid=1, extent='RW 2048 VMFS "ds/fcd/x-flat.vmdk"')
    flat = 'RW 2048 VMFS "x-flat.vmdk"'
    top = fcd / "top.vmdk"
    if case == "raw":
        top.write_bytes(os.urandom(8192))
    elif case == "parent-outside":
        _descriptor(fcd, "top.vmdk", cid=2, parent="../../outside.vmdk", parent_cid=1, extent=flat)
    elif case == "parent-absolute":
        _descriptor(fcd, "top.vmdk", cid=2, parent=str(outside), parent_cid=1, extent=flat)
    elif case == "extent-outside":
        _descriptor(fcd, "top.vmdk", cid=2, extent='RW 2048 VMFS "/etc/passwd"')
    elif case == "loop":
        _descriptor(fcd, "top.vmdk", cid=2, parent="top.vmdk", parent_cid=2, extent=flat)
    elif case == "cid":
        _descriptor(fcd, "base.vmdk", cid=1, extent=flat)
        _descriptor(fcd, "top.vmdk", cid=2, parent="base.vmdk", parent_cid=3, extent=flat)
    elif case == "rdm":
        _descriptor(fcd, "top.vmdk", cid=2, extent='RW 2048 VMFSRDM "x-rdm.vmdk"')
    elif case == "fifo":
        os.mkfifo(fcd / "x-fifo.vmdk")
        _descriptor(fcd, "top.vmdk", cid=2, extent='RW 2048 VMFS "x-fifo.vmdk"')
    elif case == "missing-parent":
        _descriptor(fcd, "top.vmdk", cid=2, parent="gone.vmdk", parent_cid=1, extent=flat)
    elif case == "missing-extent":
        _descriptor(fcd, "top.vmdk", cid=2, extent='RW 2048 VMFS "gone-flat.vmdk"')
    with pytest.raises(ChainUnusable, match=reason):
        record_chain(top, root)


def test_a_missing_top_link_is_file_not_found(tmp_path: Path) -> None:
    root = (tmp_path / "ds").resolve()
    root.mkdir()
    with pytest.raises(FileNotFoundError):
        record_chain(root / "gone.vmdk", root)


# --- shared checks -----------------------------------------------------------------------------


class GatedCheck:
    """A check that blocks until released, counting its runs and failing on demand."""

    def __init__(self) -> None:
        self.runs = 0
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.fail: Exception | None = None

    def __call__(self, identity: ChainIdentity) -> None:
        self.runs += 1
        self.started.release()
        assert self.release.acquire(timeout=30), "never released"
        if self.fail is not None:
            raise self.fail


def test_concurrent_reads_share_checks_that_began_after_them(tmp_path: Path) -> None:
    import time

    links = chain(tmp_path, links=1)
    gate = GatedCheck()
    watch = ChainWatch(record_chain(links[0].descriptor, (tmp_path / "ds").resolve()), gate)
    errors: list[BaseException] = []

    def confirm(ended: int) -> None:
        try:
            watch.confirm(ended)
        except BaseException as e:
            errors.append(e)

    first = threading.Thread(target=confirm, args=(time.monotonic_ns(),))
    first.start()
    assert gate.started.acquire(timeout=30)  # check 1 runs
    # Three reads end while check 1 runs: check 1 began before them, so it cannot confirm them.
    late = [threading.Thread(target=confirm, args=(time.monotonic_ns(),)) for _ in range(3)]
    for t in late:
        t.start()
    gate.release.release()
    first.join(timeout=30)
    assert gate.started.acquire(timeout=30)  # one check 2 for all three
    gate.release.release()
    for t in late:
        t.join(timeout=30)
    assert errors == [] and gate.runs == 2 and watch.checks == 2
    # A read that ended before the last check began needs no new one.
    watch.confirm(time.monotonic_ns() - 10**12)
    assert gate.runs == 2

    gate.fail = ChainChanged("x.vmdk", "inode")
    t = threading.Thread(target=confirm, args=(time.monotonic_ns(),))
    t.start()
    assert gate.started.acquire(timeout=30)
    gate.release.release()
    t.join(timeout=30)
    assert isinstance(errors[-1], ChainChanged)
    with pytest.raises(ChainChanged):  # final: no further check is run
        watch.confirm(0)
    assert gate.runs == 3 and watch.changed is errors[-1]


# --- --datastore-path DIR and what is read directly ----------------------------------------------


def test_a_datastore_directory_must_be_a_read_only_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "ds").mkdir()
    for directory, message in [
        (tmp_path / "gone", "No such file or directory"),
        (tmp_path / "file", "not a directory"),
        (tmp_path / "ds", "is on a writable mount, and VDDK would write lock files there: "
                          "mount it read-only"),
    ]:  # fmt: skip
        with pytest.raises(UserError, match=message) as e:
            check_directory("DS1", directory)
        assert e.value.exit_code == 3 and "\n" not in str(e.value)
        assert str(e.value).startswith(f"--datastore-path DS1={directory}")
    with read_only_view(tmp_path / "ds", tmp_path / "ro") as ro:
        assert check_directory("DS1", ro) == ro.resolve()
    assert parse_datastore_path("DS 1=/mnt/ds1") == ("DS 1", Path("/mnt/ds1"))
    assert parse_datastore_path("a=b=/mnt/x=y") == ("a=b", Path("/mnt/x=y"))
    for bad in ("DS1", "=/mnt", "DS1="):
        with pytest.raises(ValueError, match="use NAME=DIR"):
            parse_datastore_path(bad)
    with pytest.raises(ValueError, match="DIR must be an absolute path"):
        parse_datastore_path("DS1=relative/dir")


def test_what_is_read_directly_and_why_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    links = chain(tmp_path)
    root = (tmp_path / "ds").resolve()
    access = DirectAccess({"DS1": root, "datastore-2": root})
    top = f"[DS1] fcd/{links[-1].descriptor.name}"
    got = access.locate("DS1", "datastore-1", top)
    assert (got.file, got.root, got.identity.links[0].cid) == (links[-1].descriptor, root,
                                                                links[-1].cid)  # fmt: skip
    assert access.root_for("other", "datastore-2") == root  # by moref
    assert access.locate("DS1", "datastore-1", top).identity is got.identity  # admitted once
    for ds, moref, path, reason in [
        ("DS9", "datastore-9", "[DS9] fcd/x.vmdk", "no --datastore-path"),
        ("DS1", "datastore-1", "[vsanDatastore] 52a1/x.vmdk", "on datastore vsanDatastore"),
        ("DS1", "datastore-1", "[DS1] fcd/gone.vmdk", "no "),
        ("DS1", "datastore-1", "[DS1] fcd/../../x.vmdk", "leaves the datastore"),
    ]:
        with pytest.raises(NotDirect, match=reason):
            access.locate(ds, moref, path)
    (links[0].descriptor).write_bytes(b"garbage")
    with pytest.raises(NotDirect, match="not a VMDK descriptor"):
        access.locate("DS1", "datastore-1", f"[DS1] fcd/{links[0].descriptor.name}")
    with caplog.at_level("INFO", logger="ivdfs.datastore.access"):
        for _ in range(3):
            access.fallback("DS9", "no --datastore-path")
        access.fallback("DS9", "another reason")
    assert [r.getMessage() for r in caplog.records] == [
        "datastore DS9: reading over the network: no --datastore-path",
        "datastore DS9: reading over the network: another reason",
    ]
