"""`ivdfs hash`: SHA-256 and MD5 of a snapshot's disk (or one partition), read through VDDK.

Reads as `check` does, in this process, between PrepareForAccess and EndAccess (always paired,
even when Prepare fails or the read is interrupted; SIGTERM and SIGHUP stop it like Ctrl-C).
Regions that QueryAllocatedBlocks reports unallocated are not read: they hash as the zeros
disk.raw shows for them. Over NBD/NBDSSL up to IN_FLIGHT reads are in flight; hashing runs on
pool threads (ivdfs.forensics.hashing) meanwhile. The lines name the file as a mount shows it,
relative to the mount root (`<datastore>/<ivd-uuid>/<snapshot-id>/disk.raw` or
`.../partN.raw`), so `sha256sum -c` and `md5sum -c` run in the root of an ivdfs mount check
them against the mount.

Main thread only: VDDK's Open, Read and Close happen on it.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from ivdfs.commands.common import human_size, session
from ivdfs.config import ACCESS_IDENTITY, ServerConfig
from ivdfs.errors import BackendError, ExitCode, NotFound
from ivdfs.forensics.hashing import Digester
from ivdfs.formats.partitions import parse
from ivdfs.inventory.model import DiskTarget
from ivdfs.io.holes import MAX_CHUNKS_PER_QUERY, query_chunk_sectors
from ivdfs.units import SECTOR_SIZE
from ivdfs.vddk.connection import Access, AsyncRead, DiskHandle, ServerTarget
from ivdfs.vddk.errors import VddkError
from ivdfs.vddk.library import VddkLibrary

log = logging.getLogger(__name__)

BLOCK = 1 << 20  # bytes per VDDK read (at most 2 MiB per request)
BACKLOG = 32 << 20  # bytes read but not hashed yet before reading waits
IN_FLIGHT = 8  # ReadAsync requests of BLOCK bytes, as a mount's default --max-in-flight
_VIX_E_NOT_SUPPORTED = 6
ALGORITHMS = {"both": ("sha256", "md5"), "sha256": ("sha256",), "md5": ("md5",)}
_TAGS = {"sha256": "SHA256", "md5": "MD5"}


def hash_snapshot(
    server: ServerConfig,
    libdir: Path,
    vddk_config: Path | None,
    transport: str | None,
    nfc_host_port: int,
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
        lib = VddkLibrary(libdir)
        lib.init(vddk_config)
        s = server
        target = DiskTarget.of(ivd, snap)
        where = ServerTarget(s.host, s.port, s.user, s.password, vs.thumbprint, nfc_host_port)
        try:
            with _stop_signals_interrupt():
                digests = _hash_target(lib, where, target, transport, partition, algorithm, name)
        finally:
            with _signals_deferred():
                lib.exit()
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


def _hash_target(
    lib: VddkLibrary,
    where: ServerTarget,
    target: DiskTarget,
    transport: str | None,
    partition: int | None,
    algorithm: str,
    name: str,
) -> dict[str, str]:
    access = Access(lib, where, target, ACCESS_IDENTITY)
    try:
        try:
            access.prepare()
        except BackendError as e:
            # Prepare only keeps vMotion off while we read; the snapshot stays readable.
            log.warning("%s (reading anyway)", e)
        handle = DiskHandle(lib, where, target, transport)
        try:
            handle.open()
            return _hash_disk(handle, partition, ALGORITHMS[algorithm], name)
        finally:
            with _signals_deferred():
                try:
                    handle.close()
                except BackendError as e:
                    log.warning("closing %s: %s", target.describe(), e)
    finally:
        with _signals_deferred():
            try:
                access.end()
            except BackendError as e:
                log.warning("EndAccess for %s: %s (ivdfs end-access retries it)", target.ivd_id, e)


def _hash_disk(
    handle: DiskHandle, partition: int | None, algorithms: tuple[str, ...], name: str
) -> dict[str, str]:
    size = handle.capacity_bytes
    start, end = 0, size
    if partition is not None:
        table = parse(lambda off, n: _read_bytes(handle, off, n), size, handle.sector_size)
        found = {p.number: p for p in table.partitions}
        if partition not in found:
            have = ", ".join(str(n) for n in sorted(found)) or "none"
            raise NotFound(
                f"{target_text(handle)} has no partition {partition} (partitions: {have})"
            )
        p = found[partition]
        start, end = p.start, p.start + p.length
    allocated = _Allocated(_allocated_runs(handle, start, end))
    digester = Digester(algorithms)
    reader = _Pipeline(handle, IN_FLIGHT if handle.truly_async else 1)
    read_bytes = 0
    with _progress(name, end - start) as progress:
        try:
            pos = start
            while pos < end:
                # Whole blocks of the disk, so holes and reads line up with the allocation map.
                piece_end = min(end, (pos // BLOCK + 1) * BLOCK)
                if allocated.any(pos, piece_end):
                    reader.read(pos, piece_end - pos)
                    read_bytes += piece_end - pos
                else:
                    reader.zeros(piece_end - pos)
                pos = piece_end
                for data in reader.ready():
                    digester.update(data)
                if digester.backlog > BACKLOG:
                    digester.wait_below(BACKLOG // 2)
                progress(pos - start)
            for data in reader.rest():
                digester.update(data)
        finally:
            reader.drain()
        result = digester.result()
    log.debug("%s: read %d of %d bytes (the rest unallocated)", name, read_bytes, end - start)
    return result


class _Pipeline:
    """Reads in order with up to `depth` ReadAsync requests in flight (only NBD/NBDSSL
    overlap them; other transports read one block at a time), zeros for holes in between."""

    def __init__(self, handle: DiskHandle, depth: int) -> None:
        self._handle = handle
        self._depth = depth
        self._queue: deque[tuple[AsyncRead, threading.Event] | int] = deque()
        self._zeros = bytes(BLOCK)

    def read(self, offset: int, n: int) -> None:
        if self._depth == 1:
            buf = bytearray(n)
            self._handle.read_into(offset // SECTOR_SIZE, buf)
            done = threading.Event()
            done.set()
            self._queue.append((AsyncRead(offset // SECTOR_SIZE, buf, lambda _r: None), done))
            return
        done = threading.Event()
        req = AsyncRead(offset // SECTOR_SIZE, bytearray(n), lambda _r: done.set())
        self._handle.read_async(req)  # never raises: a failure comes back through `req`
        self._queue.append((req, done))

    def zeros(self, n: int) -> None:
        self._queue.append(n)

    def _pop(self) -> memoryview:
        item = self._queue.popleft()
        if isinstance(item, int):
            return memoryview(self._zeros)[:item]
        req, done = item
        done.wait()
        if req.error is not None:
            raise req.error
        return memoryview(req.buf)

    def ready(self) -> Iterator[memoryview]:
        """Blocks in order, leaving fewer than `depth` requests in flight: the next `read`
        makes `depth` at most (ESXi's NFC server bounds each session's memory)."""
        while self._queue and (len(self._queue) >= self._depth or isinstance(self._queue[0], int)):
            yield self._pop()

    def rest(self) -> Iterator[memoryview]:
        while self._queue:
            yield self._pop()

    def drain(self) -> None:
        """Every request the library holds has called back (before Close)."""
        if self._queue and self._depth > 1:
            with _signals_deferred():
                self._handle.wait()
        self._queue.clear()


def target_text(handle: DiskHandle) -> str:
    t = handle.target
    return f"IVD {t.ivd_id} snapshot {t.snapshot_id}"


def _read_bytes(handle: DiskHandle, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of the disk, clipped to it, read in whole sectors."""
    end = min(offset + length, handle.capacity_bytes)
    if offset >= end:
        return b""
    first = offset // SECTOR_SIZE
    last = (end + SECTOR_SIZE - 1) // SECTOR_SIZE
    buf = bytearray((last - first) * SECTOR_SIZE)
    view = memoryview(buf)
    step = 2 * BLOCK // SECTOR_SIZE  # VDDK's largest request
    for s in range(first, last, step):
        n = min(step, last - s)
        handle.read_into(s, view[(s - first) * SECTOR_SIZE : (s - first + n) * SECTOR_SIZE])
    skip = offset - first * SECTOR_SIZE
    return bytes(view[skip : skip + end - offset])


def _allocated_runs(handle: DiskHandle, start: int, end: int) -> list[tuple[int, int]]:
    """Allocated [start, end) byte runs covering the window, sorted and disjoint; the whole
    window when the library cannot tell. VDDK's rules: a power-of-two chunk, whole chunks
    inside the disk, at most MAX_CHUNKS_PER_QUERY per call (see ivdfs.io.holes)."""
    capacity = handle.capacity_sectors
    chunk = query_chunk_sectors(BLOCK // SECTOR_SIZE, capacity)
    whole = [(start, end)]
    if not chunk or not handle.can_query_allocated:
        return whole
    queryable_end = capacity // chunk * chunk
    first = start // SECTOR_SIZE // chunk * chunk
    last = min(-(-end // SECTOR_SIZE // chunk) * chunk, queryable_end)
    runs: list[tuple[int, int]] = []
    try:
        pos = first
        while pos < last:
            n = min(last - pos, MAX_CHUNKS_PER_QUERY * chunk)
            for s, length in handle.query_allocated(pos, n, chunk):
                runs.append((s * SECTOR_SIZE, (s + length) * SECTOR_SIZE))
            pos += n
    except VddkError as e:
        if e.code != _VIX_E_NOT_SUPPORTED:
            log.warning("QueryAllocatedBlocks failed; reading every block: %s", e)
        return whole
    # Past the last whole chunk nothing can be asked: read it.
    if queryable_end * SECTOR_SIZE < end:
        runs.append((queryable_end * SECTOR_SIZE, end))
    runs.sort()
    merged: list[tuple[int, int]] = []
    for lo, hi in runs:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


class _Allocated:
    """Whether a piece holds allocated bytes, for pieces asked in increasing order."""

    def __init__(self, runs: list[tuple[int, int]]) -> None:
        self._runs = runs
        self._i = 0

    def any(self, start: int, end: int) -> bool:
        while self._i < len(self._runs) and self._runs[self._i][1] <= start:
            self._i += 1
        return self._i < len(self._runs) and self._runs[self._i][0] < end


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


@contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the read like Ctrl-C, so the handle closes and EndAccess runs."""

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Clean-up that a second Ctrl-C must not cut short (EndAccess above all)."""
    stops = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
