"""The VDDK binding's parallel read path against the stand-in library: ReadAsync (callbacks on a
library thread and before ReadAsync returns), several handles per snapshot, injected read
failures, and QueryAllocatedBlocks-driven holes.

The stand-in reads its settings once, at InitEx, and InitEx runs once per process, so every
scenario runs in its own Python process (`python -m tests.t2_vddk SCENARIO ...`, the bottom of
this file) against images in a temporary directory; it prints a JSON result, and the test
checks that and the stand-in's call log. Server mode needs no vCenter: the stand-in only checks
the credentials it was given.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import REPO, VDDK_LIBDIR, call_lines
from tests.testbed.images import block_data, random_disk, sparse_disk
from tests.testbed.vsphere import record_ivd

MiB = 1 << 20
IVD = "6c4ad1b1-0000-4000-8000-00000000c0de"
SNAP = "snap-1"


def run_scenario(
    root: Path, scenario: str, *args: str, **env: str
) -> tuple[dict[str, Any], list[str]]:
    log = root / f"{scenario}.log"
    log.unlink(missing_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("IVDFS_", "VDDK_"))}
    full_env.update(
        VDDK_STANDIN_IMAGES=str(root / "images"),
        VDDK_STANDIN_LOG=str(log),
        PYTHONPATH=str(REPO),
        **env,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.t2_vddk", scenario, *args],
        env=full_env, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    violations = [ln for ln in lines if ln.split()[2:3] == ["VIOLATION"]]
    assert violations == []
    return json.loads(proc.stdout.splitlines()[-1]), lines


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vddk")
    record_ivd(root / "images", IVD, "datastore-1")
    # 24 MiB of distinct blocks plus a 3-sector tail: the last block is short.
    random_disk(root / "full.raw", 24, seed=5)
    with open(root / "full.raw", "ab") as f:
        f.write(b"\x5a" * 1536)
    os.link(root / "full.raw", root / "images" / IVD / f"{SNAP}.raw")
    m = sparse_disk(root / "images" / IVD / "sparse.raw", 40, 0.5, seed=9)
    (root / "sparse.json").write_text(json.dumps(list(m.allocated)))
    # Half allocated and not a whole number of blocks, chunks or even KiB: 12.5 MiB + 512 bytes,
    # with data in the tail.
    odd = root / "images" / IVD / "odd.raw"
    sparse_disk(odd, 12, 0.5, seed=11)
    with open(odd, "r+b") as f:
        f.truncate((12 << 20) + (256 << 10))  # a hole, then data
        f.seek(0, os.SEEK_END)
        f.write(os.urandom((256 << 10) + 512))
    return root


@pytest.mark.parametrize(
    ("transport", "handles", "use_async", "extra"),
    [
        ("nbdssl", 1, True, {}),
        # Every other ReadAsync completes, callback included, before it returns.
        ("nbd", 1, True, {"VDDK_STANDIN_ASYNC_INLINE_EVERY": "2"}),
        ("file", 3, True, {}),
        ("nbd", 2, False, {}),
    ],
)
def test_parallel_reads_return_the_right_bytes_within_vddk_rules(
    root: Path, transport: str, handles: int, use_async: bool, extra: dict[str, str]
) -> None:
    res, lines = run_scenario(
        root, "reads", str(handles), "1" if use_async else "0",
        VDDK_STANDIN_TRANSPORT=transport, VDDK_STANDIN_LATENCY_US="2000", **extra,
    )  # fmt: skip
    data = (root / "full.raw").read_bytes()
    expected = [hashlib.sha256(data[i : i + MiB]).hexdigest() for i in range(0, len(data), MiB)]
    assert res["digests"] == expected
    opens = call_lines(lines, "Open")
    assert len(opens) == handles and len(call_lines(lines, "ConnectEx")) == handles
    assert len(call_lines(lines, "PrepareForAccess")) == len(call_lines(lines, "EndAccess")) == 1
    # Every handle opened and closed on the one control thread.
    assert {o["tid"] for o in opens} | {c["tid"] for c in call_lines(lines, "Close")} == {
        opens[0]["tid"]
    }
    reads = call_lines(lines, "Read") + call_lines(lines, "ReadAsync")
    assert len(reads) == len(expected)  # one request per block, none larger than a block
    assert all(int(r["n"]) <= 2048 for r in reads)
    truly_async = use_async and transport != "file"
    assert bool(call_lines(lines, "ReadAsync")) == truly_async
    if truly_async:
        done = call_lines(lines, "ReadAsyncDone")
        assert len(done) == len(expected)
        if extra:
            assert any(d["inline"] == "1" for d in done)
        # The waiting I/O thread never served a request: the library's threads did.
        io_tids = {r["tid"] for r in call_lines(lines, "ReadAsync")}
        assert {d["tid"] for d in done if d["inline"] == "0"}.isdisjoint(io_tids)
        assert res["stats"]["VixDiskLib_ReadAsync"] == len(expected)
    # Several handles share the work.
    assert len({r["handle"] for r in reads}) == handles
    exit_line = call_lines(lines, "Exit")[0]
    assert exit_line["violations"] == "0" and exit_line["open_handles"] == "0"


@pytest.mark.parametrize("transport", ["nbdssl", "file"])
def test_failed_reads_reach_their_reader_only(root: Path, transport: str) -> None:
    res, _ = run_scenario(
        root, "reads", "1", "1", VDDK_STANDIN_TRANSPORT=transport,
        VDDK_STANDIN_FAIL_READ_NTH="3,7", VDDK_STANDIN_FAIL_CODE="3014",
    )  # fmt: skip
    # A permanent code, so the service does not retry it on a fresh connection.
    assert sorted(res["errors"]) == [2, 6]  # 0-based blocks, read in order here
    assert all("VixError 3014" in e for e in res["error_texts"])
    data = (root / "full.raw").read_bytes()
    for i, digest in enumerate(res["digests"]):
        if i not in (2, 6):
            assert digest == hashlib.sha256(data[i * MiB : (i + 1) * MiB]).hexdigest()


def test_holes_are_zeros_without_reads(root: Path) -> None:
    allocated = json.loads((root / "sparse.json").read_text())
    res, lines = run_scenario(root, "holes", VDDK_STANDIN_LATENCY_US="500")
    expected = [
        hashlib.sha256(block_data(9, i) if i in allocated else bytes(MiB)).hexdigest()
        for i in range(40)
    ]
    assert res["digests"] == expected
    reads = call_lines(lines, "ReadAsync")
    assert sorted(int(r["start"]) // 2048 for r in reads) == allocated
    qab = call_lines(lines, "QueryAllocatedBlocks")
    assert len(qab) == 1 and qab[0]["err"] == "0"
    assert res["zero_blocks"] == 40 - len(allocated)


def test_holes_fall_back_to_reading_when_the_query_is_missing(root: Path) -> None:
    res, lines = run_scenario(root, "holes", VDDK_STANDIN_NO_QAB="1")
    allocated = json.loads((root / "sparse.json").read_text())
    assert res["digests"] == [
        hashlib.sha256(block_data(9, i) if i in allocated else bytes(MiB)).hexdigest()
        for i in range(40)
    ]
    assert len(call_lines(lines, "ReadAsync")) == 40 and res["zero_blocks"] == 0
    assert res["warnings"] == []


@pytest.mark.parametrize("block_kib", [64, 256, 1024, 2048])
def test_holes_of_an_odd_sized_disk_within_vddks_query_rules(root: Path, block_kib: int) -> None:
    """The stand-in refuses (and logs as a VIOLATION, which run_scenario rejects) every query
    the real library would refuse: the partial last chunk must never be asked about."""
    bs = block_kib << 10
    data = (root / "images" / IVD / "odd.raw").read_bytes()
    res, lines = run_scenario(root, "holes-odd", str(bs))
    blocks = [data[i : i + bs] for i in range(0, len(data), bs)]
    assert res["digests"] == [hashlib.sha256(b).hexdigest() for b in blocks]
    capacity = len(data) // 512
    last_whole = capacity // (bs // 512) * (bs // 512)  # the chunk is the block
    expected = {i for i, b in enumerate(blocks) if any(b)} | {
        i for i in range(len(blocks)) if (i + 1) * bs // 512 > last_whole
    }
    reads = call_lines(lines, "ReadAsync")
    assert sorted(int(r["start"]) * 512 // bs for r in reads) == sorted(expected)
    qab = call_lines(lines, "QueryAllocatedBlocks")
    assert qab and all(q["err"] == "0" and q["chunk"] == str(bs // 512) for q in qab)
    assert max(int(q["start"]) + int(q["n"]) for q in qab) == last_whole


# --- the scenarios, run in their own process ------------------------------------------------


def _scenario(argv: list[str]) -> dict[str, Any]:
    import logging

    import trio

    from ivdfs.config import Secret
    from ivdfs.errors import BackendError
    from ivdfs.io.block_cache import BlockCache
    from ivdfs.io.reader import DiskReader
    from ivdfs.vddk.connection import DiskTarget, ServerTarget
    from ivdfs.vddk.library import VddkLibrary
    from ivdfs.vddk.service import DiskService, Limits

    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger().addHandler(Collect())
    lib = VddkLibrary(VDDK_LIBDIR)
    lib.init()
    scenario = argv[0]
    handles = int(argv[1]) if scenario == "reads" else 1
    use_async = argv[2] == "1" if scenario == "reads" else True
    service = DiskService(
        lib, ServerTarget("standin.invalid", 443, "user", Secret("pw"), "AA:BB"),
        "ivdfs test", limits=Limits(handles_per_disk=handles, use_async=use_async),
    )  # fmt: skip
    out: dict[str, Any] = {}

    async def open_disk(snapshot: str) -> tuple[Any, int]:
        """The service's slot of one snapshot and the disk's size (opening it once)."""
        slot = service.slot(DiskTarget(IVD, "datastore-1", snapshot))
        return slot, await service.capacity(slot)

    def reader_of(slot: Any, capacity: int, block: int, cache: Any) -> Any:
        async def read(start: int, n: int, background: bool = False) -> bytearray:
            return await service.read(slot, start, n, background)

        async def query(start: int, end: int, granularity: int) -> list[tuple[int, int]]:
            return await service.allocated(slot, start, end, granularity)

        return DiskReader("d", capacity, block, cache, read, query)

    async def reads() -> None:
        slot, capacity = await open_disk(SNAP)
        nblocks = (capacity + MiB - 1) // MiB
        digests: list[str] = [""] * nblocks
        errors: list[int] = []
        texts: list[str] = []
        order = list(range(nblocks))
        if "VDDK_STANDIN_FAIL_READ_NTH" not in os.environ:
            random.Random(3).shuffle(order)
        limit = trio.CapacityLimiter(8)

        async def one(i: int) -> None:
            async with limit:
                try:
                    buf = await service.read(slot, i * 2048, min(MiB, capacity - i * MiB))
                    digests[i] = hashlib.sha256(buf).hexdigest()
                except BackendError as e:
                    errors.append(i)
                    texts.append(str(e))

        if "VDDK_STANDIN_FAIL_READ_NTH" in os.environ:
            # The stand-in fails the Nth request: one at a time, request order = block order,
            # whatever the machine's load (no sleeps holding the order).
            for i in order:
                await one(i)
        else:
            async with trio.open_nursery() as n:
                for i in order:
                    n.start_soon(one, i)
        out.update(digests=digests, errors=errors, error_texts=texts)

    async def holes() -> None:
        slot, capacity = await open_disk("sparse")
        cache = BlockCache(64 * MiB)
        reader = reader_of(slot, capacity, MiB, cache)
        digests: list[str] = [""] * (capacity // MiB)

        async def one(i: int) -> None:
            digests[i] = hashlib.sha256(bytes(await reader.read(i * MiB, MiB))).hexdigest()

        async with trio.open_nursery() as n:
            for i in range(len(digests)):
                n.start_soon(one, i)
        out.update(digests=digests, zero_blocks=cache.stats.zero_blocks)

    async def holes_odd() -> None:
        block = int(argv[1])
        slot, capacity = await open_disk("odd")
        reader = reader_of(slot, capacity, block, BlockCache(64 * MiB))
        digests: list[str] = []
        for off in range(0, capacity, block):
            n = min(block, capacity - off)
            digests.append(hashlib.sha256(bytes(await reader.read(off, n))).hexdigest())
        out.update(digests=digests)

    trio.run({"reads": reads, "holes": holes, "holes-odd": holes_odd}[scenario])
    service.close_all()
    out["stats"] = {k: v.calls for k, v in lib.stats.snapshot().items()}
    lib.exit()
    out["warnings"] = [w for w in warnings if "injected" not in w]
    return out


if __name__ == "__main__":
    from ivdfs.vddk.reexec import ensure_library_path

    ensure_library_path(VDDK_LIBDIR)  # as the CLI does: VDDK's plugin needs lib64 on the path
    print(json.dumps(_scenario(sys.argv[1:])))
