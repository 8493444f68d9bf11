"""`ivdfs hash`: SHA-256 and MD5 of a snapshot's disk (or one partition), read through VDDK.

Reads in this process through the mount's own read path: VDDK opened as a mount opens it
(`ivdfs.vddk.oneshot`: between PrepareForAccess and EndAccess, always paired, even when Prepare
fails or the read is interrupted; SIGTERM and SIGHUP stop it like Ctrl-C), and a `DiskReader`
over it with the mount's allocation map, block cache and read-ahead at their defaults: regions
that QueryAllocatedBlocks reports unallocated are not read (they hash as the zeros disk.raw
shows for them), and reads overlap as far as the transport allows. A partition is found in the
table the mount reads. Hashing runs on pool threads (ivdfs.forensics.hashing) meanwhile. The
lines name the file as a mount shows it, relative to the mount root
(`<datastore>/<ivd-uuid>/<snapshot-id>/disk.raw` or `.../partN.raw`), so `sha256sum -c` and
`md5sum -c` run in the root of an ivdfs mount check them against the mount.

Concurrency: main thread; the reading runs in trio on it (VDDK's Open and Close happen on it,
reads on the disk's I/O thread).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

from ivdfs import signals
from ivdfs.commands.common import human_size, session
from ivdfs.config import ACCESS_IDENTITY, ServerConfig, VddkOptions
from ivdfs.errors import ExitCode, NotFound
from ivdfs.forensics.hashing import Digester
from ivdfs.inventory.model import DiskTarget
from ivdfs.io.block_cache import BlockCache
from ivdfs.io.prefetch import DEFAULT_IN_FLIGHT as PREFETCH_IN_FLIGHT
from ivdfs.io.prefetch import Prefetcher
from ivdfs.io.probe import read_table
from ivdfs.io.reader import DiskReader
from ivdfs.settings import default
from ivdfs.vddk import oneshot
from ivdfs.vddk.connection import ServerTarget
from ivdfs.vddk.disk import OpenDisk

BACKLOG = 32 << 20  # bytes read but not hashed yet before reading waits
ALGORITHMS = {"both": ("sha256", "md5"), "sha256": ("sha256",), "md5": ("md5",)}
_TAGS = {"sha256": "SHA256", "md5": "MD5"}


def hash_snapshot(
    server: ServerConfig,
    vddk: VddkOptions,
    transport: str | None,
    ivd_text: str,
    snapshot_id: str,
    partition: int | None,
    algorithm: str,
) -> int:
    with session(server) as vs:
        ivd = vs.find_ivd(ivd_text)
        snap = vs.find_snapshot(ivd, snapshot_id)
        name = f"{ivd.datastore.name}/{ivd.id}/{snap.id}/" + (
            f"part{partition}.raw" if partition is not None else "disk.raw"
        )
        where = ServerTarget.of(server, vs.thumbprint, vddk.nfc_host_port)
        target = DiskTarget.of(ivd, snap)
        with (
            signals.interruptible(),
            oneshot.library(vddk) as lib,
            oneshot.access(lib, where, target, ACCESS_IDENTITY),
            oneshot.disk(lib, where, target, transport) as disk,
        ):
            digests = _run(disk, partition, ALGORITHMS[algorithm], name)
    for line in format_lines(name, digests):
        print(line)
    sys.stdout.flush()
    return ExitCode.OK


def format_lines(name: str, digests: dict[str, str]) -> list[str]:
    """One algorithm: its tool's `<hex>  <name>` line; both: tagged (BSD) lines, which
    sha256sum -c and md5sum -c also read. Names with a backslash or newline are escaped the
    way GNU coreutils does (a leading backslash)."""
    escaped = name.replace("\\", "\\\\").replace("\n", "\\n")
    mark = "\\" if escaped != name else ""
    if len(digests) == 1:
        ((_, hexdigest),) = digests.items()
        return [f"{mark}{hexdigest}  {escaped}"]
    return [f"{mark}{_TAGS[a]} ({escaped}) = {digests[a]}" for a in ("sha256", "md5")]


def _run(
    disk: OpenDisk, partition: int | None, algorithms: tuple[str, ...], name: str
) -> dict[str, str]:
    """Hash in trio; a stop signal meanwhile ends it as Ctrl-C does."""
    stopped: list[int] = []

    async def main() -> dict[str, str] | None:
        result = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(signals.cancel_on_stop, nursery.cancel_scope, stopped)
            result = await _hash_disk(disk, partition, algorithms, name, nursery)
            nursery.cancel_scope.cancel()
        return result

    try:
        result = trio.run(main)
    except BaseExceptionGroup as group:
        # The nursery wraps what ended it: one error (a VDDK failure, no such partition) is
        # the command's, with its own message and exit code.
        while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
            group = group.exceptions[0]
        raise group from None
    if stopped or result is None:
        raise KeyboardInterrupt
    return result


async def _hash_disk(
    disk: OpenDisk,
    partition: int | None,
    algorithms: tuple[str, ...],
    name: str,
    nursery: trio.Nursery,
) -> dict[str, str]:
    block, ahead = default("block_size"), default("prefetch")
    prefetcher = Prefetcher(min(ahead, PREFETCH_IN_FLIGHT))
    await nursery.start(prefetcher.run)
    # Room for the read-ahead window twice over: each block is read once.
    cache = BlockCache((2 * ahead + 2) * block)
    reader = DiskReader(
        "hash", disk.capacity, block, cache, disk.read, disk.allocated, prefetcher, ahead
    )
    start, end = 0, disk.capacity
    if partition is not None:
        table = await read_table(reader, disk.sector_size)
        found = {p.number: p for p in table.partitions}
        if partition not in found:
            have = ", ".join(str(n) for n in sorted(found)) or "none"
            t = disk.target
            raise NotFound(
                f"IVD {t.ivd_id} snapshot {t.snapshot_id} has no partition {partition} "
                f"(partitions: {have})"
            )
        start, end = found[partition].start, found[partition].start + found[partition].length
    digester = Digester(algorithms)
    stream = reader.open_stream()
    try:
        with _progress(name, end - start) as progress:
            pos = start
            while pos < end:
                # Whole blocks of the disk, as the reader and its allocation map count them.
                piece_end = min(end, (pos // block + 1) * block)
                digester.update(await reader.read(pos, piece_end - pos, stream))
                pos = piece_end
                if digester.backlog > BACKLOG:
                    await trio.to_thread.run_sync(digester.wait_below, BACKLOG // 2)
                progress(pos - start)
            return await trio.to_thread.run_sync(digester.result)
    except BaseException:
        digester.cancel()
        raise


@contextmanager
def _progress(name: str, total: int) -> Iterator[Callable[[int], None]]:
    """On a terminal: '<name>: 45% (1.2 GiB of 2.6 GiB), 310 MiB/s', redrawn 5 times a second."""
    tty = sys.stderr.isatty()
    t0 = last = time.monotonic()

    def update(done: int) -> None:
        nonlocal last
        now = time.monotonic()
        if not tty or (now - last < 0.2 and done < total):
            return
        last = now
        rate = done / max(now - t0, 1e-6)
        pct = 100 * done // total if total else 100
        sys.stderr.write(
            f"\r{name}: {pct}% ({human_size(done)} of {human_size(total)}), "
            f"{human_size(int(rate))}/s   "
        )
        sys.stderr.flush()

    try:
        yield update
    finally:
        if tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
