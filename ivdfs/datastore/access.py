"""Which snapshots are read directly, and from which file (``--datastore-path NAME=DIR``).

`check_directory` validates a DIR once, at start-up: it must exist, be a directory, and lie on
a read-only mount. VDDK makes ``<file>.lck`` directories beside every VMDK it opens, read-only
or not, and no setting turns that off; only on a read-only file system does it write nothing
(measured, docs/real-vddk.md). A datastore that ESXi uses must never get our lock files, and
evidence must never be written, so a writable DIR is refused, saying how to make a read-only
one.

`DirectAccess` answers, for a snapshot's datastore and vSphere path (RetrieveSnapshotDetails),
the file under DIR and its recorded chain (ivdfs.datastore.identity), or why the snapshot is
read over the network instead; that reason is logged once per datastore and reason, not once
per snapshot (thousands of IVDs on a vSAN datastore would otherwise flood the log).

Concurrency: `check_directory` is a plain blocking function. `DirectAccess` is thread-safe;
`chain` blocks on the file system (run it on a worker thread).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ivdfs.datastore.identity import ChainIdentity, ChainRegistry, ChainUnusable, record_chain
from ivdfs.datastore.paths import NotOnDatastore, datastore_file
from ivdfs.errors import UserError

log = logging.getLogger(__name__)


def read_only_hint(directory: Path) -> str:
    return (
        f"mount it read-only (NFS: mount -o ro,actimeo=0,lookupcache=none ...), or give a "
        f"read-only bind mount of it: mount --bind {directory} /mnt/ro && "
        f"mount -o remount,bind,ro /mnt/ro"
    )


def check_directory(name: str, directory: Path) -> Path:
    """The resolved DIR of ``--datastore-path NAME=DIR``; UserError (exit 3) in one line when it
    does not exist, is not a directory or is on a writable mount."""
    try:
        real = Path(os.path.realpath(directory, strict=True))
        st = os.stat(real)
        vfs = os.statvfs(real)
    except OSError as e:
        raise UserError(f"--datastore-path {name}={directory}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"--datastore-path {name}={directory}: not a directory")
    if not vfs.f_flag & os.ST_RDONLY:
        raise UserError(
            f"--datastore-path {name}={directory} is on a writable mount, and VDDK would write "
            f"lock files there: {read_only_hint(directory)}"
        )
    return real


@dataclass(frozen=True)
class DirectFile:
    """A snapshot read directly: its top link under DIR and the chain recorded for it."""

    datastore: str  # the datastore's name
    path: str  # vSphere's "[DS] fcd/x.vmdk"
    file: Path  # resolved, under `root`
    root: Path
    identity: ChainIdentity


class NotDirect(Exception):
    """The snapshot is read over the network; `reason` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DirectAccess:
    """The mount's ``--datastore-path`` entries and the chains read through them."""

    def __init__(self, roots: Mapping[str, Path], registry: ChainRegistry | None = None) -> None:
        """`roots`: NAME (a datastore name or moref) -> DIR, already checked."""
        self._roots = dict(roots)
        self.registry = registry if registry is not None else ChainRegistry()
        self._lock = threading.Lock()
        self._told: set[tuple[str, str, bool]] = set()

    def __bool__(self) -> bool:
        return bool(self._roots)

    def names(self) -> Iterable[str]:
        return self._roots.keys()

    def root_for(self, datastore: str, moref: str) -> Path | None:
        """DIR of the datastore named `datastore` with moref `moref`, if one was given."""
        return self._roots.get(datastore) or self._roots.get(moref)

    def fallback(self, datastore: str, reason: str, *, refused: bool = False) -> None:
        """Log, once per datastore and reason, that its snapshots are read over the network,
        or (`refused`, --transport file) not read at all."""
        with self._lock:
            if (datastore, reason, refused) in self._told:
                return
            self._told.add((datastore, reason, refused))
        if refused:
            log.error("datastore %s: not read (--transport file reads nothing over the "
                      "network): %s", datastore, reason)  # fmt: skip
        else:
            log.info("datastore %s: reading over the network: %s", datastore, reason)

    def locate(self, datastore: str, moref: str, path: str) -> DirectFile:
        """The snapshot at vSphere `path` on `datastore`, read directly: its file under DIR,
        with its chain recorded and admitted (a later open must find the first identity: else
        ChainChanged). NotDirect when it is to be read over the network (logged once per
        datastore and reason by the caller, through `fallback`)."""
        root = self.root_for(datastore, moref)
        if root is None:
            raise NotDirect("no --datastore-path")
        try:
            file = datastore_file(root, datastore, path)
        except NotOnDatastore as e:
            raise NotDirect(f"{path}: {e.reason}") from None
        try:
            identity = record_chain(file, root)
        except FileNotFoundError:
            raise NotDirect(f"{path}: no {file}") from None
        except ChainUnusable as e:
            raise NotDirect(f"{path}: {e}") from None
        except OSError as e:
            raise NotDirect(f"{path}: {file}: {e.strerror}") from None
        return DirectFile(datastore, path, file, root, self.registry.admit(identity))
