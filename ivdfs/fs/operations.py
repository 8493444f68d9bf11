"""pyfuse3.Operations over the tree: thin, read-only, exceptions mapped to errno here only.

Concurrency: pyfuse3 runs handlers as concurrent tasks on the trio thread. Anything other than
FUSEError escaping a handler would end the mount, so every handler goes through `_guard`, the
one place where an exception becomes an errno: NotFound is ENOENT, an OSError carries its own
errno, a BackendError (vCenter or VDDK) is EIO with one log line, and anything else is a bug,
logged with its trace, and EIO.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from ivdfs.errors import BackendError, NotFound
from ivdfs.forensics.access import Caller
from ivdfs.settings import default
from ivdfs.tree.info import XATTR_PREFIX
from ivdfs.tree.nodes import DirNode, GeneratedFile, Node, SymlinkNode
from ivdfs.tree.tree import REFRESH_XATTR, Tree

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Snapshots never change: let the kernel keep attributes and pages for a day.
FILE_TIMEOUT = 86400.0


def errno_of(e: BaseException, where: str) -> int:
    """The errno for an exception raised by the tree; logs what the user should see."""
    if isinstance(e, pyfuse3.FUSEError):
        return e.errno
    if isinstance(e, NotFound):
        return errno.ENOENT
    if isinstance(e, BackendError):
        if not e.quiet:
            log.error("%s: %s", where, e)
        return errno.EIO
    if isinstance(e, OSError) and e.errno:
        return e.errno
    if isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        return errno_of(e.exceptions[0], where)  # a nursery's wrapping of one error
    log.error("unexpected error in %s", where, exc_info=e)
    return errno.EIO


def _guard(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except Exception as e:
            raise pyfuse3.FUSEError(errno_of(e, fn.__name__)) from None

    return wrapper


async def _async_erofs(*_args: Any, **_kwargs: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


@dataclass(frozen=True)
class Presentation:
    """How files look to users: owner, permission mask, cache lifetimes, block size."""

    uid: int
    gid: int
    umask: int = 0o022
    dir_timeout: float = default("refresh")
    block_size: int = default("block_size")


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, look: Presentation | None = None) -> None:
        super().__init__()
        self.tree = tree
        self.look = look or Presentation(os.getuid(), os.getgid())
        self._dir_handles: dict[int, list[tuple[str, Node]]] = {}
        self._next_fh = 1
        # Set when the kernel's INIT was answered: a session that ends before this failed.
        self.initialized = False

    def init(self) -> None:
        self.initialized = True

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        is_dir = isinstance(node, DirNode)
        # Directory entries and links come and go as the tree refreshes: the kernel must ask
        # again after the refresh interval. A file whose size is final is kept for a day; one
        # that is not (statistics, a disk not probed yet) is asked for every time.
        if is_dir or isinstance(node, SymlinkNode):
            timeout = self.look.dir_timeout
        else:
            timeout = FILE_TIMEOUT if node.stable else 0.0
        a.entry_timeout = a.attr_timeout = timeout
        mode = node.mode
        if not isinstance(node, SymlinkNode):
            mode &= ~self.look.umask
        a.st_mode = mode
        a.st_nlink = 2 if is_dir else 1
        a.st_uid = self.look.uid
        a.st_gid = self.look.gid
        a.st_rdev = 0
        a.st_size = node.size
        a.st_blksize = self.look.block_size
        # Holes the allocation map knows are left out, so du and cp --sparse=auto see them.
        a.st_blocks = (node.stored + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = await self.tree.lookup(parent_inode, os.fsdecode(name))
        attrs = self.attrs(node)
        self.tree.remember(node.ino)
        return attrs

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.tree.forget(ino, n)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs(self.tree.get(inode))

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.tree.get(inode)
        if not isinstance(node, SymlinkNode):
            raise OSError(errno.EINVAL, "not a symbolic link")
        if node.prepare is not None:
            await node.prepare()
        return os.fsencode(node.target)

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        text = os.fsdecode(name)
        if text == REFRESH_XATTR:
            await self.tree.refresh(inode)
            return b"refreshed"
        if not text.startswith(XATTR_PREFIX):
            # security.selinux, system.posix_acl_access ... that ls and cp ask for: never ours,
            # and never worth a vCenter round trip (or a wait through an outage).
            raise OSError(errno.ENODATA, text)
        value = (await self.tree.xattrs(inode)).get(text)
        if value is None:
            raise OSError(errno.ENODATA, text)
        return value

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in await self.tree.xattrs(inode)]

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.tree.get(inode)
        if not isinstance(node, DirNode):
            raise OSError(errno.ENOTDIR, node.name)
        children = await self.tree.children(node)
        fh = self._next_fh
        self._next_fh += 1
        # A stable listing per handle, so offsets mean the same thing across readdir calls;
        # '.' and '..' first, as ls and find expect.
        parent = self.tree.inodes.parent_of(node)
        self._dir_handles[fh] = [
            (".", node),
            ("..", parent),
            *sorted(children.items()),
        ]
        return fh

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dir_handles.get(fh)
        if entries is None:
            raise OSError(errno.EBADF, "directory handle")
        for i in range(start_id, len(entries)):
            name, node = entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self.attrs(node), i + 1):
                break
            if i >= 2:  # the kernel counts a lookup for every entry but '.' and '..'
                self.tree.remember(node.ino)

    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, "read-only")
        audited = self.tree.evidence.audit is not None
        # The audit log names the caller of the open; reads carry no context of their own.
        caller = Caller.of(ctx.uid, ctx.gid, ctx.pid) if audited else None
        fh, node = await self.tree.open(inode, caller)
        if isinstance(node, GeneratedFile):
            # direct_io: reads are not bounded by a size the kernel cached earlier.
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=True)
        if audited:
            # The audit log records what each open was served: pages the kernel kept from another
            # open would be read without ivdfs seeing it. So no page cache for disk files.
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=True)
        if self.tree.hashing(fh):
            # This open may produce the file's evidence hashes, which needs every byte to reach
            # ivdfs: drop the pages of earlier opens (the block cache still has their blocks).
            # Once the hashes are known, opens keep the pages as below.
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False)
        # keep_cache: the kernel keeps the pages of earlier opens. Nothing here drops them
        # (issue 17, traced): mtime never changes, and the size only once, from vCenter's guess
        # to the disk's own when a failed probe succeeds at open (before any page exists), so
        # libfuse's default auto_inval_data never throws pages away; reads are short only at
        # EOF; the only notify_inval sent is attributes-only (st_blocks as holes become known),
        # which keeps the pages. Pages lost all the same (the host's proactive
        # reclaim) come back from the block cache: see ivdfs/io/block_cache.py.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False, nonseekable=False)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]  # pyfuse3 replies from any buffer
        return await self.tree.read(fh, off, size)

    async def release(self, fh: int) -> None:
        self.tree.release(fh)

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = self.look.block_size
        s.f_frsize = 512
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    @_guard
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self.tree.get(inode)
        return not mode & os.W_OK

    # Every write-like operation: the mount is read-only (it is also mounted `ro`).
    setattr = _async_erofs
    mknod = _async_erofs
    mkdir = _async_erofs
    unlink = _async_erofs
    rmdir = _async_erofs
    symlink = _async_erofs
    rename = _async_erofs
    link = _async_erofs
    create = _async_erofs
    write = _async_erofs
    setxattr = _async_erofs
    removexattr = _async_erofs
    fallocate = _async_erofs
