"""Tree and pyfuse3 Operations called directly, without a mount, over fake layers."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

import pyfuse3
import pytest
import trio

from ivdfs.fs.operations import Operations
from ivdfs.inventory.model import Datastore
from ivdfs.io.block_cache import BlockCache
from ivdfs.tree.tree import ROOT_INO, Tree, TreeSettings
from ivdfs.volumes.base import VolumeAnswer, VolumeRequest
from tests.fakes import FakeDisk, FakeDiskSource, FakeInventory, pattern

DS1 = Datastore("DS1", "datastore-1")
DS2 = Datastore("DS 2", "datastore-2")
CTX: Any = None
CAP = 3 * 1024 * 1024 + 4096


def build() -> tuple[Operations, FakeInventory, FakeDiskSource]:
    inv = FakeInventory()
    src = FakeDiskSource()
    inv.add(DS1, "ivd-a", CAP, ["snap-1", "snap-2"])
    inv.add(DS2, "ivd-b", CAP, [])
    for snap in ("snap-1", "snap-2"):
        src.disks[("ivd-a", snap)] = FakeDisk(pattern(CAP, snap))
    tree = Tree(inv, src, BlockCache(8 << 20), TreeSettings(block_size=1 << 20))
    return Operations(tree), inv, src


async def walk(ops: Operations, *names: str) -> pyfuse3.EntryAttributes:
    ino = ROOT_INO
    attr = None
    for name in names:
        attr = await ops.lookup(ino, name.encode(), CTX)
        ino = attr.st_ino
    assert attr is not None
    return attr


async def fuse_errno(coro: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro
    return info.value.errno


async def test_layout_attributes_and_bytes() -> None:
    ops, inv, src = build()
    root = ops.tree.root
    assert sorted(await ops.tree.children(root)) == ["DS 2", "DS1", "by-name"]
    assert sorted(await ops.tree.children(ops.tree.get((await walk(ops, "DS1")).st_ino))) == [
        "ivd-a"
    ]
    ivd_dir = await walk(ops, "DS1", "ivd-a")
    assert stat.S_IMODE(ivd_dir.st_mode) == 0o555 and stat.S_ISDIR(ivd_dir.st_mode)
    disk = await walk(ops, "DS1", "ivd-a", "snap-2", "disk.raw")
    assert stat.S_ISREG(disk.st_mode) and stat.S_IMODE(disk.st_mode) == 0o444
    assert disk.st_size == CAP
    snap = inv.snaps["ivd-a"][1]
    assert snap.create_time is not None
    assert disk.st_mtime_ns == int(snap.create_time.timestamp() * 1e9)
    fi = await ops.open(disk.st_ino, os.O_RDONLY, CTX)
    assert fi.keep_cache
    data = src.disks[("ivd-a", "snap-2")].data
    got = bytes(await ops.read(fi.fh, CAP - 5000, 10000))
    assert got == data[CAP - 5000 :]
    assert bytes(await ops.read(fi.fh, 12345, 131072)) == data[12345 : 12345 + 131072]
    # An IVD without snapshots is an empty directory.
    empty = await walk(ops, "DS 2", "ivd-b")
    assert list(await ops.tree.children(ops.tree.get(empty.st_ino))) == ["info.json"]


async def test_lazy_loading_queries_once_even_when_concurrent() -> None:
    ops, inv, _ = build()
    assert inv.calls == []

    async def look() -> None:
        await walk(ops, "DS1", "ivd-a", "snap-1")

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(look)
    assert inv.calls.count("datastores") == 1
    assert inv.calls.count("list_ivds DS1") == 1
    assert inv.calls.count("snapshots ivd-a") == 1
    assert "list_ivds DS 2" not in inv.calls


@pytest.mark.allow_log("read: injected failure at sector 2048")
async def test_errors_map_to_errno(caplog: pytest.LogCaptureFixture) -> None:
    """Each errno comes from its own cause: a backend failure is EIO with its own log line, and
    a bug (any other exception) would be EIO too but logged with a trace, which the test's log
    check refuses."""
    ops, _, src = build()
    assert await fuse_errno(ops.lookup(ROOT_INO, b"nope", CTX)) == errno.ENOENT
    assert await fuse_errno(walk(ops, "DS1", "ivd-a", "snap-9")) == errno.ENOENT
    assert await fuse_errno(ops.getattr(999999, CTX)) == errno.ENOENT
    disk = await walk(ops, "DS1", "ivd-a", "snap-1", "disk.raw")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        assert await fuse_errno(ops.open(disk.st_ino, flags, CTX)) == errno.EROFS
    snapdir = await walk(ops, "DS1", "ivd-a", "snap-1")
    assert await fuse_errno(ops.open(snapdir.st_ino, os.O_RDONLY, CTX)) == errno.EISDIR
    fi = await ops.open(disk.st_ino, os.O_RDONLY, CTX)
    src.disks[("ivd-a", "snap-1")].fail_sectors = {2048}
    assert await fuse_errno(ops.read(fi.fh, 1 << 20, 4096)) == errno.EIO
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "read: injected failure at sector 2048"
    ]
    assert await fuse_errno(ops.read(fi.fh + 1000, 0, 1)) == errno.EBADF
    assert await fuse_errno(ops.read(fi.fh, -1, 1)) == errno.EINVAL
    # The mount survives: other blocks still read.
    assert bytes(await ops.read(fi.fh, 0, 16)) == src.disks[("ivd-a", "snap-1")].data[:16]


@pytest.mark.allow_log("unexpected error in getxattr")
async def test_a_bug_is_eio_with_a_trace(caplog: pytest.LogCaptureFixture) -> None:
    """Anything that is not an OSError, NotFound or BackendError (a ValueError included) is a
    bug: EIO, logged with its trace, and the mount goes on."""
    ops, _, _ = build()

    async def broken(ino: int) -> None:
        raise ValueError("a bug")

    ops.tree.refresh = broken  # type: ignore[method-assign]
    assert await fuse_errno(ops.getxattr(ROOT_INO, b"user.ivdfs.refresh", CTX)) == errno.EIO
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.getMessage() == "unexpected error in getxattr" and record.exc_info


async def test_every_write_like_operation_is_erofs() -> None:
    ops, _, _ = build()
    disk = await walk(ops, "DS1", "ivd-a", "snap-1", "disk.raw")
    calls = [
        ops.setattr(disk.st_ino, None, None, None, CTX),
        ops.mknod(ROOT_INO, b"x", 0o644, 0, CTX),
        ops.mkdir(ROOT_INO, b"x", 0o755, CTX),
        ops.unlink(ROOT_INO, b"DS1", CTX),
        ops.rmdir(ROOT_INO, b"DS1", CTX),
        ops.symlink(ROOT_INO, b"x", b"y", CTX),
        ops.rename(ROOT_INO, b"DS1", ROOT_INO, b"x", 0, CTX),
        ops.link(disk.st_ino, ROOT_INO, b"x", CTX),
        ops.create(ROOT_INO, b"x", 0o644, os.O_WRONLY, CTX),
        ops.write(disk.st_ino, 0, b"x"),
        ops.setxattr(disk.st_ino, b"user.x", b"1", CTX),
        ops.removexattr(disk.st_ino, b"user.x", CTX),
    ]
    for c in calls:
        assert await fuse_errno(c) == errno.EROFS


class _Volumes:
    """A volume backend that answers every candidate with 'no filesystem' and counts calls."""

    def __init__(self) -> None:
        self.requests: list[VolumeRequest] = []

    async def attach(self, request: VolumeRequest) -> VolumeAnswer:
        self.requests.append(request)
        return VolumeAnswer(
            {}, {str(c.number): "no recognised filesystem" for c in request.candidates}
        )

    async def aclose(self) -> None:
        pass

    def close_blocking(self) -> None:
        pass


@pytest.mark.allow_log("cannot read the disk \\(will try again\\)")
async def test_a_disk_unreadable_while_looking_for_volumes_says_so_and_is_tried_again(
    tmp_path: Any,
) -> None:
    inv = FakeInventory()
    src = FakeDiskSource()
    inv.add(DS1, "ivd-a", CAP, ["snap-1"])
    disk = src.disks[("ivd-a", "snap-1")] = FakeDisk(pattern(CAP, "snap-1"))
    # 64K blocks: the table probe reads block 0; the filesystem probe (68 KiB) also block 1.
    disk.fail_sectors = {128}
    volumes = _Volumes()
    settings = TreeSettings(block_size=64 << 10)
    tree = Tree(inv, src, BlockCache(8 << 20), settings, volumes=volumes, mountpoint=tmp_path)
    ops = Operations(tree)
    vols = tree.get((await walk(ops, "DS1", "ivd-a", "snap-1", "volumes")).st_ino)
    assert list(await tree.children(vols)) == [".error"]
    fi = await ops.open((await walk(ops, "DS1", "ivd-a", "snap-1", "volumes", ".error")).st_ino,
                        os.O_RDONLY, CTX)  # fmt: skip
    text = bytes(await ops.read(fi.fh, 0, 4096)).decode()
    assert text.startswith("cannot read the disk (tried again at the next listing): ")
    assert volumes.requests == []
    disk.fail_sectors = set()  # the disk reads again: the next listing attaches
    assert list(await tree.children(vols)) == ["0.error"]
    assert len(volumes.requests) == 1
    assert list(await tree.children(vols)) == ["0.error"]  # and only once
    assert len(volumes.requests) == 1
