"""Disk lifetime, access and the connection cap under the settings real deployments use (issue
25 #2): the defaults (--idle-timeout 60, --max-connections 8), idle timeouts of hours, a dozen
disks competing for eight connections, busy disks taking turns for two, and the memory of
failures (opens that fail, refused logins, blocks that fail), with time under the test's hand.

DiskService takes its clock: here it is trio's MockClock (`clock=trio.current_time`), so the
service's deadlines (its reaper's, the cap's turns) are trio deadlines that the scenario jumps
past without waiting: eight hours pass in milliseconds. Below the service is the stand-in VDDK
(real connections, handles and reads, and its call log as the witness: an open is a ConnectEx
and an Open, access a PrepareForAccess whose EndAccess the log must show). After each jump the
scenario waits until the service is at rest (`World.settle`: every task blocked, nothing
queued on its control thread or running in a worker thread, no VDDK call made in two rounds),
never for a while of real time.

Each scenario runs in a process of its own (`python -m tests.t2_lifetime_clock SCENARIO`; the
stand-in reads its settings once per process, at InitEx) and asserts as it goes; the test
checks that it finished and that the stand-in's log is clean (no rule broken, every Prepare
ended, every handle and connection closed).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import REPO, VDDK_LIBDIR, call_lines, check_standin_lines, most_connections
from tests.testbed.vsphere import record_ivd

MiB = 1 << 20
DS = "datastore-7"
HOUR = 3600.0
STEP = 0.1  # the turns scenario moves time in steps of this, each reader reads once a step
FAILED = "scenario failed: "


def ivd_id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def image_bytes(ivd: str, snap: str, size: int = 2 * MiB) -> bytes:
    """Every snapshot's own bytes: a block read from the wrong disk never compares equal."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{ivd}/{snap}/{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


# --- the test side ---------------------------------------------------------------------------


def run_scenario(tmp_path: Path, scenario: str, **env: str) -> dict[str, Any]:
    """Run one scenario in its own process; its result, once the stand-in's log is clean."""
    images = tmp_path / "images"
    log = tmp_path / "standin.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("IVDFS_", "VDDK_"))}
    full_env.update(VDDK_STANDIN_IMAGES=str(images), VDDK_STANDIN_LOG=str(log),
                    PYTHONPATH=str(REPO), **env)  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "tests.t2_lifetime_clock", scenario, str(images)],
        env=full_env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    if proc.returncode != 0:
        why = [ln for ln in proc.stderr.splitlines() if ln.startswith(FAILED)]
        pytest.fail(f"{why[-1] if why else 'the scenario died'}\n{proc.stderr[-3000:]}")
    check_standin_lines(log.read_text().splitlines())
    return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_defaults_a_probe_closes_in_seconds_a_released_file_after_a_minute(
    tmp_path: Path,
) -> None:
    """--idle-timeout 60: a disk opened only for a lookup closes (and its IVD is ended) within
    seconds; a file held for minutes without a read keeps its disk; once released, the disk
    stays a minute, then closes by itself, and reopens (prepared again) at the next read."""
    r = run_scenario(tmp_path, "defaults")
    assert r["opens"] == 3 and r["prepares"] == r["ends"] == 3


def test_hours_of_idle_timeout_keep_a_disk_and_its_ivd_for_hours_not_a_probe(
    tmp_path: Path,
) -> None:
    """--idle-timeout 8h (an overnight restore): two snapshots of one IVD used four hours
    apart each keep their disk eight hours after their last use, and the IVD stays prepared
    until the later one lapses; a probe among them still closes in seconds."""
    r = run_scenario(tmp_path, "long_idle")
    assert r["prepares"] == r["ends"] == 2


def test_a_dozen_disks_compete_for_eight_connections(tmp_path: Path) -> None:
    """--max-connections 8: the ninth disk takes the connection of the least recently used
    disk nobody holds (never an open file's); an evicted IVD stays prepared while it is in use
    (its file open, or used within the idle timeout), so opening it again costs an Open, not a
    PrepareForAccess; held disks are closed for others only when nothing unheld is left."""
    r = run_scenario(tmp_path, "cap")
    assert r["most_connections"] == 8
    assert r["prepares"] == r["ends"] == 13


def test_busy_disks_take_fair_turns_on_two_connections(tmp_path: Path) -> None:
    """Four disks read continuously by two readers each, two connections: every disk gets its
    share, each open serves a turn of at least MIN_OPEN (no open per read), no read waits
    longer than the turns ahead of it, and each IVD is prepared once."""
    r = run_scenario(tmp_path, "turns")
    assert r["prepares"] == r["ends"] == 4


def test_a_busy_disk_gives_its_turn_by_age(tmp_path: Path) -> None:
    """With two connections in use by busy disks, a third takes the connection of the one open
    longest, never of the one that got its turn last."""
    run_scenario(tmp_path, "turn_order")


def test_a_busy_disk_chosen_for_another_drains_then_yields(tmp_path: Path) -> None:
    """A disk whose connection another wants admits no new read once chosen: the reads in
    flight end and it closes, however many readers it has (slow reads, always one in flight);
    else the other would wait for as long as anyone reads it."""
    slow = {"VDDK_STANDIN_SLOW_IVD": ivd_id(0), "VDDK_STANDIN_SLOW_US": "20000"}
    run_scenario(tmp_path, "drain", **slow)


@pytest.mark.parametrize("kind", ["open", "login", "block"])
def test_failures_are_remembered_not_hammered(tmp_path: Path, kind: str) -> None:
    """A disk that cannot open is tried again at growing intervals; a refused login stops every
    open for a minute (each is a login that counts towards an account lockout); a block that
    failed for good fails fast for a while, then is tried again."""
    env = {
        "open": {"VDDK_STANDIN_FAIL_OPEN": "1"},
        "login": {"VDDK_STANDIN_PASSWORD": "right"},
        "block": {"VDDK_STANDIN_FAIL_READ_NTH": "1", "VDDK_STANDIN_FAIL_CODE": "13"},
    }[kind]
    run_scenario(tmp_path, f"failed_{kind}", **env)


# --- the scenario side (in its own process) --------------------------------------------------


class World:
    """The service under a mock clock, over the stand-in, with what a scenario needs."""

    def __init__(self, images: Path, clock: Any, **limits: Any) -> None:
        import trio

        from ivdfs.config import Secret
        from ivdfs.vddk.connection import ServerTarget
        from ivdfs.vddk.library import VddkLibrary
        from ivdfs.vddk.service import DiskService, Limits

        self.images = images
        self.clock = clock
        self.log = Path(os.environ["VDDK_STANDIN_LOG"])
        self.lib = VddkLibrary(VDDK_LIBDIR)
        self.lib.init()
        password = limits.pop("password", "pw")
        self.service = DiskService(
            self.lib, ServerTarget("standin.invalid", 443, "user", Secret(password), "AA:BB"),
            "ivdfs lifetime test", limits=Limits(**limits), clock=trio.current_time,
        )  # fmt: skip
        self._slots: dict[tuple[int, str], Any] = {}

    # time

    def now(self) -> float:
        import trio

        return trio.current_time()

    async def settle(self) -> None:
        """Until the service is at rest: every task blocked, its control thread idle, no
        worker thread busy, no read in flight (a ReadAsync completes on a VDDK thread, which
        a loaded machine may delay past any cushion: the read would end a step late), and two
        rounds in a row without a VDDK call (a task woken by the first round's control-thread
        job may queue another, which the second round runs)."""
        import trio
        import trio.testing

        limiter = trio.to_thread.current_default_thread_limiter()
        deadline = time.monotonic() + 60
        quiet, last = 0, None
        while quiet < 2:
            # The cushion (real seconds): trio waits for events meanwhile, so a round with
            # work in a thread polls instead of spinning (a tight loop starves those threads
            # on a busy machine).
            await trio.testing.wait_all_tasks_blocked(cushion=0.001)
            await self.service.run_on_control(lambda: None)
            await trio.testing.wait_all_tasks_blocked(cushion=0.001)
            busy = limiter.statistics().borrowed_tokens + self.service.report()["reads_in_flight"]
            sig = (self.calls(), busy, json.dumps(self.service.report(), sort_keys=True))
            quiet = quiet + 1 if sig == last and busy == 0 else 0
            last = sig
            assert time.monotonic() < deadline, "the service never came to rest"

    async def at(self, t: float) -> None:
        """Move the clock to `t` (never back), and let the service act on it."""
        assert t >= self.now()
        self.clock.jump(t - self.now())
        await self.settle()

    # disks

    def slot(self, ivd: int, snap: str = "s") -> Any:
        from ivdfs.inventory.model import DiskTarget

        key = (ivd, snap)
        if key not in self._slots:
            self._slots[key] = self.service.slot(DiskTarget(ivd_id(ivd), DS, snap))
        return self._slots[key]

    async def open_file(self, ivd: int, snap: str = "s") -> Any:
        """What a lookup and an open of disk.raw do: the size (opens the disk), then hold."""
        slot = self.slot(ivd, snap)
        assert await self.service.capacity(slot) == 2 * MiB
        self.service.hold(slot)
        return slot

    async def read(self, ivd: int, snap: str = "s", block: int = 0) -> None:
        """One 1 MiB block, compared with the image."""
        data = await self.service.read(self.slot(ivd, snap), block * 2048, MiB)
        want = image_bytes(ivd_id(ivd), snap)[block * MiB : (block + 1) * MiB]
        assert bytes(data) == want, f"wrong bytes from IVD {ivd} snapshot {snap}"

    # what the stand-in saw

    def calls(self, fn: str | None = None) -> int:
        stats = self.lib.stats.snapshot()
        if fn is None:
            return sum(s.calls for s in stats.values())
        return stats[f"VixDiskLib_{fn}"].calls if f"VixDiskLib_{fn}" in stats else 0

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def open_ivds(self) -> Counter[int]:
        """IVD number -> handles open now, from the log."""
        lines = self.lines()
        of = {o["handle"]: o["path"] for o in call_lines(lines, "Open") if o["err"] == "0"}
        for c in call_lines(lines, "Close"):
            of.pop(c["handle"], None)
        return Counter(int(p.rsplit("-", 1)[1]) for p in of.values())

    def prepared(self) -> set[int]:
        """IVD numbers prepared and not ended, from the log."""
        lines = self.lines()
        n = Counter(p["id"] for p in call_lines(lines, "PrepareForAccess"))
        n.subtract(e["id"] for e in call_lines(lines, "EndAccess"))
        return {int(i.rsplit("-", 1)[1]) for i, k in n.items() if k > 0}

    def access_calls(self, ivd: int) -> tuple[int, int]:
        """(PrepareForAccess, EndAccess) calls for one IVD so far."""
        lines = self.lines()
        i = ivd_id(ivd)
        return (sum(p["id"] == i for p in call_lines(lines, "PrepareForAccess")),
                sum(e["id"] == i for e in call_lines(lines, "EndAccess")))  # fmt: skip

    def most_connections(self) -> int:
        return most_connections(self.lines())

    def result(self, **extra: Any) -> dict[str, Any]:
        return {"opens": self.calls("Open"), "prepares": self.calls("PrepareForAccess"),
                "ends": self.calls("EndAccess"), "most_connections": self.most_connections(),
                **extra}  # fmt: skip


async def defaults(w: World) -> dict[str, Any]:
    lim = w.service.limits
    assert (lim.idle_timeout, lim.max_connections) == (60, 8)  # what a mount gets by default
    # A lookup of one snapshot (its size, its partition table), and a file opened on another.
    assert await w.service.capacity(w.slot(1)) == 2 * MiB
    await w.open_file(2)
    await w.read(2)
    await w.at(10)
    assert w.open_ivds() == {2: 1}, "the probed disk outlived its lookup by seconds"
    assert w.prepared() == {2}, "the probed IVD's access outlived its lookup"
    # A file held open is never idle, however long nobody reads it.
    await w.at(100)
    assert w.open_ivds() == {2: 1} and w.calls("Open") == 2
    w.service.release(w.slot(2))
    # Closed: the disk stays for --idle-timeout after the release (not after the last read,
    # nor a probe's few seconds) ...
    await w.at(159)
    assert w.open_ivds() == {2: 1} and w.prepared() == {2}
    # ... then closes and ends its access with nothing else happening to wake the service.
    await w.at(161)
    assert w.open_ivds() == {} and w.prepared() == set()
    # The next read opens and prepares it again.
    w.service.hold(w.slot(2))
    await w.read(2, block=1)
    assert w.access_calls(2) == (2, 1) and w.open_ivds() == {2: 1}
    w.service.release(w.slot(2))
    await w.at(161 + 61)
    assert w.open_ivds() == {} and w.prepared() == set()
    return w.result()


async def long_idle(w: World) -> dict[str, Any]:
    assert w.service.limits.idle_timeout == 8 * HOUR
    # Two snapshots of IVD 3, each read through a file, four hours apart.
    await w.open_file(3, "a")
    await w.read(3, "a")
    w.service.release(w.slot(3, "a"))
    await w.at(4 * HOUR)
    await w.open_file(3, "b")
    await w.read(3, "b")
    w.service.release(w.slot(3, "b"))
    # A lookup of another IVD in between closes in seconds, hours of idle timeout or not.
    await w.at(5 * HOUR)
    assert await w.service.capacity(w.slot(4)) == 2 * MiB
    await w.at(5 * HOUR + 10)
    assert w.open_ivds() == {3: 2} and w.prepared() == {3}
    await w.at(8 * HOUR - 1)
    assert w.open_ivds() == {3: 2}
    await w.at(8 * HOUR + 1)
    assert w.open_ivds() == {3: 1}, "snapshot a did not close 8 h after its use"
    assert w.prepared() == {3}, "the IVD was ended though snapshot b was used 4 h ago"
    await w.at(12 * HOUR - 1)
    assert w.open_ivds() == {3: 1} and w.prepared() == {3}
    await w.at(12 * HOUR + 1)
    assert w.open_ivds() == {} and w.prepared() == set()
    assert w.access_calls(3) == (1, 1)
    return w.result()


async def cap(w: World) -> dict[str, Any]:
    assert w.service.limits.max_connections == 8
    # Eight files at t = 0..7: those of IVDs 0-3 closed again at once (their IVDs in use for
    # another minute), those of IVDs 4-7 held open.
    for i in range(8):
        await w.at(i)
        await w.open_file(i)
        await w.read(i)
        if i < 4:
            w.service.release(w.slot(i))
    await w.settle()
    assert sorted(w.open_ivds()) == list(range(8))
    # A ninth disk: the connection of the least recently used disk nobody holds (IVD 0) ...
    await w.at(8)
    assert await w.service.capacity(w.slot(8)) == 2 * MiB
    await w.settle()
    assert sorted(w.open_ivds()) == [1, 2, 3, 4, 5, 6, 7, 8], "the wrong disk was evicted"
    # ... whose IVD stays prepared: its file was closed 8 s ago, within the idle timeout.
    assert 0 in w.prepared(), "an evicted IVD still in use lost its access"
    # Three more lookups take IVDs 1-3's connections, in their order of last use.
    for i in (9, 10, 11):
        await w.at(i)
        assert await w.service.capacity(w.slot(i)) == 2 * MiB
        await w.settle()
        assert sorted(w.open_ivds()) == [*range(i - 7, 8), *range(8, i + 1)]
    assert w.prepared() == set(range(12))
    # IVD 0's file again: the least recently used unheld disk (the probe of IVD 8) makes room,
    # and IVD 0 reopens without a second PrepareForAccess.
    await w.at(12)
    await w.open_file(0)
    await w.read(0, block=1)
    assert sorted(w.open_ivds()) == [0, 4, 5, 6, 7, 9, 10, 11]
    assert w.access_calls(0) == (1, 0), "reopening an IVD in use prepared it again"
    # Every open disk held now: a thirteenth takes the held one unread longest (IVD 4, read
    # at t = 4), whose IVD stays prepared for as long as its file is open.
    for i in (9, 10, 11):
        await w.open_file(i)
    await w.at(13)
    assert await w.service.capacity(w.slot(12)) == 2 * MiB
    await w.settle()
    assert sorted(w.open_ivds()) == [0, 5, 6, 7, 9, 10, 11, 12]
    await w.at(59)
    assert w.prepared() == set(range(13)) - {8, 12}, "an IVD ended while in use"
    await w.at(200)
    # IVDs 1-3 (files closed, disks evicted) ended a minute after their use; the probes of 8
    # and 12 in seconds; IVD 4 is still held.
    assert w.prepared() == {0, 4, 5, 6, 7, 9, 10, 11}
    assert w.access_calls(4) == (1, 0)
    await w.read(4, block=1)  # the held file of the evicted disk reads again: reopened
    assert w.access_calls(4) == (1, 0)
    for i in (0, 4, 5, 6, 7, 9, 10, 11):
        w.service.release(w.slot(i))
    await w.at(261)
    assert w.open_ivds() == {} and w.prepared() == set()
    assert w.service.report()["connections"] == 0
    return w.result()


async def turns(w: World) -> dict[str, Any]:
    import random

    import trio

    lim = w.service.limits
    assert lim.max_connections == 2
    disks = 4
    waits: list[float] = []
    reads: Counter[int] = Counter()
    stop = 30.0  # ten turns of each disk

    async def reader(ivd: int, k: int) -> None:
        rng = random.Random(ivd * 10 + k)
        await trio.sleep(STEP / 2 * k)
        while w.now() < stop:
            t0 = w.now()
            await w.read(ivd, block=rng.randrange(2))
            waits.append(w.now() - t0)
            reads[ivd] += 1
            await trio.sleep(STEP)  # what the reader does with the block

    for i in range(disks):
        w.service.hold(w.slot(i))  # each disk's file is open; the readers' reads open it
    async with trio.open_nursery() as n:
        for i in range(disks):
            for k in range(2):
                n.start_soon(reader, i, k)
        t = 0.0
        while t < stop + 1:
            t = round(t + STEP, 2)
            await w.at(t)
    assert w.most_connections() == 2
    # Every disk got its share: none starved, none kept a connection for good.
    assert min(reads.values()) >= 0.6 * max(reads.values()), reads
    # An open serves a turn of MIN_OPEN seconds or more, not a read or a few.
    turns_max = 2 * stop / lim.min_open + disks
    assert w.calls("Open") <= turns_max, (w.calls("Open"), turns_max)
    # A read waits at most for the turns ahead of it: with FIFO turns, one.
    ahead = (disks - lim.max_connections) // lim.max_connections
    assert max(waits) <= ahead * lim.min_open + STEP, max(waits)
    assert w.prepared() == set(range(disks)) and w.calls("PrepareForAccess") == disks
    for i in range(disks):
        w.service.release(w.slot(i))
    await w.at(stop + 62)
    assert w.open_ivds() == {} and w.prepared() == set()
    return w.result(reads=dict(reads), longest_wait=max(waits))


async def turn_order(w: World) -> dict[str, Any]:
    """Two busy disks opened five seconds apart, and a third wants a connection: it takes the
    one open longest, once that has had its MIN_OPEN, never the one that just got its turn."""
    lim = w.service.limits
    assert lim.max_connections == 2 and lim.min_open < 5
    for i in range(3):
        w.service.hold(w.slot(i))
    await w.read(0)
    await w.at(5)
    await w.read(1)
    await w.at(10)
    await w.read(0, block=1)  # both in use: read within the last IN_USE_GAP
    await w.read(1, block=1)
    await w.at(10.1)
    await w.read(2)
    assert sorted(w.open_ivds()) == [1, 2], "the disk that got its turn last lost it"
    # Both past MIN_OPEN again (IVD 1 open since 5, IVD 2 since 10.1): IVD 0's read takes
    # IVD 1's connection.
    await w.at(13.2)
    await w.read(1, block=0)
    await w.read(2, block=0)
    await w.at(13.3)
    await w.read(0)
    assert sorted(w.open_ivds()) == [0, 2], "the disk that got its turn last lost it"
    for i in range(3):
        w.service.release(w.slot(i))
    await w.at(80)
    assert w.open_ivds() == {} and w.prepared() == set()
    return w.result()


async def drain(w: World) -> dict[str, Any]:
    """One connection, held by IVD 0, which three readers keep busy (its reads are slow, so
    some are always in flight); IVD 2 wants the connection once IVD 0 had its MIN_OPEN."""
    import trio

    lim = w.service.limits
    assert lim.max_connections == 1
    budget = 30
    done: Counter[int] = Counter()
    started = trio.Event()

    async def reader(k: int) -> None:
        for j in range(budget):
            await w.read(0, block=(j + k) % 2)
            done[k] += 1
            if sum(done.values()) == 6:
                started.set()

    w.service.hold(w.slot(0))
    await w.read(0)
    await w.at(lim.min_open + 2)
    async with trio.open_nursery() as n:
        for k in range(3):
            n.start_soon(reader, k)
        await started.wait()
        asked = sum(done.values())
        await w.read(2)  # IVD 2's first read: it needs IVD 0's connection
        # IVD 0 was chosen: it admitted no new read, the (at most three) reads in flight ended,
        # it closed, and IVD 2 read; IVD 0's readers go on once IVD 2 (held by nobody) is idle.
        assert sum(done.values()) - asked <= 3, (asked, dict(done))
    assert sum(done.values()) == 3 * budget
    w.service.release(w.slot(0))
    await w.at(100)
    assert w.open_ivds() == {} and w.prepared() == set()
    return w.result(asked=asked)


async def failed_open(w: World) -> dict[str, Any]:
    """Every Open fails (14009, transient): asked twice a second for five minutes."""
    from ivdfs.errors import BackendError

    attempts = []
    t = 0.0
    while t <= 300:
        await w.at(t)
        before = w.calls("Open")
        try:
            await w.service.capacity(w.slot(1))
        except BackendError:
            pass
        else:
            raise AssertionError("the injected Open failure did not fail")
        if w.calls("Open") > before:
            attempts.append(t)
        t += 0.5
    # Growing waits between attempts, up to a minute: about a dozen, not 600.
    assert 10 <= len(attempts) <= 16, attempts
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps == sorted(gaps) and gaps[-1] <= 60 + 0.5, gaps
    return w.result(attempts=attempts)


async def failed_login(w: World) -> dict[str, Any]:
    """The stand-in refuses our password (35): asked for three disks in turn, every second."""
    from ivdfs.errors import BackendError

    attempts = []
    for t in range(130):
        await w.at(t)
        before = w.calls("ConnectEx")
        with pytest.raises(BackendError):
            await w.service.capacity(w.slot(1 + t % 3))
        if w.calls("ConnectEx") > before:
            attempts.append(t)
    # One login a minute, whichever disk asks.
    assert attempts == [0, 60, 120], attempts
    return w.result(attempts=attempts)


async def failed_block(w: World) -> dict[str, Any]:
    """The first read request fails with 13 (permanent)."""
    from ivdfs.errors import BackendError

    await w.open_file(1)
    reads = w.calls("ReadAsync") + w.calls("Read")
    with pytest.raises(BackendError):
        await w.read(1, block=0)
    assert w.calls("ReadAsync") + w.calls("Read") == reads + 1  # permanent: one attempt
    await w.at(1)
    with pytest.raises(BackendError):
        await w.read(1, block=0)  # fails fast, no VDDK call
    assert w.calls("ReadAsync") + w.calls("Read") == reads + 1
    await w.read(1, block=1)  # other blocks read as usual
    await w.at(29)
    with pytest.raises(BackendError):
        await w.read(1, block=0)
    await w.at(31)
    await w.read(1, block=0)  # tried again after a while: the stand-in serves it now
    w.service.release(w.slot(1))
    return w.result()


SCENARIOS: dict[str, tuple[Callable[[World], Awaitable[dict[str, Any]]], dict[str, Any]]] = {
    "defaults": (defaults, {}),
    "long_idle": (long_idle, {"idle_timeout": 8 * HOUR}),
    "cap": (cap, {}),
    "turns": (turns, {"max_connections": 2}),
    "turn_order": (turn_order, {"max_connections": 2}),
    "drain": (drain, {"max_connections": 1}),
    "failed_open": (failed_open, {}),
    "failed_login": (failed_login, {"password": "wrong"}),
    "failed_block": (failed_block, {}),
}


def _images(images: Path) -> None:
    """Thirteen IVDs on one datastore, each with snapshot s; IVD 3 also with a and b."""
    for n in range(13):
        record_ivd(images, ivd_id(n), DS)
        for snap in ("s", "a", "b") if n == 3 else ("s",):
            (images / ivd_id(n) / f"{snap}.raw").write_bytes(image_bytes(ivd_id(n), snap))


def _main(scenario: str, images: Path) -> dict[str, Any]:
    import trio
    import trio.testing

    _images(images)
    body, limits = SCENARIOS[scenario]
    clock = trio.testing.MockClock()
    w = World(images, clock, **limits)
    out: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(w.service.run)
            out.update(await body(w))
            n.cancel_scope.cancel()

    try:
        trio.run(main, clock=clock)
    finally:
        w.service.close_all()  # as a mount does: after the trio loop, on the main thread
        w.lib.exit()
    return out


def _first_leaf(e: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups: what the scenario tripped on."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


if __name__ == "__main__":
    import traceback

    from ivdfs.vddk.reexec import ensure_library_path

    ensure_library_path(VDDK_LIBDIR)  # as the CLI does: VDDK's plugin needs lib64 on the path
    try:
        print(json.dumps(_main(sys.argv[1], Path(sys.argv[2]))))
    except BaseException as e:
        traceback.print_exc()
        leaf = _first_leaf(e)
        text = " ".join(f"{type(leaf).__name__}: {leaf}".split())[:500]
        print(f"{FAILED}{text}", file=sys.stderr)
        sys.exit(1)
