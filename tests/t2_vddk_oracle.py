"""One oracle for the stand-in (issue 23): the same VixDiskLib calls on the stand-in and on
VMware's real library, in VDDK's local-file mode, with their results and error codes compared.

The calls: GetInfo's fields, GetTransportMode, Read (whole disk, at and past the end: 16007),
ReadAsync (completed inline in file mode, past the end, empty), QueryAllocatedBlocks (results
with links merged, and every case the real library refuses with error 3),
VIXDISKLIB_FLAG_OPEN_SINGLE_LINK, Open of a missing file and of no path, what failed calls leave
in their out-parameters, and GetErrorText of the codes ivdfs meets. The disks: raw
images for the stand-in (it has no VMDK parser), and for the real library VMDK chains that it
wrote itself from the same raw images (tests/realvddk.py's mkvmdk): every grain a link wrote is
allocated in the raw image, every other one is a hole, so both libraries see the same bytes and
the same allocation.

`RECORD` (t2_vddk_oracle.json) holds what VMware's VDDK 7.0.2 answered; without the real library
the stand-in is held to it (CI), with it (IVDFS_TEST_VDDK) the two are also compared call by call
and the real one must still answer as recorded. `python -m tests.t2_vddk_oracle record` writes
the record anew from the VDDK that IVDFS_TEST_VDDK names. InitEx happens once per process, so
each library runs the calls in its own subprocess (`python -m tests.t2_vddk_oracle calls LIB
CONFIG NAME=PATH...`), printing one JSON document.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests import realvddk
from tests.mounting import REPO, VDDK_LIBDIR

SECTOR = 512
GRAIN = realvddk.GRAIN
GRAIN_SECTORS = GRAIN // SECTOR
MAX_CHUNKS = 512 * 1024  # QueryAllocatedBlocks' limit per call
# The codes ivdfs meets (and shows the text of): the library's own, VixMntapi's, VIX_ASYNC.
ERROR_CODES = (1, 2, 3, 4, 6, 11, 13, 35, 36, 3014, 14008, 14009, 16007, 16053, 16054, 18000,
               24009, 24010, 25000)  # fmt: skip
SENTINEL = 0x5EA1ED  # an out-parameter's value before a call that fails
UUID_RE = re.compile(r"^([0-9a-fA-F]{2} ){7}[0-9a-fA-F]{2}-([0-9a-fA-F]{2} ){7}[0-9a-fA-F]{2}$")


def grain_data(seed: int, grain: int) -> bytes:
    return random.Random(f"{seed}:{grain}").randbytes(GRAIN)


# Disks: capacity (sectors) and the grains that hold data; the rest are holes.
BASE_CAP = 20 * 1024 + 77  # 10 MiB + 77 sectors: the last chunk is partial
BASE = {g: grain_data(1, g) for g in [0, 1, 2, 3, 40, 41, *range(100, 120), BASE_CAP // 128]}
# The chain: BASE as its first link; the second rewrites grain 2, zeroes grain 41 (a written
# grain of zeros: allocated), fills the hole at grain 60 and changes the partial last grain.
CHILD = {2: grain_data(2, 2), 41: bytes(GRAIN), 60: grain_data(2, 60),
         BASE_CAP // 128: grain_data(2, BASE_CAP // 128)}  # fmt: skip
TINY_CAP = 300  # smaller than a 512-sector chunk, and a partial 128-sector one
TINY = {0: grain_data(3, 0), 2: grain_data(3, 2)}
HUGE_CAP = (MAX_CHUNKS + 1) * 128 + 5  # one chunk of 128 more than one query may cover
HUGE = {0: grain_data(4, 0), (20 << 30) // GRAIN: grain_data(4, 1),
        HUGE_CAP // 128: grain_data(4, 2)}  # fmt: skip


def write_raw(path: Path, capacity: int, grains: dict[int, bytes]) -> None:
    """`grains` written (zeros too: allocated), everything else a hole."""
    size = capacity * SECTOR
    with open(path, "wb") as f:
        f.truncate(size)
        for g, data in sorted(grains.items()):
            off = g * GRAIN
            os.pwrite(f.fileno(), data[: size - off], off)


# --- the calls, run in a subprocess per library ------------------------------------------


def qab_cases(cap: int) -> list[tuple[int, int, int]]:
    """(start, sectors, chunk) for QueryAllocatedBlocks: accepted ones and each refusal."""
    whole128, whole2048 = cap // 128 * 128, cap // 2048 * 2048
    cases = [
        (0, whole128, 128),  # everything but the partial last chunk
        (0, whole2048, 2048),  # adjacent chunks joined into runs
        (128 * 3, 128 * 5, 128),
        (0, whole128 + 128, 128),  # the partial last chunk: beyond the disk
        (whole128, 128, 128),  # only the partial last chunk
        (0, 0, 128),  # an empty range
        (64, 0, 128),  # an empty range at an unaligned start
        (64, 128, 128),  # unaligned start
        (0, 200, 128),  # unaligned length
        (0, 1000, 100),  # chunk not a power of two, below the minimum
        (0, 128, 64),  # chunk below the minimum
        (0, 768, 384),  # chunk not a power of two
        (0, 262144, 262144),  # chunk above the maximum
        (0, 0, 512),  # chunk larger than a tiny disk, empty range
        (0, 256, 256),
    ]
    if cap >= (MAX_CHUNKS + 1) * 128:
        cases += [(0, MAX_CHUNKS * 128, 128), (0, (MAX_CHUNKS + 1) * 128, 128),
                  (0, 131072, 131072)]  # fmt: skip
    return cases


def read_cases(cap: int) -> list[tuple[int, int]]:
    return [(0, 0), (cap - 1, 1), (cap, 1), (cap - 1, 2), (cap + 100, 1), (0, 4097)]


def run_calls(lib_path: str, config: str, disks: dict[str, str]) -> dict[str, Any]:
    """Every call of the oracle on each disk; a flat dict of what the library answered.
    `config`: VDDK's configuration file (a private tmpDirectory, as ivdfs gives it)."""
    from ivdfs.vddk.library import ffi, log_callbacks

    lib = ffi.dlopen(lib_path)
    callbacks = log_callbacks(logging.getLogger("oracle"))
    out: dict[str, Any] = {}
    libdir = str(Path(lib_path).parent.parent).encode()
    out["InitEx"] = lib.VixDiskLib_InitEx(6, 7, *callbacks, libdir, config.encode())
    params = lib.VixDiskLib_AllocateConnectParams()
    conn_p = ffi.new("VixDiskLibConnection *")
    out["ConnectEx"] = lib.VixDiskLib_ConnectEx(params, b"\x01", ffi.NULL, ffi.NULL, conn_p)
    conn = conn_p[0]

    def open_disk(path: str, flags: int) -> tuple[int, Any]:
        h = ffi.new("VixDiskLibHandle *")
        h[0] = ffi.cast("VixDiskLibHandle", SENTINEL)
        err = lib.VixDiskLib_Open(conn, path.encode(), flags, h)
        return err, h[0]

    def info_of(h: Any) -> dict[str, Any]:
        p = ffi.new("VixDiskLibInfo **")
        err = lib.VixDiskLib_GetInfo(h, p)
        if err:
            return {"err": err}
        i = p[0]
        doc = {
            "err": err,
            "capacity": int(i.capacity),
            "numLinks": int(i.numLinks),
            "adapterType": int(i.adapterType),
            "biosGeo": [i.biosGeo.cylinders, i.biosGeo.heads, i.biosGeo.sectors],
            "physGeo": [i.physGeo.cylinders, i.physGeo.heads, i.physGeo.sectors],
            "logicalSectorSize": int(i.logicalSectorSize),
            "physicalSectorSize": int(i.physicalSectorSize),
            "parentFileNameHint": None
            if i.parentFileNameHint == ffi.NULL
            else ffi.string(i.parentFileNameHint).decode(),
            "uuid_format": bool(i.uuid != ffi.NULL and UUID_RE.match(ffi.string(i.uuid).decode())),
        }
        lib.VixDiskLib_FreeInfo(i)
        return doc

    def after_error(value: Any) -> str:
        """What a failed call did to its out-parameter, set to SENTINEL before."""
        if value == ffi.NULL:
            return "NULL"
        return "untouched" if int(ffi.cast("uintptr_t", value)) == SENTINEL else "changed"

    def qab(h: Any, start: int, n: int, chunk: int, null_list: bool = False) -> dict[str, Any]:
        p = ffi.NULL if null_list else ffi.new("VixDiskLibBlockList **")
        if not null_list:
            p[0] = ffi.cast("VixDiskLibBlockList *", SENTINEL)
        err = lib.VixDiskLib_QueryAllocatedBlocks(h, start, n, chunk, p)
        if null_list:
            return {"err": err}
        if err:
            return {"err": err, "blockList": after_error(p[0])}
        bl = p[0]
        blocks = ffi.cast("VixDiskLibBlock *", bl.blocks)
        runs = [[int(blocks[i].offset), int(blocks[i].length)] for i in range(bl.numBlocks)]
        lib.VixDiskLib_FreeBlockList(bl)
        return {"err": err, "runs": runs}

    def read_async(h: Any, start: int, n: int) -> dict[str, Any]:
        buf = ffi.new("uint8_t[]", max(n, 1) * SECTOR)
        seen: dict[str, Any] = {}
        returned = threading.Event()
        me = threading.get_ident()

        def done(_data: Any, err: int) -> None:
            seen.update(err=err, before_return=not returned.is_set(),
                        same_thread=threading.get_ident() == me)  # fmt: skip

        cb = ffi.callback("void(void *, VixError)", done)
        ret = lib.VixDiskLib_ReadAsync(h, start, n, buf, cb, ffi.NULL)
        returned.set()
        wait = lib.VixDiskLib_Wait(h)
        digest = hashlib.sha256(ffi.buffer(buf, n * SECTOR)).hexdigest()
        return {"ret": ret, "wait": wait, "callback": seen,
                "sha256": digest if seen.get("err") == 0 else None}  # fmt: skip

    for name, path in disks.items():
        err, h = open_disk(path, 4)
        out[f"{name}/Open"] = err
        if err:
            continue
        info = info_of(h)
        cap = info.get("capacity", 0)
        out[f"{name}/GetInfo"] = info
        out[f"{name}/GetTransportMode"] = ffi.string(lib.VixDiskLib_GetTransportMode(h)).decode()
        digest, errors = hashlib.sha256(), set()
        if cap < 1 << 24:  # the huge disk is checked at its ends only
            buf = ffi.new("uint8_t[]", 2048 * SECTOR)
            for s in range(0, cap, 2048):
                n = min(2048, cap - s)
                errors.add(lib.VixDiskLib_Read(h, s, n, buf))
                digest.update(ffi.buffer(buf, n * SECTOR))
            out[f"{name}/Read whole disk"] = {"errors": sorted(errors),
                                              "sha256": digest.hexdigest()}  # fmt: skip
        big = ffi.new("uint8_t[]", 4097 * SECTOR)
        for start, n in read_cases(cap):
            err = lib.VixDiskLib_Read(h, start, n, big)
            digest = hashlib.sha256(ffi.buffer(big, n * SECTOR)).hexdigest()
            out[f"{name}/Read cap{start - cap:+d} n={n}"] = {
                "err": err, "sha256": digest if err == 0 else None}  # fmt: skip
        for start, n in [(0, 128), (cap - 1, 1), (cap, 1), (cap - 1, 2), (0, 0)]:
            out[f"{name}/ReadAsync cap{start - cap:+d} n={n}"] = read_async(h, start, n)
        for start, n, chunk in qab_cases(cap):
            out[f"{name}/QueryAllocatedBlocks {start}+{n}/{chunk}"] = qab(h, start, n, chunk)
        out[f"{name}/QueryAllocatedBlocks NULL blockList"] = qab(h, 0, 128, 128, True)
        out[f"{name}/Close"] = lib.VixDiskLib_Close(h)
        err, h = open_disk(path, 4 | 2)
        out[f"{name}/Open SINGLE_LINK"] = err
        if err == 0:
            single = info_of(h)
            out[f"{name}/SINGLE_LINK GetInfo.numLinks"] = single.get("numLinks")
            out[f"{name}/SINGLE_LINK GetInfo.parentFileNameHint"] = single.get("parentFileNameHint")
            out[f"{name}/SINGLE_LINK QueryAllocatedBlocks"] = qab(h, 0, cap // 128 * 128, 128)
            lib.VixDiskLib_Close(h)
    err, h = open_disk("/nonexistent/ivdfs-oracle.vmdk", 4)
    out["Open missing file"] = {"err": err, "diskHandle": after_error(h)}
    h = ffi.new("VixDiskLibHandle *")
    out["Open NULL path"] = lib.VixDiskLib_Open(conn, ffi.NULL, 4, h)
    out["Disconnect"] = lib.VixDiskLib_Disconnect(conn)
    for code in ERROR_CODES:
        p = lib.VixDiskLib_GetErrorText(code, ffi.NULL)
        out[f"GetErrorText {code}"] = None if p == ffi.NULL else ffi.string(p).decode()
        lib.VixDiskLib_FreeErrorText(p)
    lib.VixDiskLib_FreeConnectParams(params)
    lib.VixDiskLib_Exit()
    return out


# --- the images and the two runs -----------------------------------------------------------


class Images:
    """Raw images for the stand-in, and (tier on) VMDKs the real library wrote from them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        merged = {**BASE, **CHILD}
        self.raws = {"base": (BASE_CAP, BASE), "chain": (BASE_CAP, merged),
                     "tiny": (TINY_CAP, TINY), "huge": (HUGE_CAP, HUGE)}  # fmt: skip
        for name, (cap, grains) in self.raws.items():
            write_raw(root / f"{name}.raw", cap, grains)
        self.vmdks: dict[str, Path] = {}
        self.links: dict[str, realvddk.Link] = {}

    def raw(self, name: str) -> Path:
        return self.root / f"{name}.raw"

    def write_vmdks(self) -> None:
        """The real library's own VMDKs of the same bytes: `chain` has two links."""
        for name in ("base", "tiny", "huge"):
            self.links[name] = realvddk.write_vmdk(self.root / f"{name}.vmdk", self.raw(name))
            self.vmdks[name] = self.root / f"{name}.vmdk"
        parent = realvddk.write_vmdk(self.root / "chain-1.vmdk", self.raw("base"))
        self.links["chain-1"] = parent
        self.links["chain"] = realvddk.write_vmdk(self.root / "chain.vmdk", self.raw("chain"),
                                                  parent.vmdk)  # fmt: skip
        self.vmdks["chain"] = self.root / "chain.vmdk"


def run(lib: Path, disks: dict[str, Path], log: Path) -> dict[str, Any]:
    """The calls on `lib` in a subprocess; VDDK's own files go next to `log`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VDDK_", "IVDFS_"))}
    env.update(LD_LIBRARY_PATH=str(lib.parent), PYTHONPATH=str(REPO), VDDK_STANDIN_LOG=str(log))
    tmp = log.parent / f"{log.stem}-tmp"
    tmp.mkdir(mode=0o700, exist_ok=True)
    config = log.parent / f"{log.stem}.conf"
    config.write_text(f'tmpDirectory = "{tmp}"\n')
    argv = [sys.executable, "-m", "tests.t2_vddk_oracle", "calls", str(lib), str(config),
            *(f"{k}={v}" for k, v in disks.items())]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return doc


def standin_library() -> Path:
    return VDDK_LIBDIR / "lib64" / "libvixDiskLib.so.8"


def without_links(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` less what depends on how many links the chain has: a raw image has one, the
    VMDK chain two (the tier checks those answers of the real library on their own)."""
    out = {k: v for k, v in doc.items() if not k.startswith("chain/SINGLE_LINK")}
    out["chain/GetInfo"] = {k: v for k, v in doc["chain/GetInfo"].items() if k != "numLinks"}
    return out


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Every call whose answer differs, as `call: a != b`."""
    return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b), key=str)
            if a.get(k) != b.get(k)]  # fmt: skip


@pytest.fixture(scope="module")
def images(built_testbed: None, tmp_path_factory: pytest.TempPathFactory) -> Images:
    return Images(tmp_path_factory.mktemp("oracle"))


@pytest.fixture(scope="module")
def standin(images: Images, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    log = tmp_path_factory.mktemp("oracle-log") / "standin.log"
    return run(standin_library(), {n: images.raw(n) for n in images.raws}, log)


@pytest.fixture(scope="module")
def real(images: Images, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    vddk = realvddk.vddk_dir()
    assert vddk is not None
    images.write_vmdks()
    log = tmp_path_factory.mktemp("oracle-log") / "real.log"
    return run(realvddk.real_library(vddk), images.vmdks, log)


def test_the_stand_in_answers_as_vddk_7_0_2_did(standin: dict[str, Any]) -> None:
    assert differences(without_links(standin), without_links(RECORD)) == []


@pytest.mark.real_vddk
def test_the_stand_in_answers_as_the_real_library_does(
    standin: dict[str, Any], real: dict[str, Any]
) -> None:
    assert differences(without_links(standin), without_links(real)) == []


@pytest.mark.real_vddk
def test_the_real_library_still_answers_as_recorded(real: dict[str, Any]) -> None:
    assert differences(real, RECORD) == []


@pytest.mark.real_vddk
def test_the_real_library_reads_a_chain_as_merged_and_a_single_link_as_its_changes(
    images: Images, real: dict[str, Any]
) -> None:
    """What the stand-in (one raw image per snapshot) cannot show: the links themselves."""
    child = images.links["chain"]
    assert images.links["chain-1"].written == set(BASE)  # all-zero grains left unwritten
    assert child.written == set(CHILD) and child.links == 2
    assert real["chain/GetInfo"]["numLinks"] == 2
    assert real["chain/SINGLE_LINK GetInfo.numLinks"] == 1
    # The parent's name shows only when the link is opened alone.
    assert real["chain/GetInfo"]["parentFileNameHint"] is None
    assert real["chain/SINGLE_LINK GetInfo.parentFileNameHint"] == "chain-1.vmdk"
    # SINGLE_LINK: only the grains this link wrote, i.e. what changed since its parent (the
    # partial last grain is beyond any whole chunk).
    whole = [g for g in sorted(CHILD) if (g + 1) * GRAIN_SECTORS <= BASE_CAP]
    assert real["chain/SINGLE_LINK QueryAllocatedBlocks"] == {
        "err": 0, "runs": [[g * GRAIN_SECTORS, GRAIN_SECTORS] for g in whole]}  # fmt: skip


# What VMware's VDDK 7.0.2 (build-17696664) answered, in local-file mode on VMDKs it wrote.
RECORD_FILE = Path(__file__).with_suffix(".json")
RECORD: dict[str, Any] = json.loads(RECORD_FILE.read_text())


def record() -> None:
    """Writes RECORD_FILE from the real library that IVDFS_TEST_VDDK names."""
    import tempfile

    vddk = realvddk.vddk_dir()
    if vddk is None:
        sys.exit(realvddk.SKIP_REASON)
    with tempfile.TemporaryDirectory(prefix="oracle-") as tmp:
        images = Images(Path(tmp))
        images.write_vmdks()
        doc = run(realvddk.real_library(vddk), images.vmdks, Path(tmp) / "real.log")
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items()]  # one call a line
    RECORD_FILE.write_text("{\n" + ",\n".join(lines) + "\n}\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["record"]:
        record()
    else:
        assert sys.argv[1] == "calls"
        disks = dict(a.split("=", 1) for a in sys.argv[4:])
        print(json.dumps(run_calls(sys.argv[2], sys.argv[3], disks)))
