"""What a mount records for examiners: where the bytes come from, and the evidence hashes of
the files that reads complete.

Role: `Evidence` is handed to the tree as one object (source, whether to hash, the audit log).
`EvidenceHashes` keeps the hashes of a mount's files as reads complete them: each open that
reads a file in order feeds its `SequentialHash`; once the last byte is in, the digests are
finished on a short-lived thread (the pool may be busy) and handed back through the trio
token, stored with the file's snapshot (`HashTarget.known`, by file name), logged, and written
to the audit log. Two complete reads that disagree leave no hash at all (None). Whoever shows
hashes (attributes, info.json) first waits for those of its snapshot still being finished
(`settled`).

Concurrency: `Source` and `Evidence` are plain records, safe from any thread (the audit log
has its own contract). `EvidenceHashes` belongs to the trio thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import trio

from ivdfs.forensics.hashing import Buffer, Digests, SequentialHash
from ivdfs.forensics.writer import AuditLog

log = logging.getLogger(__name__)

# A reader whose evidence hashing falls this far behind waits for it (bounded memory).
HASH_BACKLOG = 32 << 20


@dataclass(frozen=True)
class Source:
    """Where the bytes come from: the vCenter/ESXi that ivdfs logged in to."""

    server: str  # host:port
    thumbprint: str  # SHA-1 of its certificate, 'AA:BB:...'


@dataclass(frozen=True)
class Evidence:
    """`hashes`: compute SHA-256/MD5 of disk.raw and windows read in order; `audit`: the
    audit log, if any."""

    source: Source | None = None
    hashes: bool = False
    audit: AuditLog | None = None


@dataclass(frozen=True)
class HashTarget:
    """Where a file's hashes go once one open has read it whole."""

    key: Hashable  # the snapshot: whoever shows its hashes waits for all of its files
    known: dict[str, Digests | None]  # the snapshot's hashes by file name
    name: str  # the file's name in its snapshot directory
    path: str  # relative to the mount root, for the log and the audit log
    fh: int | None  # the open that read it (in the audit log)


class EvidenceHashes:
    def __init__(self, audit: AuditLog | None = None) -> None:
        self._audit = audit
        # Hashes being finished on a thread, by snapshot (see `_collect`).
        self._pending: dict[Hashable, list[trio.Event]] = {}

    async def feed(
        self, h: SequentialHash, offset: int, data: Buffer, target: Callable[[], HashTarget]
    ) -> bool:
        """One read of an open that hashes; False once it gave up (not read in order: this
        open yields no hash). When it completes the file, the hashes go to `target()` without
        holding up the reply to this read (an unmount meanwhile would abort it)."""
        h.feed(offset, data)
        if h.abandoned:
            return False
        if h.complete:
            if not h.collected:
                h.collected = True
                self._collect(h, target())
            return True
        if h.digester.backlog > HASH_BACKLOG:
            await trio.to_thread.run_sync(h.digester.wait_below, HASH_BACKLOG // 2)
        return True

    def _collect(self, h: SequentialHash, target: HashTarget) -> None:
        done = trio.Event()
        self._pending.setdefault(target.key, []).append(done)
        token = trio.lowlevel.current_trio_token()

        def finish(digests: Digests | None) -> None:  # trio thread
            try:
                if digests is not None:
                    self._store(target, digests)
            except Exception:
                log.exception("storing the hashes of %s", target.name)
            finally:
                pending = self._pending[target.key]
                pending.remove(done)
                if not pending:
                    del self._pending[target.key]
                done.set()

        def wait() -> None:  # its own short-lived thread: the pool may be busy hashing
            digests: Digests | None = None
            try:
                digests = h.result()
            except Exception as e:
                log.error("hashing %s failed: %s", target.name, e)
            try:
                token.run_sync_soon(finish, digests)
            except trio.RunFinishedError:
                pass  # unmounted meanwhile: nobody can ask any more

        threading.Thread(target=wait, name="ivdfs-hash-done", daemon=True).start()

    async def settled(self, key: Hashable) -> None:
        """Wait for hashes still being finished for files of this snapshot."""
        for done in list(self._pending.get(key, ())):
            await done.wait()

    def _store(self, target: HashTarget, digests: Digests) -> None:
        known, name, path = target.known, target.name, target.path
        if name not in known:
            known[name] = digests
            log.info("%s: sha256 %s md5 %s", path, digests.sha256, digests.md5)
        elif known[name] not in (None, digests):
            # The same snapshot read twice gave different bytes: neither hash can be trusted.
            log.error("%s: two complete reads hashed differently (%s, then %s); no hash is shown",
                      path, known[name], digests)  # fmt: skip
            known[name] = None
        if self._audit is not None and target.fh is not None:
            self._audit.record("hash", path=path, fh=target.fh, **digests.as_dict())
