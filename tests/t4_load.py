"""Load: concurrent random readers over several snapshots, with every byte checked (issue 5)."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest

from tests.mounting import Bed, Mount, assert_standin_log_clean, sha256_file
from tests.testbed.vsphere import place_image

MiB = 1 << 20
READERS = 16
# A fixed amount of work, not a time window: the same load on an idle or a busy machine, and
# no minimum count that a slow machine could miss. The long soak is in scripts/bench.
OPS_PER_READER = 150
CACHE = 32 * MiB


@pytest.fixture(scope="module")
def sources(bed: Bed) -> dict[Path, bytes]:
    out: dict[Path, bytes] = {}
    rng = random.Random(5)
    for i in range(3):
        ds = f"LocalDS_{i}"
        ivd = bed.vcsim.create_ivd(f"load-{i}", 48, ds)
        for j in range(2 if i == 0 else 1):
            snap = bed.vcsim.create_snapshot(ivd, f"load {j}")
            data = rng.randbytes(48 * MiB)
            src = bed.root / f"load-{i}-{j}.raw"
            src.write_bytes(data)
            place_image(bed.images, ivd, snap, src)
            out[Path(ds) / ivd.id / snap / "disk.raw"] = data
    return out


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_concurrent_random_readers(bed: Bed, sources: dict[Path, bytes], tmp_path: Path) -> None:
    bed.standin_log.unlink(missing_ok=True)
    with Mount(bed, tmp_path / "mnt", "--cache-size", "32M", VDDK_STANDIN_LOG_READS="0") as m:
        mp = m.mountpoint
        paths = list(sources)
        errors: list[str] = []
        counts = [0] * READERS

        def reader(k: int) -> None:
            rng = random.Random(k)
            fds = {p: os.open(mp / p, os.O_RDONLY) for p in paths}
            try:
                while counts[k] < OPS_PER_READER and not errors:
                    p = rng.choice(paths)
                    src = sources[p]
                    off = rng.randrange(0, len(src))
                    n = rng.choice([512, 4096, 65536, 300_000, MiB + 17])
                    got = os.pread(fds[p], n, off)
                    if got != src[off : off + n]:
                        errors.append(f"wrong bytes: {p} offset {off} length {n}")
                    # Drop our pages so the next read reaches ivdfs, not the page cache.
                    os.posix_fadvise(fds[p], off, n, os.POSIX_FADV_DONTNEED)
                    counts[k] += 1
            except OSError as e:
                errors.append(f"reader {k}: {e}")
            finally:
                for fd in fds.values():
                    os.close(fd)

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(READERS)]
        for t in threads:
            t.start()
        # rsync of whole snapshots at the same time, checked afterwards.
        dest = tmp_path / "copy"
        subprocess.run(["rsync", "-a", f"{mp / paths[0].parent}/", str(dest)], check=True)
        for t in threads:
            t.join()
        assert errors == []
        assert counts == [OPS_PER_READER] * READERS
        assert (dest / "disk.raw").read_bytes() == sources[paths[0]]
        rss = peak_rss(m.proc.pid)
        assert rss <= CACHE + 150 * MiB, f"peak RSS {rss / MiB:.0f} MiB"
        assert m.unmount() == 0
    assert m.unexpected_log_records() == []
    assert_standin_log_clean(bed, {p.parts[1] for p in paths})
    for p in paths:  # the served images were never written
        placed = bed.images / p.parts[1] / f"{p.parts[2]}.raw"
        assert sha256_file(placed) == hashlib.sha256(sources[p]).hexdigest()
