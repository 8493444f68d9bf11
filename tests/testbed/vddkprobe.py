"""Read disks through one libvixDiskLib in VDDK's local-file mode, and say what it gave.

Role: lets the tests hold the stand-in VDDK and VMware's own library to the same files:
GetInfo (capacity, numLinks, parentFileNameHint), every byte (as a SHA-256), chosen reads and
QueryAllocatedBlocks calls, and the error of each call. VDDK allows one InitEx per process, so
`probe` runs the jobs in a child process (``python -m tests.testbed.vddkprobe LIBRARY``, jobs
as JSON on stdin, results as JSON on stdout) with the library's directory on
LD_LIBRARY_PATH, which VMware's library needs before it starts (without it VDDK 7.0.2 aborts in
InitEx). The child uses cffi with ivdfs's own declarations of the ABI, and nothing else of
ivdfs: what is measured is the library, not the binding.

Every open is read-only (VIXDISKLIB_FLAG_OPEN_READ_ONLY is always added); reads go in requests
of at most 2048 sectors.

Concurrency: `probe` blocks until its child exits; separate calls are independent processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TESTBED = Path(__file__).resolve().parent
REPO = TESTBED.parents[1]
STANDIN_LIBRARY = TESTBED / "build" / "vddk" / "lib64" / "libvixDiskLib.so.8"
SECTOR = 512
READ_ONLY = 4
SINGLE_LINK = 2
REQUEST = 2048  # sectors per read

_SONAME_RE = re.compile(r"^libvixDiskLib\.so\.(\d+)$")


@dataclass(frozen=True)
class Job:
    """One Open of `path` and what to do with the handle."""

    path: str
    flags: int = READ_ONLY
    digest: bool = True  # read the whole disk, report its SHA-256
    queries: tuple[tuple[int, int, int], ...] = ()  # (start, sectors, chunk)
    reads: tuple[tuple[int, int], ...] = ()  # (start, sectors): error and SHA-256 of each
    locks: bool = False  # list the lock files beside the disk while it is open
    abandon: bool = False  # never Close it: the process ends with it open, as if killed


@dataclass(frozen=True)
class Seen:
    """What the library gave for one Job (errors are VixError codes, 0 for success)."""

    open_error: int
    capacity: int = 0
    num_links: int = 0
    parent_hint: str | None = None
    sha256: str | None = None  # the whole disk; None when not asked or a read failed
    read_error: int = 0  # of the whole-disk read
    queries: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)
    reads: list[tuple[int, str | None]] = field(default_factory=list)
    locks: list[str] = field(default_factory=list)  # "<file>.lck/M*.lck", sorted


def vmware_library(vddk: Path) -> Path:
    """The newest lib64/libvixDiskLib.so.N of a VDDK unpacked as VMware ships it."""
    found = {
        int(m.group(1)): p
        for p in (vddk / "lib64").glob("libvixDiskLib.so.*")
        if (m := _SONAME_RE.match(p.name))
    }
    if not found:
        raise FileNotFoundError(f"{vddk} has no lib64/libvixDiskLib.so.N")
    return found[max(found)]


def probe(library: Path, jobs: Sequence[Job], env: dict[str, str] | None = None) -> list[Seen]:
    """Run `jobs` in order against `library` in a fresh process."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("VDDK_", "LD_LIB"))}
    full_env.update(env or {})
    full_env["LD_LIBRARY_PATH"] = str(library.parent)
    full_env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.testbed.vddkprobe", str(library)],
        input=json.dumps([asdict(j) for j in jobs]),
        env=full_env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"vddkprobe on {library} exited with {proc.returncode}: {proc.stderr}")
    out = []
    for r in json.loads(proc.stdout.splitlines()[-1]):
        r["locks"] = list(r.get("locks", []))
        r["queries"] = [(e, [tuple(b) for b in blocks]) for e, blocks in r["queries"]]
        r["reads"] = [tuple(x) for x in r["reads"]]
        out.append(Seen(**r))
    return out


# --- the child ---------------------------------------------------------------------------


def _run(library: str, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import cffi

    from ivdfs.vddk import _cdefs

    ffi = cffi.FFI()
    ffi.cdef(_cdefs.CDEFS)
    lib: Any = ffi.dlopen(library)
    err = lib.VixDiskLib_InitEx(7, 0, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL)
    if err:
        raise RuntimeError(f"InitEx: {err}")
    params = lib.VixDiskLib_AllocateConnectParams()
    conn = ffi.new("VixDiskLibConnection *")
    err = lib.VixDiskLib_ConnectEx(params, b"\x01", ffi.NULL, ffi.NULL, conn)
    if err:
        raise RuntimeError(f"ConnectEx: {err}")
    out = [_job(ffi, lib, conn[0], _from_json(j)) for j in jobs]
    if any(j["abandon"] for j in jobs):
        print(json.dumps(out), flush=True)
        os._exit(0)  # no Close, Disconnect or Exit: what a killed process leaves
    lib.VixDiskLib_Disconnect(conn[0])
    lib.VixDiskLib_FreeConnectParams(params)
    lib.VixDiskLib_Exit()
    return out


def _from_json(j: dict[str, Any]) -> Job:
    return Job(
        path=j["path"],
        flags=j["flags"],
        digest=j["digest"],
        queries=tuple((a, b, c) for a, b, c in j["queries"]),
        reads=tuple((a, b) for a, b in j["reads"]),
        locks=j["locks"],
        abandon=j["abandon"],
    )


def lock_files(folder: Path) -> list[str]:
    """The lock files in `folder`, as "<file>.lck/M*.lck" (the member's number is random)."""
    return sorted(
        f"{d.name}/{re.sub(r'^M[0-9]{5}[.]lck$', 'M*.lck', m.name)}" if m else f"{d.name}/"
        for d in folder.glob("*.lck")
        for m in (sorted(d.iterdir()) or [None])
    )


def _job(ffi: Any, lib: Any, conn: Any, job: Job) -> dict[str, Any]:
    handle = ffi.new("VixDiskLibHandle *")
    err = lib.VixDiskLib_Open(conn, job.path.encode(), job.flags | READ_ONLY, handle)
    if err:
        return asdict(Seen(open_error=int(err) & 0xFFFF))
    h = handle[0]
    try:
        info = ffi.new("VixDiskLibInfo **")
        err = lib.VixDiskLib_GetInfo(h, info)
        if err:
            raise RuntimeError(f"GetInfo of {job.path}: {err}")
        i = info[0]
        hint = ffi.string(i.parentFileNameHint).decode() if i.parentFileNameHint else None
        seen: dict[str, Any] = {
            "open_error": 0,
            "capacity": int(i.capacity),
            "num_links": int(i.numLinks),
            "parent_hint": hint,
            "sha256": None,
            "read_error": 0,
            "queries": [],
            "reads": [],
            "locks": lock_files(Path(job.path).parent) if job.locks else [],
        }
        lib.VixDiskLib_FreeInfo(i)
        buf = ffi.new("uint8_t[]", REQUEST * SECTOR)
        if job.digest:
            digest = hashlib.sha256()
            for start in range(0, seen["capacity"], REQUEST):
                n = min(REQUEST, seen["capacity"] - start)
                err = lib.VixDiskLib_Read(h, start, n, buf)
                if err:
                    seen["read_error"] = int(err) & 0xFFFF
                    break
                digest.update(ffi.buffer(buf, n * SECTOR))
            else:
                seen["sha256"] = digest.hexdigest()
        for start, n in job.reads:
            b = ffi.new("uint8_t[]", max(1, n) * SECTOR)
            err = lib.VixDiskLib_Read(h, start, n, b)
            got = None if err else hashlib.sha256(ffi.buffer(b, n * SECTOR)).hexdigest()
            seen["reads"].append((int(err) & 0xFFFF, got))
        for start, n, chunk in job.queries:
            bl = ffi.new("VixDiskLibBlockList **")
            err = lib.VixDiskLib_QueryAllocatedBlocks(h, start, n, chunk, bl)
            blocks: list[tuple[int, int]] = []
            if not err:
                p = ffi.cast("VixDiskLibBlock *", bl[0].blocks)
                blocks = [(int(p[k].offset), int(p[k].length)) for k in range(bl[0].numBlocks)]
                lib.VixDiskLib_FreeBlockList(bl[0])
            seen["queries"].append((int(err) & 0xFFFF, blocks))
        return seen
    finally:
        if not job.abandon:
            lib.VixDiskLib_Close(h)


if __name__ == "__main__":
    print(json.dumps(_run(sys.argv[1], json.load(sys.stdin))))
