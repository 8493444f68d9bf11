"""Directory listings: load on first use, refresh when stale, keep what did not change.

Role: the one engine behind every directory. A directory's loader fills it; `children` runs the
loader the first time, again when the listing is older than `refresh` seconds (directories
that mirror vCenter), and again while the loader reports an incomplete listing. `sync` makes a
directory's children of one kind those a loader wants: a child whose identity (datastore
moref, IVD or snapshot id, link target) is unchanged keeps its node and inode; the others are
removed through the inode table, which frees them once the kernel forgets them.

Concurrency: trio thread only; a directory loads under its own lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

from ivdfs.errors import BackendError, NotFound
from ivdfs.tree.inodes import InodeTable
from ivdfs.tree.nodes import DirNode, Node

log = logging.getLogger(__name__)

Make = Callable[[], Node]


class Listings:
    def __init__(
        self, inodes: InodeTable, refresh: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inodes = inodes
        self.refresh = refresh
        self.clock = clock
        self._warned: set[str] = set()

    def stale(self, d: DirNode) -> bool:
        return d.refresh_due is not None and self.refresh > 0 and self.clock() >= d.refresh_due

    async def children(self, d: DirNode) -> dict[str, Node]:
        if not d.loaded or self.stale(d):
            async with d.lock:
                if not d.loaded or self.stale(d):
                    await self._load(d)
        return d.children

    async def reload(self, d: DirNode) -> None:
        """List `d` again now (a refresh asked for by the user, or a lookup of a new id)."""
        async with d.lock:
            await self._load(d)

    async def _load(self, d: DirNode) -> None:
        if d.loader is None:
            d.loaded = True
            return
        first = d.last_loaded == 0.0
        try:
            d.loaded = await d.loader(d)
        except NotFound:
            if first:
                raise
            # The object itself is gone (its parent drops it at its own refresh).
            for name in list(d.children):
                self.inodes.remove(d, name)
            d.loaded = True
        except BackendError as e:
            if first:
                raise
            # Stale beats nothing: the listing stays as it was until the next refresh.
            log.warning("refreshing %s failed; showing the previous listing: %s", d.name, e)
        d.last_loaded = self.clock()
        if d.refresh_due is not None:
            d.refresh_due = d.last_loaded + self.refresh

    def sync(self, d: DirNode, kind: type[Node], wanted: dict[str, tuple[Hashable, Make]]) -> None:
        """Make `d`'s children of type `kind` those in `wanted` (name -> (identity, make)).

        `make` is called only for names that are new or changed. Children of other types
        (by-name, files added by others) are left alone, and win a name they already hold.
        """
        for name, node in list(d.children.items()):
            if isinstance(node, kind) and (name not in wanted or node.identity != wanted[name][0]):
                self.inodes.remove(d, name)
        for name, (ident, make) in wanted.items():
            current = d.children.get(name)
            if current is None:
                node = make()
                node.identity = ident
                self.inodes.add(d, node)
            elif not isinstance(current, kind):
                self.warn_once(f"{d.name}/{name} is taken; not showing {kind.__name__} {ident}")

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)
