"""Which of the mount's snapshots are read directly, and the check after each of their reads.

Role: between the disk service and `DirectAccess`. `plan` answers, when a snapshot's disk is
about to open, whether it is read directly (its file under DIR, from vCenter's
RetrieveSnapshotDetails, and its recorded chain) or over the network; with ``--transport file``
a snapshot that cannot be read directly fails instead. The answer is kept until the chain
changes: a reopen after an idle close costs no vCenter call, and vCenter being slow or away
does not stop reads of files this host can see.

`confirm` runs after every VDDK read of a directly read disk, before its data is served or
cached: a check that began after the read ended must find every file of the chain unchanged
(`ChainWatch`). When one changed (a snapshot deletion consolidating the chain), the read fails
with EIO (`DirectChanged`, permanent: the disk service neither retries it nor waits for it), one
log line names the file, the snapshot's cached blocks are dropped (`on_changed`), and the next
open asks vCenter again where the snapshot is: a file that still is what it was is read again;
the same file changed stays refused for the mount's life (the first identity is kept), so no
reader ever gets bytes from before and after a change.

Concurrency: trio thread only; the blocking steps (vCenter, the file system) go to worker
threads through `trio.to_thread`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ivdfs.datastore.access import DirectAccess, DirectFile, NotDirect
from ivdfs.datastore.identity import ChainChanged, ChainUnverifiable, ChainWatch
from ivdfs.errors import BackendError, NotFound, NotSupported
from ivdfs.inventory.model import Datastore, DiskTarget

log = logging.getLogger(__name__)

# The snapshot's datastore path, "[DS1] fcd/x-000001.vmdk": a vCenter call (blocking).
Lookup = Callable[[DiskTarget, Datastore], str]
# A datastore's name from its moref: a vCenter call (blocking), once per datastore.
NameOf = Callable[[str], str]


class DirectChanged(BackendError):
    """A directly read snapshot's chain changed: this read and every later one fail (EIO)."""

    permanent = True
    reopen = True  # the open disk reads something else now: close it

    def __init__(self, target: DiskTarget, change: ChainChanged) -> None:
        super().__init__(f"{target.describe()}: {change} while read directly", quiet=True)
        self.change = change


class NotReadDirectly(BackendError):
    """--transport file, and the snapshot cannot be read directly."""

    permanent = True


@dataclass
class DirectStats:
    opens: int = 0  # disks opened from a file under a --datastore-path
    network: int = 0  # snapshots on a --datastore-path datastore read over the network
    refused: int = 0  # ... refused instead (--transport file)
    changed: int = 0  # chains that changed under the mount
    checks: int = 0  # identity checks after reads
    unverifiable: int = 0  # reads failed because the files could not be looked at


class DirectReads:
    """The mount's direct reads: plans per snapshot, and the watches of their chains."""

    def __init__(
        self,
        access: DirectAccess,
        lookup: Lookup,
        name_of: NameOf,
        *,
        only: bool = False,
        on_changed: Callable[[DiskTarget], None] | None = None,
    ) -> None:
        """`only`: ``--transport file``, no network fallback. `on_changed`: drops a snapshot's
        cached blocks (trio thread)."""
        self.access = access
        self._lookup = lookup
        self._name_of = name_of
        self.only = only
        self.on_changed = on_changed
        self._names: dict[str, str] = {}  # datastore moref -> name
        self._plans: dict[DiskTarget, DirectFile] = {}
        self._network: set[DiskTarget] = set()
        self._watches: dict[str, ChainWatch] = {}  # top file -> watch (shared by opens)
        self._changed: set[DiskTarget] = set()
        self.stats = DirectStats()

    def mode(self, target: DiskTarget) -> DirectFile | str | None:
        """How the snapshot is read: its DirectFile, "network", or None while not yet known."""
        plan = self._plans.get(target)
        if plan is not None:
            return plan
        return "network" if target in self._network else None

    def _not_direct(
        self, target: DiskTarget, datastore: str, reason: str, told: bool = True
    ) -> None:
        """Read over the network (logged once per datastore and reason, when `told`); or,
        with --transport file, refused."""
        if self.only:
            self.stats.refused += 1
            self.access.fallback(datastore, reason, refused=True)
            raise NotReadDirectly(
                f"{target.describe()}: not read directly ({reason}), and --transport file "
                "reads nothing over the network",
                quiet=True,  # logged once per datastore and reason
            )
        if told:
            self.access.fallback(datastore, reason)
            self.stats.network += 1
        self._network.add(target)

    async def plan(self, target: DiskTarget) -> DirectFile | None:
        """The snapshot's file when it is read directly, None to read it over the network.
        NotReadDirectly (--transport file) or DirectChanged (its chain is not what this mount
        first saw) to fail its open."""
        known = self._plans.get(target)
        if known is not None:
            return known
        moref = target.datastore_moref
        name = self._names.get(moref)
        if name is None:
            try:
                name = await trio.to_thread.run_sync(self._name_of, moref)
            except NotFound as e:
                raise BackendError(f"{target.describe()}: {e}") from None
            self._names[moref] = name
        if self.access.root_for(name, moref) is None:
            # Not logged: the user did not ask for this datastore to be read directly.
            self._not_direct(target, name, "no --datastore-path for its datastore", told=False)
            return None
        if target.snapshot_id is None:
            self._not_direct(target, name, "not a snapshot")
            return None
        try:
            path = await trio.to_thread.run_sync(self._lookup, target, Datastore(name, moref))
        except NotSupported as e:
            self._not_direct(target, name, str(e))
            return None
        except NotFound as e:  # deleted: over the network it would not be found either
            raise BackendError(f"{target.describe()}: {e}") from None
        try:
            found = await trio.to_thread.run_sync(self.access.locate, name, moref, path)
        except NotDirect as e:
            self._not_direct(target, name, e.reason)
            return None
        except ChainChanged as e:
            self._change(target, e)
            raise DirectChanged(target, e) from None
        self._network.discard(target)
        self._plans[target] = found
        if found.identity.top not in self._watches:
            self._watches[found.identity.top] = ChainWatch(found.identity)
        log.debug("%s: reading %s directly", target.describe(), found.file)
        return found

    def opened(self) -> None:
        self.stats.opens += 1

    async def confirm(self, target: DiskTarget, plan: DirectFile, read_ended_ns: int) -> None:
        """Return once the chain was found unchanged after a read that ended at
        `read_ended_ns` (time.monotonic_ns()); DirectChanged or BackendError otherwise."""
        watch = self._watches[plan.identity.top]
        before = watch.checks
        try:
            await trio.to_thread.run_sync(watch.confirm, read_ended_ns)
        except ChainChanged as e:
            self._change(target, e)
            raise DirectChanged(target, e) from None
        except ChainUnverifiable as e:
            self.stats.unverifiable += 1
            raise BackendError(
                f"{target.describe()}: cannot tell whether {e.path} is unchanged ({e}); "
                "not serving the read"
            ) from None
        finally:
            self.stats.checks += watch.checks - before

    def confirmer(self, target: DiskTarget, plan: DirectFile) -> Callable[[], Any]:
        """For the open disk: an async callable to run after each read, timed from its call."""

        async def after_read() -> None:
            await self.confirm(target, plan, time.monotonic_ns())

        return after_read

    def _change(self, target: DiskTarget, change: ChainChanged) -> None:
        """Once per snapshot: one log line naming the file, the cached blocks dropped, and the
        snapshot to be looked up in vCenter again at its next open."""
        self._plans.pop(target, None)
        if target in self._changed:
            return
        self._changed.add(target)
        self.stats.changed += 1
        log.error(
            "%s: %s changed (%s) while read directly: its reads fail with EIO; a snapshot "
            "deleted or consolidated meanwhile is looked up again",
            target.describe(),
            change.path,
            change.what,
        )
        if self.on_changed is not None:
            self.on_changed(target)

    def report(self) -> dict[str, Any]:
        return {
            **self.stats.__dict__,
            "datastores": sorted(self.access.names()),
            # Which disks are read directly: "<ivd>/<snapshot>" of each (ivdfs status).
            "snapshots": sorted(f"{t.ivd_id}/{t.snapshot_id}" for t in self._plans),
            "chains": len(self.access.registry),
        }
