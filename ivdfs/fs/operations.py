"""pyfuse3.Operations over the tree: thin, read-only, exceptions mapped to errno here only.

Concurrency: pyfuse3 runs handlers as concurrent tasks on the trio thread. Anything other than
FUSEError escaping a handler would end the mount, so every handler goes through `_guard`.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from ivdfs.errors import BackendError, NotFound
from ivdfs.tree.nodes import DirNode, DiskFile, GeneratedFile, Node, PartitionFile, SymlinkNode
from ivdfs.tree.tree import Tree

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Snapshots never change: let the kernel keep attributes and pages for a day.
FILE_TIMEOUT = 86400.0


def _errno_of(e: BaseException) -> int:
    if isinstance(e, NotFound):
        return errno.ENOENT
    if isinstance(e, IsADirectoryError):
        return errno.EISDIR
    if isinstance(e, NotADirectoryError):
        return errno.ENOTDIR
    if isinstance(e, ValueError):
        return errno.EINVAL
    return errno.EIO


def _guard(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except NotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except BackendError as e:
            log.error("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except (IsADirectoryError, NotADirectoryError, ValueError) as e:
            raise pyfuse3.FUSEError(_errno_of(e)) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


async def _async_erofs(*_args: Any, **_kwargs: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, dir_timeout: float = 60.0, block_size: int = 1 << 20) -> None:
        super().__init__()
        self.tree = tree
        self.dir_timeout = dir_timeout
        self.block_size = block_size
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._dir_handles: dict[int, list[Node]] = {}
        self._next_fh = 1

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        is_dir = isinstance(node, DirNode)
        # Directory entries and links come and go as the tree refreshes: the kernel must ask
        # again after the refresh interval. What a snapshot directory holds never changes.
        timeout = self.dir_timeout if is_dir or isinstance(node, SymlinkNode) else FILE_TIMEOUT
        if isinstance(node, GeneratedFile):
            timeout = 0.0  # content changes (statistics): never cache its size
        a.entry_timeout = a.attr_timeout = timeout
        a.st_mode = node.mode
        a.st_nlink = 2 if is_dir else 1
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_rdev = 0
        a.st_size = node.size
        a.st_blksize = self.block_size
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = await self.tree.lookup(parent_inode, os.fsdecode(name))
        return self.attrs(node)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs(self.tree.get(inode))

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.tree.get(inode)
        if not isinstance(node, SymlinkNode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.target)

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self.tree.xattrs(inode).get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in self.tree.xattrs(inode)]

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.tree.get(inode)
        if not isinstance(node, DirNode):
            raise NotADirectoryError(node.name)
        children = await self.tree.children(node)
        fh = self._next_fh
        self._next_fh += 1
        # A stable listing per handle, so offsets mean the same thing across readdir calls.
        self._dir_handles[fh] = sorted(children.values(), key=lambda n: n.name)
        return fh

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dir_handles.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for i in range(start_id, len(entries)):
            node = entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(node.name), self.attrs(node), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = await self.tree.open(inode)
        if isinstance(node, GeneratedFile):
            # direct_io: reads are not bounded by a size the kernel cached earlier.
            return pyfuse3.FileInfo(fh=node.ino, keep_cache=False, direct_io=True)
        # A disk or partition open gets its own handle (sequential detection is per open
        # file); other files need no state of their own, so their inode doubles as handle.
        fh = node.ino
        if isinstance(node, DiskFile | PartitionFile):
            fh = self.tree.open_stream(node)
        # keep_cache: the kernel keeps the pages of earlier opens. Nothing else here drops them
        # (issue 17, traced): mtime and size never change (the listing opens the disk, so even
        # the first lookup has the disk's own size), so libfuse's default auto_inval_data never
        # fires; reads are short only at EOF; nothing sends notify_inval. Pages lost all the
        # same (host reclaim) come back from the block cache: see ivdfs/io/block_cache.py.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False, nonseekable=False)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]  # pyfuse3 replies from any buffer
        return await self.tree.read(fh, off, size)

    async def release(self, fh: int) -> None:
        self.tree.release(fh)

    async def forget(self, inode_list: Any) -> None:
        # Nodes live as long as the mount; inode numbers are never reused.
        pass

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = self.block_size
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
