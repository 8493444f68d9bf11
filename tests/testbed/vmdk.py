"""Test-bed VMDK chains: the files of an IVD and its snapshots as a datastore holds them.

Role: from raw images, one per link, write the chain of VMDK files that ESXi keeps in an IVD's
``fcd/`` folder, so that tests can read a snapshot's VMDK directly (issue 24), through the
stand-in VDDK and through VMware's own library in its local-file mode. Written from VMware's
"Virtual Disk Format 1.1" specification (hosted sparse extents, descriptor files); nothing here
comes from VMware's code.

A chain is a base and one child per later link, named as ESXi names an FCD's files:
``<stem>.vmdk``, ``<stem>-000001.vmdk``, ``<stem>-000002.vmdk``, ... (``fcd_file_names``). Each
child's ``parentFileNameHint`` names the previous link (relative: same folder) and its
``parentCID`` is the previous link's ``CID``. Two layouts:

- ``"sparse"``: every link a hosted ``monolithicSparse`` file (header, embedded descriptor,
  redundant and primary grain directories and tables, grains), as VMware's hosted products
  and VDDK's ``VixDiskLib_Create`` write them.
- ``"flat"``: the base is a ``vmfs`` descriptor ``<stem>.vmdk`` with one ``VMFS`` extent
  ``<stem>-flat.vmdk`` (a plain file, holes kept), as ESXi stores a thick or thin base on
  VMFS/NFS; the children are ``monolithicSparse`` as above.

Which createType the children have, and why: on a real VMFS or NFS datastore ESXi writes a
snapshot's child as ``vmfsSparse`` (a descriptor plus ``-delta.vmdk`` in the COWD format) or,
from VMFS 6 and for disks over 2 TB, ``seSparse`` (``-sesparse.vmdk``). VDDK 7.0.2 in its
local-file mode cannot create either (``CreateChild`` and ``Clone`` with
``VIXDISKLIB_DISK_VMFS_SPARSE`` fail with 16013, measured), and our stand-in reads only what we
can check against the real library, so children here are the hosted ``monolithicSparse``
format, which both read, with the descriptor fields (CID, parentCID, parentFileNameHint) that
any child has. The chain's names, links and grain-level deltas are ESXi's; the delta format is
the hosted one.

Only grains that hold something are written: for the base, the grains that are not all zeros
(a ``flat`` base keeps the image's holes); for a child, the grains whose bytes differ from the
previous image. So a child's allocated grains are exactly what changed since its parent, and
unwritten grains of the base are holes: reads fall through to the parent, and finally to zeros.

Files are written under a temporary name and renamed into place, so a reader never sees half a
link (and a rewritten link is a new inode, as on a datastore after consolidation).

Concurrency contract: pure functions over their own target paths; chains in different folders
(or with different stems) can be written in parallel.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import uuid
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SECTOR = 512
GRAIN_SECTORS = 128  # 64 KiB, the default grain of VMware's hosted sparse disks
GTES_PER_GT = 512  # fixed by the specification
DESCRIPTOR_SECTORS = 20  # what VMware reserves for an embedded descriptor
SPARSE_MAGIC = 0x564D444B  # "KDMV"
FLAG_NEWLINE_TEST = 1 << 0  # the header's end-of-line characters are valid
FLAG_REDUNDANT_GT = 1 << 1  # a redundant grain directory and tables follow the header
NO_PARENT_CID = 0xFFFFFFFF
HEADER = struct.Struct("<IIIQQQQIQQQ?ccccH")  # SparseExtentHeader without its padding

Layout = Literal["sparse", "flat"]


@dataclass(frozen=True)
class Link:
    """One written link: its descriptor, the files holding its extents, its content IDs and
    the grains it holds (grain numbers; for a flat base, the image's non-zero grains)."""

    descriptor: Path
    extents: tuple[Path, ...]
    cid: int
    parent_cid: int
    create_type: str
    grains: tuple[int, ...]


def fcd_file_names(stem: str, links: int) -> list[str]:
    """ESXi's names for an FCD with `links` links: the base, then -000001 ... ."""
    return [f"{stem}.vmdk"] + [f"{stem}-{k:06d}.vmdk" for k in range(1, links)]


def flat_extent_name(descriptor_name: str) -> str:
    """The data file of a ``vmfs`` descriptor: x.vmdk -> x-flat.vmdk."""
    return f"{descriptor_name.removesuffix('.vmdk')}-flat.vmdk"


def new_cid(rng: random.Random) -> int:
    """A content ID; never 0xffffffff ("no parent") or 0xfffffffe (VMware's "new disk")."""
    while True:
        cid = rng.getrandbits(32)
        if cid < 0xFFFFFFFE:
            return cid


def write_chain(
    directory: str | os.PathLike[str],
    names: Sequence[str],
    images: Sequence[str | os.PathLike[str]],
    *,
    layout: Layout = "sparse",
    grain_sectors: int = GRAIN_SECTORS,
    redundant: bool = True,
    seed: int | None = None,
) -> list[Link]:
    """Write link k of the chain as `directory`/`names[k]` holding `images[k]`'s bytes.

    All images must have the same size, a whole number of sectors (the disk's capacity).
    `grain_sectors`: a power of two, at least 8 (4 KiB); `redundant`: write the redundant
    grain directory as VMware does (flag bit 1); `seed`: CIDs and UUIDs from a seeded RNG.
    Returns the links, base first.
    """
    if len(names) != len(images) or not names:
        raise ValueError("one name per image, at least one")
    if grain_sectors < 8 or grain_sectors & (grain_sectors - 1):
        raise ValueError(f"grain of {grain_sectors} sectors: a power of two, at least 8")
    size = os.stat(images[0]).st_size
    if size == 0 or size % SECTOR:
        raise ValueError(f"{images[0]}: {size} bytes is not a whole number of sectors")
    for img in images[1:]:
        if os.stat(img).st_size != size:
            raise ValueError(f"{img}: not the size of {images[0]} ({size} bytes)")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    capacity = size // SECTOR
    links: list[Link] = []
    parent_cid = NO_PARENT_CID
    for k, (name, image) in enumerate(zip(names, images, strict=True)):
        cid = new_cid(rng)
        previous = images[k - 1] if k else None
        parent_hint = names[k - 1] if k else None
        if k == 0 and layout == "flat":
            link = _write_flat_base(folder, name, image, capacity, grain_sectors, cid, rng)
        else:
            link = _write_sparse(
                folder / name,
                _changed_grains(image, previous, capacity, grain_sectors),
                image,
                capacity,
                grain_sectors,
                cid=cid,
                parent_cid=parent_cid,
                parent_hint=parent_hint,
                redundant=redundant,
                rng=rng,
            )
        links.append(link)
        parent_cid = cid
    return links


def _changed_grains(
    image: str | os.PathLike[str],
    previous: str | os.PathLike[str] | None,
    capacity: int,
    grain_sectors: int,
) -> list[int]:
    """The grains of `image` that differ from `previous` (None: from zeros)."""
    grain = grain_sectors * SECTOR
    ngrains = -(-capacity // grain_sectors)
    step = max(1, (1 << 20) // grain)  # compare a MiB at a time, then grain by grain
    out: list[int] = []
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(open(image, "rb", buffering=0)).fileno()
        b = stack.enter_context(open(previous, "rb", buffering=0)).fileno() if previous else -1
        for first in range(0, ngrains, step):
            count = min(step, ngrains - first)
            x = _pread_padded(a, first * grain, count * grain)
            y = _pread_padded(b, first * grain, count * grain) if b >= 0 else bytes(len(x))
            if x == y:
                continue
            out += [
                first + i
                for i in range(count)
                if x[i * grain : (i + 1) * grain] != y[i * grain : (i + 1) * grain]
            ]
    return out


def _pread_padded(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes at `offset`, zero-padded past the end of the file."""
    data = os.pread(fd, length, offset)
    return data if len(data) == length else data + bytes(length - len(data))


def _descriptor(
    *,
    cid: int,
    parent_cid: int,
    create_type: str,
    parent_hint: str | None,
    extent: str,
    ddb: dict[str, str],
) -> bytes:
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        'encoding="UTF-8"',
        f"CID={cid:08x}",
        f"parentCID={parent_cid:08x}",
        'isNativeSnapshot="no"',
        f'createType="{create_type}"',
    ]
    if parent_hint is not None:
        lines.append(f'parentFileNameHint="{parent_hint}"')
    lines += ["", "# Extent description", extent, "", "# The Disk Data Base", "#DDB", ""]
    lines += [f'{k} = "{v}"' for k, v in ddb.items()]
    return ("\n".join(lines) + "\n").encode()


def _geometry(capacity: int) -> tuple[int, int, int]:
    """VMware's geometry for a disk it creates: 64 x 32 below 1 GiB, 128 x 32 below 2 GiB,
    255 x 63 from there (cylinders, heads, sectors)."""
    heads = 64 if capacity < 1 << 21 else 128 if capacity < 1 << 22 else 255
    sectors = 63 if heads == 255 else 32
    return max(1, capacity // (heads * sectors)), heads, sectors


def _base_ddb(capacity: int, cid: int, rng: random.Random) -> dict[str, str]:
    cyl, heads, sectors = _geometry(capacity)
    u = uuid.UUID(int=rng.getrandbits(128)).bytes
    return {
        "ddb.adapterType": "lsilogic",
        "ddb.geometry.cylinders": str(cyl),
        "ddb.geometry.heads": str(heads),
        "ddb.geometry.sectors": str(sectors),
        "ddb.longContentID": f"{rng.getrandbits(96):024x}{cid:08x}",
        "ddb.uuid": " ".join(f"{b:02x}" for b in u[:8]) + "-" + " ".join(f"{b:02x}" for b in u[8:]),
        "ddb.virtualHWVersion": "13",
    }


def _child_ddb(cid: int, rng: random.Random) -> dict[str, str]:
    return {"ddb.longContentID": f"{rng.getrandbits(96):024x}{cid:08x}"}


def _write_flat_base(
    folder: Path,
    name: str,
    image: str | os.PathLike[str],
    capacity: int,
    grain_sectors: int,
    cid: int,
    rng: random.Random,
) -> Link:
    """A ``vmfs`` descriptor and its ``-flat.vmdk``: the image, with a hole wherever a grain
    is all zeros (a thin disk on NFS or VMFS)."""
    flat_name = flat_extent_name(name)
    flat = folder / flat_name
    grains = _changed_grains(image, None, capacity, grain_sectors)
    grain = grain_sectors * SECTOR
    with _replacing(flat) as tmp, open(image, "rb", buffering=0) as src, open(tmp, "wb") as dst:
        dst.truncate(capacity * SECTOR)
        for g in grains:
            data = os.pread(src.fileno(), min(grain, capacity * SECTOR - g * grain), g * grain)
            os.pwrite(dst.fileno(), data, g * grain)
    text = _descriptor(
        cid=cid,
        parent_cid=NO_PARENT_CID,
        create_type="vmfs",
        parent_hint=None,
        extent=f'RW {capacity} VMFS "{flat_name}" 0',
        ddb=_base_ddb(capacity, cid, rng) | {"ddb.thinProvisioned": "1"},
    )
    with _replacing(folder / name) as tmp:
        tmp.write_bytes(text)
    return Link(folder / name, (flat,), cid, NO_PARENT_CID, "vmfs", tuple(grains))


def _write_sparse(
    path: Path,
    grains: Sequence[int],
    image: str | os.PathLike[str],
    capacity: int,
    grain_sectors: int,
    *,
    cid: int,
    parent_cid: int,
    parent_hint: str | None,
    redundant: bool,
    rng: random.Random,
) -> Link:
    """A hosted monolithicSparse file holding `grains` of `image`.

    Layout as VMware's: header (sector 0), descriptor (1..20), then the redundant grain
    directory and its tables, the grain directory and its tables (every table allocated), the
    overhead rounded up to a grain, then the grains in order.
    """
    ngrains = -(-capacity // grain_sectors)
    ngts = -(-ngrains // GTES_PER_GT)
    gd_sectors = -(-ngts * 4 // SECTOR)
    gt_sectors = ngts * GTES_PER_GT * 4 // SECTOR
    pos = 1 + DESCRIPTOR_SECTORS
    rgd = 0
    if redundant:
        rgd, pos = pos, pos + gd_sectors + gt_sectors
    gd, pos = pos, pos + gd_sectors + gt_sectors
    overhead = -(-pos // grain_sectors) * grain_sectors
    create_type = "monolithicSparse"
    text = _descriptor(
        cid=cid,
        parent_cid=parent_cid,
        create_type=create_type,
        parent_hint=parent_hint,
        extent=f'RW {capacity} SPARSE "{path.name}"',
        ddb=_base_ddb(capacity, cid, rng) if parent_hint is None else _child_ddb(cid, rng),
    )
    if len(text) > DESCRIPTOR_SECTORS * SECTOR:
        raise ValueError(f"{path}: descriptor of {len(text)} bytes does not fit")
    flags = FLAG_NEWLINE_TEST | (FLAG_REDUNDANT_GT if redundant else 0)
    header = HEADER.pack(
        SPARSE_MAGIC, 1, flags, capacity, grain_sectors, 1, DESCRIPTOR_SECTORS, GTES_PER_GT,
        rgd, gd, overhead, False, b"\n", b" ", b"\r", b"\n", 0,
    )  # fmt: skip
    gt = array("I", bytes(ngts * GTES_PER_GT * 4))
    grain = grain_sectors * SECTOR
    with _replacing(path) as tmp, open(image, "rb", buffering=0) as src, open(tmp, "wb") as f:
        fd = f.fileno()
        os.pwrite(fd, header.ljust(SECTOR, b"\0"), 0)
        os.pwrite(fd, text, SECTOR)
        at = overhead
        for g in grains:
            data = _pread_padded(src.fileno(), g * grain, grain)
            os.pwrite(fd, data, at * SECTOR)
            gt[g] = at
            at += grain_sectors
        f.truncate(at * SECTOR)
        if gt.itemsize != 4 or struct.pack("=I", 1) != struct.pack("<I", 1):
            raise RuntimeError("grain tables are written as little-endian uint32")
        for directory in ([rgd] if redundant else []) + [gd]:
            tables = directory + gd_sectors
            entries = array("I", (tables + t * GTES_PER_GT * 4 // SECTOR for t in range(ngts)))
            os.pwrite(fd, entries.tobytes(), directory * SECTOR)
            os.pwrite(fd, gt.tobytes(), tables * SECTOR)
    return Link(path, (path,), cid, parent_cid, create_type, tuple(grains))


class _replacing:
    """Write to a temporary name beside `path`, then rename it over `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
