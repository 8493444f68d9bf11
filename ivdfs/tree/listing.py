"""Directory listings: load on first use, refresh in the background when stale, keep what
did not change.

Role: the one engine behind every directory. A directory's loader fills it; `children` runs the
loader the first time (and again while the loader reports an incomplete listing), and waits
for it: nothing is known yet. Once a directory has a listing, `children` never waits on
vCenter: a listing older than `refresh` seconds is answered as it is and refreshed in the
background (stale-while-revalidate), by a few workers (`run`) so that a scan of thousands of
directories cannot occupy every inventory thread. A refresh that fails keeps the last listing;
the first failure of an outage is logged (one line), later ones count in the statistics, and
the first success after it says that vCenter answers again. `reload` (a lookup of a new id, a
refresh the user asked for) waits and reports a failure. `sync` makes a directory's children
of one kind those a loader wants: a child whose identity (datastore moref, IVD or snapshot id,
link target) is unchanged keeps its node and inode; the others are removed through the inode
table, which frees them once the kernel forgets them. `may_relist` rate-limits the reloads
that lookups of names missing from a listing ask for, so a scanner trying random names cannot
flood vCenter: the same missing name is not asked again for a while, and a directory lists
again at most RELIST_BURST times per RELIST_WINDOW.

Concurrency: trio thread only; a directory loads under its own lock.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable

import trio

from ivdfs.errors import BackendError, NotFound
from ivdfs.tree.inodes import InodeTable
from ivdfs.tree.nodes import DirNode, Node

log = logging.getLogger(__name__)

Make = Callable[[], Node]
# Background refreshes at once: the rest of the inventory threads stay for lookups.
REFRESH_WORKERS = 2
MISSING_NAME_TTL = 2.0
RELIST_BURST = 5
RELIST_WINDOW = 10.0


class Listings:
    def __init__(
        self, inodes: InodeTable, refresh: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inodes = inodes
        self.refresh = refresh
        self.clock = clock
        self._warned: set[str] = set()
        # Set while `run` serves background refreshes; without it (a tree used on its own),
        # a stale listing is refreshed in the caller's task, failures kept the same way.
        self._send: trio.MemorySendChannel[DirNode] | None = None
        self.outage = False  # the last refresh failed: vCenter does not answer
        # Lookups of names missing from a listing (see may_relist).
        self._missing: dict[tuple[int, str], float] = {}
        self._relists: dict[int, list[float]] = {}
        self.stats = {"refresh_failures": 0, "refresh_outages": 0, "background_refreshes": 0}

    def may_relist(self, d: DirNode, name: str) -> bool:
        """Whether a lookup of `name`, missing from `d`'s listing, may list `d` again now."""
        now = self.clock()
        asked = self._missing.get((d.ino, name))
        if asked is not None and now - asked < MISSING_NAME_TTL:
            return False
        recent = [t for t in self._relists.get(d.ino, []) if now - t < RELIST_WINDOW]
        if len(recent) >= RELIST_BURST:
            return False
        self._relists[d.ino] = [*recent, now]
        self._missing = {k: t for k, t in self._missing.items() if now - t < MISSING_NAME_TTL}
        self._missing[(d.ino, name)] = now
        return True

    def stale(self, d: DirNode) -> bool:
        return d.refresh_due is not None and self.refresh > 0 and self.clock() >= d.refresh_due

    async def children(self, d: DirNode) -> dict[str, Node]:
        if not d.loaded:
            async with d.lock:
                if not d.loaded:
                    await self._load(d)
        elif self.stale(d):
            if self._send is not None:
                self._schedule(d, self._send)
            else:
                async with d.lock:
                    if self.stale(d):
                        await self._load(d)
        return d.children

    def _schedule(self, d: DirNode, send: trio.MemorySendChannel[DirNode]) -> None:
        if not d.refresh_queued:
            d.refresh_queued = True
            send.send_nowait(d)

    async def reload(self, d: DirNode) -> None:
        """List `d` again now (a refresh asked for by the user, or a lookup of a new id); a
        failure is raised. A refresh that failed while this waited for the directory is that
        failure: asking a silent vCenter again would double the wait."""
        asked = self.clock()
        async with d.lock:
            if d.failed_at is not None and d.failed_at >= asked and d.failure is not None:
                raise d.failure
            await self._load(d, strict=True)

    async def _load(self, d: DirNode, strict: bool = False) -> None:
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
            d.failed_at, d.failure = self.clock(), e
            self._failed(d, e)
            if first or strict:
                raise
            # Stale beats nothing: the listing stays as it was until the next refresh.
        else:
            d.failure = None
            if self.outage and not d.local_refresh:
                self.outage = False
                log.info("vCenter answers again; listings refresh as before")
        d.last_loaded = self.clock()
        if d.refresh_due is not None:
            d.refresh_due = d.last_loaded + self.refresh

    def _where(self, d: DirNode) -> str:
        try:
            return "/" + "/".join(self.inodes.path_of(d).parts)
        except KeyError:  # removed from the tree meanwhile
            return d.name

    def _failed(self, d: DirNode, e: BackendError) -> None:
        self.stats["refresh_failures"] += 1
        if self.outage:
            log.debug("listing %s failed again: %s", self._where(d), e)
            return
        self.outage = True
        self.stats["refresh_outages"] += 1
        log.warning("listing %s failed; listings stay as they are until vCenter answers: %s",
                    self._where(d), e)  # fmt: skip

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve background refreshes until cancelled (at unmount)."""
        send, receive = trio.open_memory_channel[DirNode](math.inf)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(REFRESH_WORKERS):
                    nursery.start_soon(self._refresher, receive)
                self._send = send
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._send = None

    async def _refresher(self, receive: trio.MemoryReceiveChannel[DirNode]) -> None:
        async for d in receive:
            try:
                if self.inodes.nodes.get(d.ino) is not d:
                    continue  # removed from the tree meanwhile
                async with d.lock:
                    if self.stale(d):  # not refreshed by a reload meanwhile
                        self.stats["background_refreshes"] += 1
                        await self._load(d)
            except (NotFound, BackendError) as e:  # a first load: nobody is waiting for it
                log.debug("refreshing %s: %s", self._where(d), e)
            except Exception:
                log.exception("refreshing %s", self._where(d))
            finally:
                d.refresh_queued = False

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
