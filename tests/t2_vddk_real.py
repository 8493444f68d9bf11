"""VDDK as it is really installed, at the binding level: the re-exec that puts VDDK's lib64 on
the search path (plugin, bundled OpenSSL 3, children's environment), InitEx's private
tmpDirectory, nfcHostPort, a plugin that did not load, and which errors are permanent.

The stand-in's lib64 is laid out like VDDK 8's (see tests/testbed/standin/README.md): its
InitEx loads libvddkVimAccess.so by bare name, and its libcrypto.so.3 has no system CA store
compiled in. InitEx and the re-exec happen once per process, so each scenario runs in its own
Python process (`python -m tests.t2_vddk_real SCENARIO ...`, the bottom of this file), printing
a JSON result; the tests check that and the stand-in's call log. The allocation map's queries
are checked against the same rules over made-up disks of any size, in this process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivdfs.io import holes
from ivdfs.io.holes import Allocated, AllocationMap
from ivdfs.vddk.allocation import allocated_runs, chunk_sectors
from ivdfs.vddk.errors import VddkError, is_permanent
from tests.mounting import REPO, VDDK_LIBDIR, call_lines
from tests.testbed.vsphere import https_server, record_ivd

LIB64 = VDDK_LIBDIR / "lib64"
IVD = "6c4ad1b1-0000-4000-8000-00000000beef"
USER_LIBS = "/opt/ivdfs-test/user-libs"  # an LD_LIBRARY_PATH of the user's own
SAMPLE = b"ivdfs hashes this"


def run_scenario(
    root: Path, scenario: str, *args: str, **env: str
) -> tuple[dict[str, Any], list[str]]:
    log = root / f"{scenario}.log"
    log.unlink(missing_ok=True)
    # The machine's SSL_CERT_FILE/SSL_CERT_DIR would hide what ivdfs does about VDDK's OpenSSL.
    drop = ("IVDFS_", "VDDK_", "SSL_CERT_", "LD_LIBRARY_PATH")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    full_env.update(
        VDDK_STANDIN_IMAGES=str(root / "images"),
        VDDK_STANDIN_LOG=str(log),
        PYTHONPATH=str(REPO),
        **env,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.t2_vddk_real", scenario, *args],
        env=full_env, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines() if log.exists() else []
    assert [ln for ln in lines if ln.split()[2:3] == ["VIOLATION"]] == []
    return json.loads(proc.stdout.splitlines()[-1]), lines


@pytest.fixture(scope="module")
def root(built_testbed: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vddk-real")
    record_ivd(root / "images", IVD, "datastore-1")
    (root / "images" / IVD / "snap-1.raw").write_bytes(os.urandom(1 << 20))
    return root


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """An HTTPS server whose certificate only our own CA file verifies (like vcsim's)."""
    with https_server(tmp_path_factory.mktemp("https")) as served:
        yield served


def system_ca_count() -> int:
    """CAs that Python trusts by default with the system's own OpenSSL (this process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSL_CERT_", "LD_LIB"))}
    code = "import ssl; print(ssl.create_default_context().cert_store_stats()['x509_ca'])"
    out = subprocess.run([sys.executable, "-I", "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return int(out)


@pytest.mark.parametrize("user_path", [None, USER_LIBS], ids=["unset", "user-value"])
def test_reexec_keeps_python_tls_and_hashing_working_on_vddks_openssl(
    root: Path, https: tuple[int, Path], user_path: str | None
) -> None:
    port, ca = https
    env = {"LD_LIBRARY_PATH": user_path} if user_path else {}
    res, _ = run_scenario(root, "tls", str(port), str(ca), **env)
    # The re-executed process runs on VDDK's OpenSSL, found first on the path...
    assert res["reexecuted"] is True
    assert res["ssl_from_lib64"] and res["crypto_from_lib64"]
    # ... and still verifies a server against a CA file, hashes correctly, and trusts the
    # system's CAs (VDDK's libcrypto alone knows none of them; see the next test).
    assert res["handshake"] == "ok"
    assert res["digests"] == [hashlib.new(a, SAMPLE).hexdigest() for a in ("sha1", "sha256", "md5")]
    assert res["system_cas"] == system_ca_count() > 0
    # The process environment is the user's again: children get no VDDK libraries.
    assert res["ld_library_path"] == user_path and res["child_ld_library_path"] == (
        user_path or "unset"
    )
    assert res["marker"] is None


def test_vddks_openssl_alone_trusts_no_system_ca(root: Path) -> None:
    """The trap the re-exec has to handle: the bundled libcrypto's own default CA paths."""
    code = "import ssl; print(ssl.create_default_context().cert_store_stats()['x509_ca'])"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSL_CERT_", "LD_LIB"))}
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         env={**env, "LD_LIBRARY_PATH": str(LIB64)}, check=True)  # fmt: skip
    assert int(out.stdout) == 0


def test_lib64_already_on_the_path_is_not_passed_to_children(root: Path) -> None:
    """A user who set LD_LIBRARY_PATH himself (VMware's instructions) needs no re-exec; the
    entry still leaves the environment, and the system's CAs still work."""
    res, lines = run_scenario(root, "tls-inplace", LD_LIBRARY_PATH=f"{LIB64}:{USER_LIBS}")
    assert res["reexecuted"] is False
    assert res["ld_library_path"] == USER_LIBS
    assert res["system_cas"] == system_ca_count()
    assert call_lines(lines, "InitEx")[0]["plugin"] == "loaded"


def test_init_gives_vddk_a_private_tmp_directory_removed_at_exit(root: Path) -> None:
    res, lines = run_scenario(root, "init")
    init = call_lines(lines, "InitEx")[0]
    private = Path(res["private_dir"])
    assert init["plugin"] == "loaded" and init["err"] == "0"
    assert init["configFile"] == str(private / "vixDiskLib.conf")
    assert init["tmpDirectory"] == str(private / "tmp")
    assert res["modes"] == {"dir": 0o700, "tmp": 0o700}
    assert res["files_during"] == [f"vixDiskLib-standin-{res['pid']}.log"]  # VDDK wrote there
    assert res["exists_after_exit"] is False
    # A config file of the user's own is handed over as it is, with no private directory.
    user = call_lines(lines, "InitEx")[1]
    assert user["configFile"] == res["user_config"] and res["private_dir_with_user_config"] is None
    assert user["tmpDirectory"] == res["user_tmp"]


def test_nfc_host_port_reaches_the_connect_params(root: Path) -> None:
    _, lines = run_scenario(root, "nfc")
    assert [c["nfcHostPort"] for c in call_lines(lines, "ConnectEx")] == ["0", "902"]


def test_a_plugin_that_did_not_load_fails_init_with_a_hint(root: Path) -> None:
    """Without the re-exec the bare-name dlopen fails; InitEx still succeeds, as real VDDK's.
    The binding must notice and say so, rather than fail every later call with 16053."""
    res, lines = run_scenario(root, "no-plugin")
    assert "libvddkVimAccess.so" in res["error"] and "cannot open shared object" in res["error"]
    assert f"LD_LIBRARY_PATH={LIB64}" in res["error"]
    assert res["type"] == "VddkPluginError"
    assert call_lines(lines, "InitEx")[0]["plugin"] == "failed"
    assert len(call_lines(lines, "Exit")) == 1  # InitEx undone
    assert res["private_dir_after"] is None


@pytest.mark.parametrize(
    ("code", "permanent"),
    [(16053, True), (35, True), (3014, True), (13, True), (4, True), (16054, True), (3, True),
     (36, False), (18000, False), (14009, False), (1, False), ((7 << 16) | 3014, True)],
)  # fmt: skip
def test_permanent_errors_are_told_from_transient_ones(code: int, permanent: bool) -> None:
    assert is_permanent(code) is permanent
    assert VddkError(code, "VixDiskLib_Open", "text").permanent is permanent


def test_hints_name_the_real_causes() -> None:
    assert "privilege" in VddkError(3014, "f", "t").hint
    assert VddkError(3015, "f", "t").hint == ""  # a guest code: never ours
    hint = VddkError(16053, "f", "t").hint
    assert "libvddkVimAccess.so" in hint and "LD_LIBRARY_PATH" in hint


# --- the allocation map against VDDK's QueryAllocatedBlocks rules --------------------------


class RulesQuery:
    """QueryAllocatedBlocks with the real library's argument checks over a made-up disk whose
    allocated 512-byte sectors are given; any failure it is told to inject."""

    def __init__(self, capacity: int, allocated: set[int] | None = None) -> None:
        self.capacity = capacity
        self.allocated = allocated
        self.calls: list[tuple[int, int, int]] = []
        self.fail: dict[int, int] = {}  # start sector -> VixError code

    async def __call__(self, start: int, n: int, chunk: int) -> list[tuple[int, int]]:
        ok = (128 <= chunk <= 131072 and chunk & (chunk - 1) == 0 and chunk <= self.capacity
              and start % chunk == 0 and n % chunk == 0 and n > 0
              and start + n <= self.capacity and n // chunk <= 524288)  # fmt: skip
        if not ok:
            raise VddkError(3, "VixDiskLib_QueryAllocatedBlocks", f"refused {start}+{n}/{chunk}")
        self.calls.append((start, n, chunk))
        if start in self.fail:
            raise VddkError(self.fail[start], "VixDiskLib_QueryAllocatedBlocks", "injected")
        if self.allocated is None:
            return [(start, n)]
        runs = sorted({s // chunk * chunk for s in self.allocated if start <= s < start + n})
        return [(r, chunk) for r in runs]

    def ruled(self) -> Allocated:
        """This query behind ivdfs's one keeper of VDDK's rules, as a disk gives it the map."""
        return functools.partial(allocated_runs, self, self.capacity)


async def test_queries_never_cover_more_than_512_ki_chunks() -> None:
    q = RulesQuery(capacity=600_000 * 128)
    m = AllocationMap(q.ruled(), 600_000 * 64 * 1024, 64 * 1024, region_blocks=600_000)
    assert await m.is_allocated(0)
    assert q.calls == [(0, 524288 * 128, 128), (524288 * 128, 75712 * 128, 128)]


async def test_a_block_that_is_not_a_power_of_two_is_queried_in_chunks_that_divide_it() -> None:
    # 192 KiB = 3 chunks of 128 sectors; data in the third chunk of block 1 only.
    q = RulesQuery(capacity=10 * 384 + 17, allocated={384 + 300})
    m = AllocationMap(q.ruled(), (10 * 384 + 17) * 512, 192 * 1024)
    assert [await m.is_allocated(i) for i in range(11)] == [False, True] + [False] * 8 + [True]
    assert q.calls == [(0, 3840, 128)]  # stops at the last whole chunk, before the tail


async def test_a_disk_smaller_than_a_block_is_queried_with_a_smaller_chunk() -> None:
    q = RulesQuery(capacity=300, allocated=set())
    m = AllocationMap(q.ruled(), 300 * 512, 1 << 20)
    assert await m.is_allocated(0)  # the only block reaches past the last whole chunk
    assert q.calls == [(0, 256, 256)]


async def test_no_chunk_within_the_rules_means_reading_everything() -> None:
    q = RulesQuery(capacity=4096)
    m = AllocationMap(
        q.ruled(), 4096 * 512, 96 * 1024
    )  # 96 KiB: no power of two >= 64 KiB divides it
    assert await m.is_allocated(3) and not m.enabled and q.calls == []


async def test_a_failed_region_costs_only_that_region_until_it_is_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q = RulesQuery(capacity=4 * 2048 * 8, allocated=set())
    q.fail[0] = 36
    m = AllocationMap(q.ruled(), 4 * 2048 * 8 * 512, 1 << 20, region_blocks=8)
    assert await m.is_allocated(0) and m.known(7) is True  # region 0: read, not skipped
    assert await m.is_allocated(8) is False  # region 1 still answers holes
    assert m.enabled and len(q.calls) == 2
    assert await m.is_allocated(1) and len(q.calls) == 2  # not asked again yet
    monkeypatch.setattr(holes, "RETRY_SECONDS", 0.0)
    q.fail.clear()
    q.fail[2048 * 16] = 36
    assert await m.is_allocated(16)  # region 2 fails, and is due again at once
    assert m.known(16) is None
    q.fail.clear()
    assert await m.is_allocated(16) is False and len(q.calls) == 4


async def test_a_library_that_cannot_query_turns_the_map_off() -> None:
    q = RulesQuery(capacity=2048 * 8)
    q.fail[0] = 6  # VIX_E_NOT_SUPPORTED
    m = AllocationMap(q.ruled(), 2048 * 8 * 512, 1 << 20, region_blocks=4)
    assert await m.is_allocated(0)
    assert not m.enabled and await m.is_allocated(5) and len(q.calls) == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block_sectors=st.sampled_from([128, 256, 384, 2048, 4096]),
    region_blocks=st.integers(1, 6),
    capacity=st.integers(1, 60 * 384),
    seeds=st.lists(st.floats(0, 1, exclude_max=True), max_size=12),
)
def test_every_region_answers_for_its_own_blocks(
    block_sectors: int, region_blocks: int, capacity: int, seeds: list[float]
) -> None:
    """Over several regions (the real default is 1024 blocks; a small region here), any
    block size and an odd tail: a block holding data is never a hole, whichever region it is
    in and however the query's runs fall; a block wholly inside the queried range with no data
    is one. Every query keeps VDDK's rules (a refused one would log a warning)."""
    allocated = {int(f * capacity) for f in seeds}
    q = RulesQuery(capacity, allocated)
    m = AllocationMap(q.ruled(), capacity * 512, block_sectors * 512, region_blocks=region_blocks)
    chunk = chunk_sectors(block_sectors, capacity)
    queryable = capacity // chunk * chunk if chunk else 0

    async def answers() -> list[bool]:
        return [await m.is_allocated(i) for i in range(m.nblocks)]

    got = trio.run(answers)
    for i, answer in enumerate(got):
        lo, hi = i * block_sectors, min((i + 1) * block_sectors, capacity)
        if any(lo <= s < hi for s in allocated):
            assert answer, f"block {i} holds data but reads as zeros"
        elif (i + 1) * block_sectors <= queryable:
            assert not answer, f"block {i} is a hole but gets read"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block_sectors=st.sampled_from([128, 256, 2048]),
    region_blocks=st.integers(1, 6),
    capacity=st.integers(1, 40 * 256),
    seeds=st.lists(st.floats(0, 1, exclude_max=True), max_size=12),
    asked=st.lists(st.floats(0, 1, exclude_max=True), max_size=6),
    ranges=st.lists(st.tuples(st.integers(0, 40 * 256 * 512), st.integers(0, 40 * 256 * 512)),
                    min_size=1, max_size=6),
)  # fmt: skip
def test_hole_bytes_count_exactly_the_known_holes_in_any_range(
    block_sectors: int,
    region_blocks: int,
    capacity: int,
    seeds: list[float],
    asked: list[float],
    ranges: list[tuple[int, int]],
) -> None:
    """What st_blocks leaves out, against a count block by block: only regions already
    known, only blocks known to be holes, only their bytes inside the range."""
    q = RulesQuery(capacity, {int(f * capacity) for f in seeds})
    m = AllocationMap(q.ruled(), capacity * 512, block_sectors * 512, region_blocks=region_blocks)

    async def learn() -> None:  # some regions known, the others not
        for f in asked:
            await m.is_allocated(int(f * m.nblocks))

    trio.run(learn)
    bs = m.block_size
    for a, b in ranges:
        start, end = min(a, b), max(a, b)
        want = sum(
            max(0, min(end, (i + 1) * bs) - max(start, i * bs))
            for i in range(m.nblocks)
            if m.known(i) is False
        )
        assert m.unallocated_bytes(start, end) == want, (start, end)


# --- the scenarios, run in their own process ------------------------------------------------


def _maps() -> str:
    with open("/proc/self/maps", encoding="utf-8") as f:
        return f.read()


def _child_ld_library_path() -> str:
    return subprocess.run(["sh", "-c", 'printf %s "${LD_LIBRARY_PATH-unset}"'],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


def _scenario(argv: list[str]) -> dict[str, Any]:
    from ivdfs.config import Secret
    from ivdfs.errors import BackendError
    from ivdfs.vddk.connection import DiskHandle, DiskTarget, ServerTarget
    from ivdfs.vddk.library import VddkLibrary
    from ivdfs.vddk.reexec import MARKER, ensure_library_path

    scenario = argv[0]
    out: dict[str, Any] = {"pid": os.getpid()}
    if scenario == "no-plugin":
        lib = VddkLibrary(VDDK_LIBDIR)
        try:
            lib.init()
        except BackendError as e:
            after = lib.private_dir
            out.update(error=str(e), type=type(e).__name__,
                       private_dir_after=None if after is None else str(after))  # fmt: skip
        return out
    # Set before the call: a re-executed process inherits it.
    reexecuted = "T2_VDDK_REAL_STARTED" in os.environ
    os.environ["T2_VDDK_REAL_STARTED"] = "1"
    ensure_library_path(VDDK_LIBDIR)
    maps = _maps()
    out.update(
        reexecuted=reexecuted,
        ld_library_path=os.environ.get("LD_LIBRARY_PATH"),
        marker=os.environ.get(MARKER),
        ssl_from_lib64=f"{LIB64}/libssl.so.3" in maps,
        crypto_from_lib64=f"{LIB64}/libcrypto.so.3" in maps,
        child_ld_library_path=_child_ld_library_path(),
        system_cas=ssl.create_default_context().cert_store_stats()["x509_ca"],
        digests=[hashlib.new(a, SAMPLE).hexdigest() for a in ("sha1", "sha256", "md5")],
    )
    if scenario == "tls":
        import socket

        port, ca = int(argv[1]), argv[2]
        ctx = ssl.create_default_context(cafile=ca)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1"):
                out["handshake"] = "ok"
    elif scenario == "tls-inplace":
        lib = VddkLibrary(VDDK_LIBDIR)
        lib.init()
        lib.exit()
    elif scenario == "init":
        lib = VddkLibrary(VDDK_LIBDIR)
        lib.init()
        private = lib.private_dir
        assert private is not None
        out.update(
            private_dir=str(private),
            modes={"dir": stat.S_IMODE(private.stat().st_mode),
                   "tmp": stat.S_IMODE((private / "tmp").stat().st_mode)},
            files_during=sorted(os.listdir(private / "tmp")),
        )  # fmt: skip
        lib.exit()
        out["exists_after_exit"] = private.exists()
        user_tmp = Path(os.environ["VDDK_STANDIN_LOG"]).parent / "user-tmp"
        user_tmp.mkdir(exist_ok=True)
        config = user_tmp.parent / "user.conf"
        config.write_text(f"tmpDirectory={user_tmp}\n")
        lib.init(config)
        out.update(private_dir_with_user_config=lib.private_dir and str(lib.private_dir),
                   user_config=str(config),
                   user_tmp=str(user_tmp))  # fmt: skip
        lib.exit()
    elif scenario == "nfc":
        lib = VddkLibrary(VDDK_LIBDIR)
        lib.init()
        for port in (0, 902):
            server = ServerTarget("standin.invalid", 443, "u", Secret("pw"), "AA", port)
            handle = DiskHandle(lib, server, DiskTarget(IVD, "datastore-1", "snap-1"))
            handle.open()
            handle.close()
        lib.exit()
    return out


if __name__ == "__main__":
    print(json.dumps(_scenario(sys.argv[1:])))
