"""Disks that fail to open or are slow (issue 20), through real mounts.

- A disk whose image is missing at the first listing shows its partitions and its exact size
  once it is there.
- 2,000 opens of a disk that cannot be opened cost a bounded number of VDDK calls and lines.
- A read of one disk is served while 90 readers wait on a slow disk.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from tests.mounting import Bed, Mount, call_lines, placed_disks, raw_path, wait_for
from tests.testbed import images as imgs
from tests.testbed.vsphere import Ivd, place_image

MiB = 1 << 20


@pytest.fixture(scope="module")
def disks(bed: Bed) -> dict[str, tuple[Ivd, str, Path]]:
    return placed_disks(bed, ("sig-a", "LocalDS_0"), ("sig-b", "LocalDS_1"))


@pytest.mark.allow_log("cannot open the disk", "VixDiskLib_Open", "injected Open failure",
                       "not reconnecting")  # fmt: skip
@pytest.mark.parametrize("cause", ["refused", "missing"])
def test_a_disk_failing_at_first_listing_appears_whole_later(
    bed: Bed, tmp_path: Path, cause: str
) -> None:
    """The disk (a GPT disk of 64 MiB; vCenter says 65) fails to open when the snapshot is
    first listed: the connection is refused (a transient code), or its image is not there yet
    (VixError 4, a permanent code of that disk alone). disk.raw shows vCenter's size for now,
    never kept by the kernel; at a later listing the partitions appear and the size is the
    disk's own."""
    ivd = bed.vcsim.create_ivd(f"late-{cause}", 65, "LocalDS_2")
    snap = bed.vcsim.create_snapshot(ivd, "late")
    img = tmp_path / "late.raw"
    manifest = imgs.gpt_disk(img, 64)
    size = img.stat().st_size
    assert size == 64 * MiB and manifest.partitions
    env = {"VDDK_STANDIN_FAIL_OPEN_CODE": "14009", "VDDK_STANDIN_FAIL_OPEN_FIRST": "1"}
    if cause == "missing":
        env = {}
    else:
        place_image(bed.images, ivd, snap, img)
    bed.standin_log.unlink(missing_ok=True)
    with Mount(bed, tmp_path / "mnt", **env) as m:
        snapdir = m.mountpoint / ivd.datastore_name / ivd.id / snap
        assert sorted(os.listdir(snapdir)) == ["disk.raw", "info.json"]
        assert (snapdir / "disk.raw").stat().st_size == 65 * MiB
        # The stand-in, like VDDK, finds a missing disk at ConnectEx already.
        failed = call_lines(bed.log_lines(), "ConnectEx" if cause == "missing" else "Open")
        assert failed[-1]["err"] == ("4" if cause == "missing" else "14009")
        if cause == "missing":
            place_image(bed.images, ivd, snap, img)

        def whole() -> bool:
            names = os.listdir(snapdir)
            return all(f"part{p.number}.raw" in names for p in manifest.partitions)

        wait_for(whole, timeout=30, what="the partitions")
        assert (snapdir / "disk.raw").stat().st_size == size
        assert (snapdir / "disk.raw").read_bytes() == img.read_bytes()
        # info.json gives the snapshot's own size too, not the IVD's current one.
        doc = json.loads((snapdir / "info.json").read_text())
        assert doc["snapshot"]["capacity_bytes"] == size
        assert doc["ivd"]["capacity_bytes"] == 65 * MiB
        assert m.unmount() == 0


@pytest.mark.allow_log("cannot open the disk", "VixDiskLib_Open", "injected Open failure",
                       "not reconnecting")  # fmt: skip
def test_an_open_storm_on_an_unopenable_disk_is_bounded(
    bed: Bed, disks: dict[str, tuple[Ivd, str, Path]], tmp_path: Path
) -> None:
    ivd, snap, _ = disks["sig-b"]
    bed.standin_log.unlink(missing_ok=True)
    with Mount(bed, tmp_path / "mnt", VDDK_STANDIN_FAIL_OPEN_CODE="14009") as m:
        path = m.mountpoint / raw_path(ivd, snap)
        failures = 0
        for _ in range(2000):
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except OSError:
                failures += 1
        assert failures == 2000
        assert m.unmount() == 0
    opens = call_lines(bed.log_lines(), "Open")
    # Remembered for a growing interval: a handful of attempts in the seconds the storm takes.
    assert len(opens) <= 12, len(opens)
    lines = [ln for ln in m.log().splitlines() if " WARNING " in ln or " ERROR " in ln]
    assert len(lines) <= 3 * len(opens), lines[:5]


def test_one_slow_disk_does_not_stall_another(
    bed: Bed, disks: dict[str, tuple[Ivd, str, Path]], tmp_path: Path
) -> None:
    """90 readers wait on a disk whose reads take 5 s each; a read of another, already open
    disk is answered while all 90 are still waiting."""
    slow, slow_snap, _ = disks["sig-a"]
    fast, fast_snap, fast_src = disks["sig-b"]
    with Mount(bed, tmp_path / "mnt", "--prefetch", "0", VDDK_STANDIN_SLOW_IVD=slow.id,
               VDDK_STANDIN_SLOW_US="5000000") as m:  # fmt: skip
        fast_path = m.mountpoint / raw_path(fast, fast_snap)
        with open(fast_path, "rb", buffering=0) as f:
            assert f.read(4096) == fast_src.read_bytes()[:4096]  # open and warm
            slow_path = m.mountpoint / raw_path(slow, slow_snap)
            done: list[int] = []
            reads_before = sum(" ReadAsync " in ln for ln in bed.log_lines())

            def slow_reader(k: int) -> None:
                # Page-cache reads: the kernel sends them as background (read-ahead)
                # requests, of which it keeps only `max_background` per connection in flight.
                with open(slow_path, "rb") as g:
                    g.seek(k * 65536 % (8 * MiB))
                    g.read(4096)
                done.append(k)

            threads = [threading.Thread(target=slow_reader, args=(k,)) for k in range(90)]
            for t in threads:
                t.start()
            wait_for(lambda: sum(" ReadAsync " in ln for ln in bed.log_lines()) > reads_before,
                     what="the slow reads")  # fmt: skip
            f.seek(4 * MiB)  # a block not read yet: a VDDK read of the fast disk
            assert f.read(4096) == fast_src.read_bytes()[4 * MiB : 4 * MiB + 4096]
            assert done == [], "the fast read waited for the slow disk"
            for t in threads:
                t.join(timeout=120)
            assert len(done) == 90
        assert m.unmount() == 0
