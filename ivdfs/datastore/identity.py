"""The identity of a snapshot's VMDK chain on a datastore, and the check that it still holds.

A snapshot's files stay unchanged only while the snapshot exists: deleting a snapshot
consolidates the chain, writing one link's grains into another in place and removing or
renaming files that a reader may be reading. So before reading a chain directly, ivdfs records
what its files are (`record_chain`): per link, the descriptor's CID and parentCID, and for the
descriptor file and every extent file its device, inode, size, mtime and ctime. The mount keeps
the first identity of each chain for its whole life (`ChainRegistry`): a later open, after an
idle close, must find the same. After every VDDK read, before the data is served or cached,
the files are looked at again (`check_chain`, shared between concurrent reads by `ChainWatch`);
any difference fails the read, and no byte from before and after a change ever leaves together.

No client cache may hide a change. Descriptors are read with O_DIRECT (the NFS client then asks
the server for the bytes; a local file system's page cache is the file itself, so where
O_DIRECT is refused, as by tmpfs before Linux 6.6, a plain read is exact), and attributes come
from statx(2) with AT_STATX_FORCE_SYNC (NFS: a GETATTR to the server, never the attribute
cache). The path-to-inode step still goes through the kernel's name cache: an NFS mount must
not cache lookups for long (README, "Reading datastores directly": actimeo=0 or
lookupcache=none), or a file renamed over on the server may be found at its old inode a while.

Concurrency: `record_chain` and `check_chain` block on file-system calls; run them on worker
threads. `ChainRegistry` and `ChainWatch` are thread-safe.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cffi

from ivdfs.datastore.descriptor import (
    MAX_DESCRIPTOR,
    Descriptor,
    DescriptorError,
    looks_like_text,
    parse_descriptor,
    sparse_descriptor_span,
)
from ivdfs.datastore.paths import NotOnDatastore, resolve_under

# Extent kinds VDDK reads from a file in its local-file mode; the others (raw device mappings,
# vSAN objects) name nothing this host can read.
_LOCAL_EXTENTS = frozenset({"FLAT", "VMFS", "SPARSE", "VMFSSPARSE", "SESPARSE", "ZERO"})
MAX_LINKS = 64  # vSphere allows 32 snapshots per disk; a longer chain is a loop or a forgery
_ALIGN = 4096  # O_DIRECT: offsets, lengths and the buffer aligned to the logical block size
_HEAD = 4096
_ATTEMPTS = 3  # a file that keeps changing while it is read is being written: give up

_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_EMPTY_PATH = 0x1000
_AT_STATX_FORCE_SYNC = 0x2000
_STATX_BASIC_STATS = 0x7FF

_CDEF = """
struct statx_timestamp { int64_t tv_sec; uint32_t tv_nsec; int32_t reserved; };
struct statx {
    uint32_t stx_mask; uint32_t stx_blksize; uint64_t stx_attributes;
    uint32_t stx_nlink; uint32_t stx_uid; uint32_t stx_gid; uint16_t stx_mode; uint16_t spare0;
    uint64_t stx_ino; uint64_t stx_size; uint64_t stx_blocks; uint64_t stx_attributes_mask;
    struct statx_timestamp stx_atime, stx_btime, stx_ctime, stx_mtime;
    uint32_t stx_rdev_major; uint32_t stx_rdev_minor; uint32_t stx_dev_major;
    uint32_t stx_dev_minor; uint64_t spare2[14];
};
int statx(int dirfd, const char *pathname, int flags, unsigned int mask, struct statx *buf);
"""
_ffi = cffi.FFI()
_ffi.cdef(_CDEF)
_libc: Any = None
_libc_lock = threading.Lock()


def _statx() -> Any:
    global _libc
    with _libc_lock:
        if _libc is None:
            _libc = _ffi.dlopen(None)  # glibc >= 2.28 has the statx wrapper
        return _libc.statx


class ChainUnusable(Exception):
    """The chain cannot be read directly (not a VMDK ivdfs can follow, a link outside the
    datastore's directory, a file that is being written): read it over the network."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ChainChanged(Exception):
    """A file of a recorded chain is no longer what it was (`what`: removed, inode, size,
    mtime, ctime, CID, ...): its snapshot's bytes can no longer be trusted."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"{path} changed ({what})")
        self.path = path
        self.what = what


class ChainUnverifiable(Exception):
    """The files could not be looked at (an I/O error, a stale handle that would not clear):
    this read cannot be confirmed, but nothing says the chain changed."""

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(f"{path}: {error.strerror or error}")
        self.path = path
        self.error = error


@dataclass(frozen=True)
class FileIdentity:
    """What a file is, from the server: (device, inode) names it, size and times date it."""

    path: str
    dev: tuple[int, int]
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    def difference(self, now: FileIdentity) -> str | None:
        """The first attribute that differs in `now`, or None."""
        for what in ("dev", "ino", "size", "mtime_ns", "ctime_ns"):
            if getattr(self, what) != getattr(now, what):
                return {"dev": "device", "ino": "inode"}.get(what, what.removesuffix("_ns"))
        return None


@dataclass(frozen=True)
class LinkIdentity:
    descriptor: str  # the link's file (a text descriptor, or a sparse file embedding one)
    cid: int
    parent_cid: int
    parent_hint: str | None
    create_type: str
    capacity: int  # sectors
    files: tuple[FileIdentity, ...]  # the descriptor file first, then its extent files


@dataclass(frozen=True)
class ChainIdentity:
    links: tuple[LinkIdentity, ...]  # the top link (the snapshot's file) first, the base last

    @property
    def top(self) -> str:
        return self.links[0].descriptor

    def files(self) -> tuple[FileIdentity, ...]:
        """Every file of the chain once (a sparse link is its own extent)."""
        seen: dict[str, FileIdentity] = {}
        for link in self.links:
            for f in link.files:
                seen.setdefault(f.path, f)
        return tuple(seen.values())

    def difference(self, now: ChainIdentity) -> tuple[str, str] | None:
        """(file, what) of the first difference between this identity and `now`, or None."""
        if len(self.links) != len(now.links):
            return self.top, f"{len(self.links)} links, now {len(now.links)}"
        for a, b in zip(self.links, now.links, strict=True):
            if a.descriptor != b.descriptor:
                return a.descriptor, f"parent is now {b.descriptor}"
            for key in ("cid", "parent_cid", "parent_hint", "create_type", "capacity"):
                if getattr(a, key) != getattr(b, key):
                    return a.descriptor, {"cid": "CID", "parent_cid": "parentCID"}.get(key, key)
            if [f.path for f in a.files] != [f.path for f in b.files]:
                return a.descriptor, "extents"
            for fa, fb in zip(a.files, b.files, strict=True):
                if (what := fa.difference(fb)) is not None:
                    return fa.path, what
        return None


def fresh_identity(path: str, fd: int = -1) -> FileIdentity:
    """The file's identity from the server (AT_STATX_FORCE_SYNC), of the open `fd` when given,
    else of `path` itself (a symbolic link is not followed, so one put in a file's place shows
    as another inode). OSError as stat(2) raises it; a non-regular file is ENOENT-like:
    ChainUnusable for the caller to decide."""
    buf = _ffi.new("struct statx *")
    if fd >= 0:
        rc = _statx()(fd, b"", _AT_EMPTY_PATH | _AT_STATX_FORCE_SYNC, _STATX_BASIC_STATS, buf)
    else:
        flags = _AT_SYMLINK_NOFOLLOW | _AT_STATX_FORCE_SYNC
        rc = _statx()(_AT_FDCWD, os.fsencode(path), flags, _STATX_BASIC_STATS, buf)
    if rc != 0:
        err = _ffi.errno
        raise OSError(err, os.strerror(err), path)
    if not stat.S_ISREG(buf.stx_mode):
        raise ChainUnusable(path, "not a regular file")
    return FileIdentity(
        path=path,
        dev=(int(buf.stx_dev_major), int(buf.stx_dev_minor)),
        ino=int(buf.stx_ino),
        size=int(buf.stx_size),
        mtime_ns=int(buf.stx_mtime.tv_sec) * 1_000_000_000 + int(buf.stx_mtime.tv_nsec),
        ctime_ns=int(buf.stx_ctime.tv_sec) * 1_000_000_000 + int(buf.stx_ctime.tv_nsec),
    )


def _pread(fd: int, offset: int, length: int, direct: bool) -> bytes:
    if not direct:
        # A file system that refuses O_DIRECT is a local one (NFS never refuses it), whose page
        # cache is the file; advise it away anyway, the cheapest equivalent there is.
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, offset)
    start = offset // _ALIGN * _ALIGN
    end = -(-(offset + length) // _ALIGN) * _ALIGN
    with mmap.mmap(-1, end - start) as buf:  # page-aligned, as O_DIRECT needs
        n = os.preadv(fd, [buf], start)
        return bytes(buf[offset - start : max(offset - start, min(n, offset - start + length))])


def read_fresh(path: str, offset: int, length: int) -> tuple[bytes, FileIdentity]:
    """Up to `length` bytes at `offset` of `path`, read past every client cache, and the file's
    identity, unchanged from before the read to after it (else ChainUnusable: being written)."""
    # O_NONBLOCK: a FIFO in a hostile copy of a datastore must not hang the open.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    direct = True
    try:
        fd = os.open(path, flags | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        fd, direct = os.open(path, flags), False
    try:
        for _ in range(_ATTEMPTS):
            before = fresh_identity(path, fd)
            try:
                data = _pread(fd, offset, length, direct)
            except OSError as e:
                if not direct or e.errno != errno.EINVAL:
                    raise
                direct = (
                    False  # O_DIRECT accepted at open, refused at read (some FUSE file systems)
                )
                continue
            after = fresh_identity(path, fd)
            if before == after:
                return data, after
        raise ChainUnusable(path, "changes while it is read")
    finally:
        os.close(fd)


def _read_link(path: str) -> tuple[Descriptor, FileIdentity, bool]:
    """(descriptor, identity of the file, whether it is a sparse file embedding it)."""
    for _ in range(_ATTEMPTS):
        head, ident = read_fresh(path, 0, _HEAD)
        try:
            span = sparse_descriptor_span(head)
            if span is not None:
                data, again = read_fresh(path, span[0], span[1])
            elif looks_like_text(head):
                if ident.size > MAX_DESCRIPTOR:
                    raise DescriptorError(f"{ident.size} bytes is no descriptor")
                data, again = (
                    (head, ident) if ident.size <= _HEAD else read_fresh(path, 0, ident.size)
                )
            else:
                raise DescriptorError("not a VMDK descriptor")
            if again != ident:
                continue  # written between the two reads
            return parse_descriptor(data), ident, span is not None
        except DescriptorError as e:
            raise ChainUnusable(path, str(e)) from None
    raise ChainUnusable(path, "changes while it is read")


def _stat_member(path: str) -> FileIdentity:
    try:
        return fresh_identity(path)
    except OSError as e:
        raise ChainUnusable(path, e.strerror or str(e)) from None


def record_chain(top: Path, root: Path, *, single_link: bool = False) -> ChainIdentity:
    """The identity of the chain whose top link is `top`, every file of which must lie under
    `root` (both resolved). With `single_link`, that link alone (VDDK's
    VIXDISKLIB_FLAG_OPEN_SINGLE_LINK). ChainUnusable when the chain cannot be read directly;
    OSError when the top link cannot be read at all (FileNotFoundError: it does not exist)."""
    links: list[LinkIdentity] = []
    seen: set[tuple[tuple[int, int], int]] = set()
    path = str(resolve_under(root, top, str(top)))
    while True:
        try:
            desc, ident, sparse = _read_link(path)
        except OSError as e:
            if not links:
                raise
            raise ChainUnusable(path, f"parent of {links[-1].descriptor}: {e.strerror}") from None
        if (ident.dev, ident.ino) in seen:
            raise ChainUnusable(path, "the chain is its own ancestor")
        seen.add((ident.dev, ident.ino))
        if links and links[-1].parent_cid != desc.cid:
            raise ChainUnusable(
                links[-1].descriptor,
                f"parentCID {links[-1].parent_cid:08x} is not the CID {desc.cid:08x} of {path} "
                "(a chain being consolidated?)",
            )
        files = [ident]
        folder = Path(path).parent
        for extent in desc.extents:
            if extent.kind not in _LOCAL_EXTENTS:
                raise ChainUnusable(path, f"a {extent.kind} extent is not a file on this host")
            if extent.file is None or sparse:
                continue  # ZERO; a sparse file is its own extent, whatever it says
            try:
                member = resolve_under(root, folder / extent.file, path)
            except NotOnDatastore as e:
                raise ChainUnusable(path, f"extent {extent.file}: {e.reason}") from None
            files.append(_stat_member(str(member)))
        links.append(LinkIdentity(path, desc.cid, desc.parent_cid, desc.parent_hint,
                                  desc.create_type, desc.capacity, tuple(files)))  # fmt: skip
        if single_link or desc.parent_hint is None:
            return ChainIdentity(tuple(links))
        if len(links) >= MAX_LINKS:
            raise ChainUnusable(top.as_posix(), f"more than {MAX_LINKS} links")
        try:
            path = str(resolve_under(root, folder / desc.parent_hint, path))
        except NotOnDatastore as e:
            raise ChainUnusable(path, f"parent {desc.parent_hint}: {e.reason}") from None


def check_chain(identity: ChainIdentity) -> None:
    """ChainChanged if any file of `identity` is not what it was (asked of the server);
    ChainUnverifiable if one could not be looked at."""
    for f in identity.files():
        try:
            now = fresh_identity(f.path)
        except ChainUnusable:
            raise ChainChanged(f.path, "no longer a regular file") from None
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
                raise ChainChanged(f.path, "removed") from None
            raise ChainUnverifiable(f.path, e) from None
        if (what := f.difference(now)) is not None:
            raise ChainChanged(f.path, what)


class ChainRegistry:
    """The first identity of every chain this mount opened, kept for the mount's life: a later
    open of the same file must find the same chain (a few hundred bytes per chain)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, ChainIdentity] = {}

    def admit(self, identity: ChainIdentity) -> ChainIdentity:
        """`identity` if it is the first of its top file or equal to the first; ChainChanged
        naming the first difference otherwise (the first stays)."""
        with self._lock:
            first = self._known.setdefault(identity.top, identity)
        if first is not identity and (diff := first.difference(identity)) is not None:
            raise ChainChanged(*diff)
        return first

    def __len__(self) -> int:
        with self._lock:
            return len(self._known)


class ChainWatch:
    """Confirms after reads that a chain is unchanged. A check confirms every read that ended
    before it began, so concurrent readers share checks: a reader whose read ended while a
    check was already under way waits for the next one, which it or another reader runs.

    A change is final for the watch (every later confirm raises it); an unverifiable check
    fails only the read that ran it (the others run the next).
    """

    def __init__(
        self, identity: ChainIdentity, check: Callable[[ChainIdentity], None] = check_chain
    ) -> None:
        self.identity = identity
        self._check = check
        self._cond = threading.Condition()
        self._running = False
        self._confirmed_from = -1  # monotonic ns at which the last successful check began
        self._changed: ChainChanged | None = None
        self.checks = 0  # checks run (statistics)

    @property
    def changed(self) -> ChainChanged | None:
        with self._cond:
            return self._changed

    def confirm(self, read_ended_ns: int) -> None:
        """Return once a check that began after `read_ended_ns` (time.monotonic_ns() taken
        when the read returned) found the chain unchanged; raise what a check found."""
        with self._cond:
            while True:
                if self._changed is not None:
                    raise self._changed
                if self._confirmed_from >= read_ended_ns:
                    return
                if not self._running:
                    break
                self._cond.wait()
            self._running = True
            began = time.monotonic_ns()
        ok = False
        try:
            self._check(self.identity)
            ok = True
        except ChainChanged as e:
            with self._cond:
                self._changed = e
            raise
        finally:
            with self._cond:
                self._running = False
                self.checks += 1
                if ok:
                    self._confirmed_from = max(self._confirmed_from, began)
                self._cond.notify_all()
