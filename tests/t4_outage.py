"""A vCenter that stops answering, and replies lost on the way back (issues 28 and 25).

Frozen: the simulator's process is stopped (SIGSTOP), so connections are accepted by the
kernel and then hang, as with a real vCenter during an upgrade or an overload; the mount runs
with --vcenter-timeout 2 and --refresh 1, so every listing goes stale during the freeze. What
the mount already knows must answer within a second, what needs vCenter must fail with EIO
after the deadline (never hang), and everything must work again once the process resumes.

Lost replies: the launcher runs a snapshot task's start and then closes the connection without
a reply (-faults DIR/<op>.lost-reply). ivdfs must not send it again blindly: it finds the
snapshot it made, journals it, and deletes it exactly once at unmount.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ivdfs import journal
from tests.mounting import Bed, Mount, wait_for
from tests.t4_changes import block_extents, delta_view, make_history
from tests.testbed.vsphere import Vcsim, place_image

MiB = 1 << 20
TIMEOUT = 2.0  # --vcenter-timeout of the frozen mount
HELD = 1.0  # what the mount knows answers within this (issue 28)


def mbr_disk(rng: random.Random, size: int = 4 * MiB) -> bytearray:
    """Random bytes with an MBR holding one partition at 1 MiB, 2 MiB long."""
    data = bytearray(rng.randbytes(size))
    data[446:512] = bytes(66)
    data[446:462] = (
        bytes([0, 0, 0, 0, 0x83, 0, 0, 0])
        + (2048).to_bytes(4, "little")
        + (4096).to_bytes(4, "little")
    )
    data[510:512] = b"\x55\xaa"
    return data


@pytest.fixture
def cbt_bed(built_testbed: None, tmp_path: Path) -> Iterator[Bed]:
    """A vcsim of the test's own (it is frozen), computing changed blocks from the images,
    with the VSLM endpoint: listings give summaries, the whole record is asked for info.json."""
    (tmp_path / "images").mkdir()
    with Vcsim(images_dir=tmp_path / "images", vslm=True, api_version="7.0.2.0") as v:
        yield Bed(v, tmp_path)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.monotonic()
    value = fn()
    return time.monotonic() - t0, value


def eio_within(fn: Callable[[], Any], limit: float) -> float:
    """`fn` fails with EIO within `limit` seconds; returns how long it took."""
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        fn()
    took = time.monotonic() - t0
    assert e.value.errno == errno.EIO, e.value
    assert took < limit, f"EIO after {took:.1f} s, not within {limit} s"
    return took


@pytest.mark.allow_log(
    "did not answer within", "does not answer", "listings stay as they are", "not in the last"
)
def test_a_frozen_vcenter_stalls_nothing_the_mount_knows(cbt_bed: Bed, tmp_path: Path) -> None:
    v = cbt_bed.vcsim
    rng = random.Random(28)
    disks = [mbr_disk(rng)]
    for _ in range(2):
        d = bytearray(disks[-1])
        for off in rng.sample(range(MiB // 65536, 4 * MiB // 65536), 6):
            d[off * 65536 + 17 : off * 65536 + 300] = rng.randbytes(283)
        disks.append(d)
    h = make_history(v, cbt_bed.images, "frozen", [bytes(d) for d in disks])
    s0, s1, s2 = h.snaps
    with Mount(cbt_bed, tmp_path / "mnt", "--vcenter-timeout", str(TIMEOUT), "--refresh", "1") as m:
        mp = m.mountpoint
        ds_dir = mp / h.ivd.datastore_name
        ivd_dir = ds_dir / h.ivd.id
        snap = ivd_dir / s1
        pair = snap / "changes" / f"{s0}.raw"
        pair_json = pair.with_suffix(".json")
        never = ivd_dir / s2 / "changes" / f"{s0}.json"  # listed, never asked

        def stats() -> dict[str, Any]:
            return json.loads((mp / ".ivdfs" / "stats").read_text())["tree"]  # type: ignore[no-any-return]

        def held(limit: float = math.inf) -> tuple[dict[str, Any], float]:
            """Everything asked once before the freeze (listings, sizes, partitions, metadata,
            a changes/ pair, an open file's bytes), each within `limit` seconds, and the
            longest any one of them took."""
            ops: dict[str, Callable[[], Any]] = {
                "root": lambda: sorted(os.listdir(mp)),
                "datastore": lambda: sorted(os.listdir(ds_dir)),
                "ivd": lambda: sorted(os.listdir(ivd_dir)),
                "snapshot": lambda: sorted(os.listdir(ivd_dir / s1)),
                "changes": lambda: sorted(os.listdir(ivd_dir / s2 / "changes")),
                "sizes": lambda: [(ivd_dir / s / "disk.raw").stat().st_size for s in h.snaps],
                "ivd info": lambda: json.loads((ivd_dir / "info.json").read_text())["uuid"],
                "snapshot info": lambda: json.loads((snap / "info.json").read_text())["snapshot"],
                "xattr": lambda: os.getxattr(ivd_dir / s1 / "disk.raw", "user.ivdfs.snapshot_id"),
                "partition": lambda: (snap / "part1.raw").read_bytes() == disks[1][MiB : 3 * MiB],
                "pair": lambda: pair.read_bytes() == delta_view(disks[1], delta),
                "pair json": lambda: json.loads(pair_json.read_text())["extent_count"],
                "open file": lambda: os.pread(fd, 4 * MiB, 0) == disks[1],
            }  # fmt: skip
            out: dict[str, Any] = {}
            slowest = 0.0
            for name, op in ops.items():
                took, out[name] = timed(op)
                assert took < limit, f"{name} took {took:.2f} s"
                slowest = max(slowest, took)
            return out, slowest

        delta = block_extents(disks[0], disks[1])
        fd = os.open(ivd_dir / s1 / "disk.raw", os.O_RDONLY)
        try:
            before, _ = held()
            assert before["partition"] and before["pair"] and before["open file"], before
            assert before["pair json"] > 0 and "part1.raw" in before["snapshot"]
            assert set(before["changes"]) == {f"{s}.{x}" for s in (s0, s1) for x in ("json", "raw")}

            v.freeze()

            # Every listing goes stale (--refresh 1) and its refresh fails after the deadline;
            # meanwhile, and after, each answer comes from what the mount holds, at once.
            def outage_seen() -> bool:
                assert held(HELD)[0] == before
                return bool(stats()["refresh_failures"] >= 1)

            wait_for(outage_seen, timeout=10 * TIMEOUT, what="a refresh to fail")
            for _ in range(3):
                assert held(HELD)[0] == before
            assert stats()["vcenter_outage"] is True

            # What truly needs vCenter fails with EIO after the deadline, and never hangs: a
            # snapshot the listing lacks, and a changes/ pair never asked.
            unknown = str(uuid.uuid4())
            eio_within(lambda: os.stat(ivd_dir / unknown), 4 * TIMEOUT + 2)
            eio_within(lambda: never.read_bytes(), 4 * TIMEOUT + 2)
            assert held(HELD)[0] == before  # and the mount still answers at once

            v.thaw()
            # A snapshot made since is found by its id (a lookup asks vCenter), the pair never
            # asked answers, and listings refresh again.
            s3 = v.create_snapshot(h.ivd, "after the freeze")
            place_image(cbt_bed.images, h.ivd, s3, cbt_bed.root / "src" / f"{s2}.raw")
            assert (ivd_dir / s3 / "disk.raw").read_bytes() == disks[2]
            assert json.loads(never.read_text())["extent_count"] > 0
            wait_for(lambda: not stats()["vcenter_outage"] and s3 in os.listdir(ivd_dir),
                     timeout=10 * TIMEOUT, what="listings to refresh again")  # fmt: skip
            assert os.pread(fd, 4 * MiB, 0) == disks[1]
        finally:
            os.close(fd)
        assert m.unmount() == 0
    log = m.log()
    assert log.count("listings stay as they are") == 1  # one line for the outage
    assert "vCenter answers again" in log and "Traceback" not in log


@pytest.mark.allow_log("so the reply was lost")
def test_a_lost_reply_to_a_snapshot_task_is_found_not_sent_again(
    bed: Bed, mountpoint: Path
) -> None:
    """--snapshot-now's create runs on vCenter but its reply is lost: exactly one snapshot,
    journaled and served; at unmount the delete's reply is lost too, and it is deleted once."""
    v = bed.vcsim
    ivd = v.create_ivd("lost-reply", 1, "LocalDS_0")
    before = v.snapshots(ivd)
    create = v.lose_reply("createSnapshot")
    with Mount(bed, mountpoint, "--snapshot-now", ivd.id) as m:
        assert not create.exists()  # the launcher lost the reply to the create
        made = [s for s in v.snapshots(ivd) if s not in before]
        assert len(made) == 1
        rec = journal.find(mountpoint)
        assert rec is not None and [s["snapshot"] for s in rec.snapshots] == made
        assert made[0] in os.listdir(mountpoint / ivd.datastore_name / ivd.id)
        delete = v.lose_reply("deleteSnapshot")
        assert m.unmount() == 0
    assert not delete.exists()  # the reply to the delete was lost as well
    assert v.snapshots(ivd) == before and journal.find(mountpoint) is None
    log = m.log()
    assert log.count("so the reply was lost; asking vCenter whether it ran") == 2, log
    assert "vCenter made it" in log and "vCenter did it before the reply was lost" in log


def test_snapshot_create_command_with_a_lost_reply(bed: Bed) -> None:
    """`ivdfs snapshot create`: one snapshot, its id printed, though the reply never came."""
    from tests.t4_cli import cli

    v = bed.vcsim
    ivd = v.create_ivd("lost-reply-cli", 1, "LocalDS_1")
    switch = v.lose_reply("createSnapshot")
    r = cli(bed, "snapshot", "create", ivd.id, "--description", "nightly")
    assert r.returncode == 0, r.stderr
    assert not switch.exists()
    assert v.snapshots(ivd) == [r.stdout.strip()]
    assert "so the reply was lost; asking vCenter whether it ran" in r.stderr
