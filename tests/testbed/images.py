"""Test-bed disk images built with the real tools, plus manifests of what they hold.

Role: give tests, the demo and the benchmarks disks whose layout and contents are known without
trusting ivdfs: tables come from parted, filesystems from mkfs.ext4 / mkfs.vfat / mkntfs /
mkfs.xfs / mkfs.btrfs, files from ``mkfs.ext4 -d``, mcopy, ntfscp, ``mkfs.xfs -p`` (a prototype
file) and ``mkfs.btrfs --rootdir``. Nothing is mounted: each filesystem is built in its own
file and copied, holes skipped, to the offset parted (or lvm2) reports.

LVM2 disks are laid out by lvm2 itself (pvcreate, vgcreate, lvcreate) on loop devices of the
scratch image, in a sandbox (`_LvmSandbox`): a private LVM_SYSTEM_DIR whose lvm.conf accepts
only those loop devices and disables activation, hints, backups and archives, so the host's
LVM never records, caches or activates anything and this kernel needs no device-mapper. The
loop devices are detached before the builder returns; each LV's filesystem is then written at
the extents that ``lvs --segments`` and ``pvs`` reported (striped ones chunk by chunk).

Every builder takes a target path (overwritten), returns a frozen manifest and leaves the image
sparse. A 64 MiB partitioned disk takes a fraction of a second.

Limits: ntfscp cannot create directories, so NTFS partitions hold only top-level files (the
manifest lists exactly what is there). mkfs.xfs refuses filesystems under 300 MB and mkfs.btrfs
under about 110 MiB: such images are bigger, but sparse. Needs parted, e2fsprogs, dosfstools,
mtools, ntfs-3g, xfsprogs, btrfs-progs and lvm2 (all in scripts/setup); the LVM builders need
root for their loop devices.

Concurrency contract: builders touch only their target path and a scratch directory beside it
(and, for LVM, loop devices of their own), so different targets can be built in parallel.

Usage from a shell (demo, benchmarks): ``python -m tests.testbed.images gpt /tmp/disk.img``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.testbed import ldm

MiB = 1 << 20
SECTOR = 512
BLOB_SIZE = MiB

# Tools print locale-dependent text and mtools refuses odd geometries unless told otherwise.
_ENV = {**os.environ, "LC_ALL": "C.UTF-8", "MTOOLS_SKIP_CHECK": "1"}


@dataclass(frozen=True)
class PartitionManifest:
    """One partition (number 0: a filesystem spanning the whole disk) and its files."""

    number: int
    start: int  # bytes
    length: int  # bytes
    fs: str | None  # as ivdfs.formats.filesystems.detect_filesystem names it
    name: str = ""  # GPT partition name
    bootable: bool = False
    files: dict[str, str] = field(default_factory=dict)  # POSIX relative path -> sha256 hex


@dataclass(frozen=True)
class SegmentManifest:
    """One LV segment as ``lvs --segments`` and ``pvs`` report it, in disk bytes."""

    lv_offset: int
    length: int
    segtype: str  # "linear", "striped", "zero", ...
    stripes: tuple[int, ...]  # disk offset where each stripe's area starts (none: no PV)
    stripe_size: int  # bytes per chunk as lvs reports it (0 for linear)


@dataclass(frozen=True)
class LvManifest:
    """A logical volume: where lvm2 put it and what was written there."""

    vg: str
    name: str
    size: int
    segments: tuple[SegmentManifest, ...]
    fs: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # POSIX relative path -> sha256 hex
    sha256: str = ""  # of the LV's bytes; "" when nothing was written (an unsupported type)


@dataclass(frozen=True)
class MetadataManifest:
    """Where a PV's committed metadata text lies, as ``pvck --dump headers`` reports it."""

    pv_start: int  # disk offset of the PV
    mda_start: int  # of the metadata area, from the PV's start
    mda_size: int
    text_offset: int  # from the area's start
    text_size: int

    @property
    def wrapped(self) -> bool:
        return self.text_offset + self.text_size > self.mda_size


@dataclass(frozen=True)
class DiskManifest:
    """A disk image: its table scheme, data partitions (no extended containers), files."""

    path: Path
    size: int
    scheme: str  # "gpt", "mbr" or "none"
    partitions: tuple[PartitionManifest, ...] = ()
    whole_disk: PartitionManifest | None = None  # bare filesystem without a table
    damage: str = ""  # corrupt_gpt_disk / corrupt_lvm_disk: what was damaged
    pvs: tuple[tuple[int, int], ...] = ()  # LVM PV windows (disk offset, length)
    lvs: tuple[LvManifest, ...] = ()
    metadata: tuple[MetadataManifest, ...] = ()  # one per PV, in pvs order


@dataclass(frozen=True)
class DataManifest:
    """A disk of raw data: which `block_size` blocks hold data (the rest are holes)."""

    path: Path
    size: int
    seed: int
    block_size: int
    allocated: tuple[int, ...]  # indexes of blocks holding block_data(seed, index)
    sha256: str  # of the whole disk, holes read as zeros


# --------------------------------------------------------------------------------------------
# Helpers


def _run(*args: str | Path | int, env: dict[str, str] | None = None) -> str:
    argv = [str(a) for a in args]
    if shutil.which(argv[0]) is None:
        raise RuntimeError(f"{argv[0]} not found; run scripts/setup")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env or _ENV, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def block_data(seed: int, index: int, size: int = MiB) -> bytes:
    """Deterministic random-looking bytes for block `index`; computable without the image.

    shake_128 runs at ~300 MB/s here, about twice random.randbytes, and lets any block be
    recomputed on its own when a benchmark or test verifies what it read.
    """
    return hashlib.shake_128(f"ivdfs-block:{seed}:{index}".encode()).digest(size)


def _blank(path: Path, size: int) -> None:
    """Create or replace `path` as a fully sparse file of `size` bytes."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) of the non-hole parts of an open file."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size) - start
        pos = end


def _copy_sparse(src: Path, dst: Path, offset: int) -> None:
    """Write `src` into `dst` at `offset` (like dd conv=notrunc,sparse), skipping its holes."""
    size = src.stat().st_size
    with open(src, "rb") as s, open(dst, "r+b") as d:
        for start, length in _data_extents(s.fileno(), size):
            _copy_span(s.fileno(), d.fileno(), start, length, offset + start)


def _copy_span(src: int, dst: int, src_offset: int, length: int, dst_offset: int) -> None:
    """Copy `length` bytes between open files; all-zero pieces stay holes in the target."""
    done = 0
    while done < length:
        chunk = os.pread(src, min(MiB, length - done), src_offset + done)
        if not chunk:
            raise RuntimeError(f"short read at {src_offset + done}")
        if chunk.count(0) != len(chunk):
            os.pwrite(dst, chunk, dst_offset + done)
        done += len(chunk)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _payload(number: int, flat: bool) -> dict[str, bytes]:
    """The files placed in partition `number`: distinctive text, nesting, a seeded 1 MiB blob."""
    files = {
        "needle.txt": f"ivdfs-needle-{number}\n".encode(),
        "readme.txt": (
            f"Partition {number} of an ivdfs test image.\n"
            + "".join(f"line {i}: ivdfs-needle-{number}-{i}\n" for i in range(100))
        ).encode(),
        "blob.bin": block_data(number, 0xB10B, BLOB_SIZE),
    }
    if not flat:
        files["docs/deep/nested.txt"] = f"nested file in partition {number}\n".encode()
        files["docs/notes.txt"] = f"notes of partition {number}\n".encode()
    return files


def _stage(files: dict[str, bytes], root: Path) -> None:
    for rel, data in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _mkfs_ext4(
    image: Path, size: int, files: dict[str, bytes], scratch: Path, block: int = 0
) -> None:
    src = scratch / f"{image.name}.d"
    _stage(files, src)
    _blank(image, size)
    # A small ext4 gets 1 KiB blocks by default, which a 4Kn disk cannot hold.
    sized = ("-b", str(block)) if block else ()
    _run("mkfs.ext4", "-q", "-F", *sized, "-L", "ivdfs", "-d", src, image)


def _mkfs_vfat(
    image: Path, size: int, files: dict[str, bytes], scratch: Path, start_sector: int
) -> None:
    _blank(image, size)
    # FAT32 needs >= 65525 clusters; below ~33 MiB let mkfs.fat pick FAT12/16 instead.
    fat32 = ["-F", "32"] if size >= 36 * MiB else []
    _run("mkfs.vfat", *fat32, "-n", "IVDFS", "-h", str(start_sector), image)
    src = scratch / f"{image.name}.d"
    _stage(files, src)
    tops = sorted({rel.split("/", 1)[0] for rel in files})
    _run("mcopy", "-s", "-i", image, *(src / t for t in tops), "::/")


def _mkfs_ntfs(
    image: Path, size: int, files: dict[str, bytes], scratch: Path, start_sector: int
) -> None:
    _blank(image, size)
    # -p/-H/-S fill the boot sector's geometry as Windows expects for a partition at that spot.
    _run("mkntfs", "-F", "-Q", "-q", "-L", "ivdfs", "-s", "512",
         "-p", str(start_sector), "-H", "255", "-S", "63", image)  # fmt: skip
    for rel, data in files.items():
        if "/" in rel:
            raise ValueError(f"ntfscp cannot create directories: {rel}")
        src = scratch / f"{image.name}.{rel}"
        src.write_bytes(data)
        _run("ntfscp", "-q", image, src, rel)


def _mkfs_xfs(image: Path, size: int, files: dict[str, bytes], scratch: Path) -> None:
    """XFS with `files`, from a prototype file (mkfs.xfs -p): no mount needed."""
    src = scratch / f"{image.name}.d"
    _stage(files, src)
    if any(c.isspace() for c in str(src)):
        raise ValueError(f"mkfs.xfs prototype paths cannot hold spaces: {src}")
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def walk(d: Path, depth: int) -> None:
        for entry in sorted(d.iterdir()):
            pad = " " * depth
            if entry.is_dir():
                lines.append(f"{pad}{entry.name} d--755 0 0")
                walk(entry, depth + 1)
                lines.append(f"{pad}$")
            else:
                lines.append(f"{pad}{entry.name} ---644 0 0 {entry}")

    walk(src, 1)
    lines.append("$")
    proto = scratch / f"{image.name}.proto"
    proto.write_text("\n".join(lines) + "\n")
    _blank(image, size)
    _run("mkfs.xfs", "-q", "-f", "-L", "ivdfs", "-p", proto, image)


def _mkfs_btrfs(image: Path, size: int, files: dict[str, bytes], scratch: Path) -> None:
    src = scratch / f"{image.name}.d"
    _stage(files, src)
    _blank(image, size)
    _run("mkfs.btrfs", "-q", "-f", "-L", "ivdfs", "--rootdir", src, image)


_Mkfs = Callable[[Path, int, dict[str, bytes], Path, int], None]
# Smallest sizes the tools accept (mkfs.xfs: 300 MB; mkfs.btrfs with DUP metadata: ~110 MiB).
MIN_SIZE = {"xfs": 300 * MiB, "btrfs": 128 * MiB, "ext4": 4 * MiB}


def _mkfs_for(fs: str) -> _Mkfs:
    if fs == "ext4":
        return lambda img, size, files, scratch, _start: _mkfs_ext4(img, size, files, scratch)
    if fs == "ext4-4k":
        return lambda img, size, files, scratch, _start: _mkfs_ext4(img, size, files, scratch, 4096)
    if fs == "xfs":
        return lambda img, size, files, scratch, _start: _mkfs_xfs(img, size, files, scratch)
    if fs == "btrfs":
        return lambda img, size, files, scratch, _start: _mkfs_btrfs(img, size, files, scratch)
    if fs == "vfat":
        return _mkfs_vfat
    if fs == "ntfs":
        return _mkfs_ntfs
    raise ValueError(fs)


def _parted_layout(path: Path) -> dict[int, tuple[int, int, str, str]]:
    """parted's view: number -> (start, length, name, flags), all in bytes."""
    out = _run("parted", "-m", "-s", path, "unit", "B", "print")
    layout = {}
    for line in out.splitlines()[2:]:
        num, start, _end, size, _fs, name, flags = line.rstrip(";").split(":")
        layout[int(num)] = (int(start[:-1]), int(size[:-1]), name, flags)
    return layout


@dataclass(frozen=True)
class _Spec:
    number: int
    fs: str | None
    flat: bool = False


def _populate(
    path: Path, specs: list[_Spec], layout: dict[int, tuple[int, int, str, str]]
) -> tuple[PartitionManifest, ...]:
    """Build each spec'd filesystem beside `path` and copy it into its partition."""
    manifests = []
    with tempfile.TemporaryDirectory(prefix=".ivdfs-img-", dir=path.parent) as tmp:
        scratch = Path(tmp)
        for spec in specs:
            start, length, name, flags = layout[spec.number]
            files: dict[str, bytes] = {}
            if spec.fs is not None:
                files = _payload(spec.number, spec.flat)
                image = scratch / f"part{spec.number}.img"
                _mkfs_for(spec.fs)(image, length, files, scratch, start // SECTOR)
                _copy_sparse(image, path, start)
                image.unlink()
            manifests.append(
                PartitionManifest(
                    number=spec.number,
                    start=start,
                    length=length,
                    fs=spec.fs.removesuffix("-4k") if spec.fs else None,
                    name=name,
                    bootable="boot" in flags,  # "boot" (MBR) or "legacy_boot" (GPT)
                    files={rel: _sha256(data) for rel, data in files.items()},
                )
            )
    return tuple(manifests)


def _parted(path: Path, *commands: str) -> None:
    # parted pokes udev after writing and complains when it is absent; harmless on a file.
    _run("parted", "-s", "-a", "optimal", path, *commands)


# --------------------------------------------------------------------------------------------
# Builders


def gpt_disk(path: Path, size_mb: int = 64) -> DiskManifest:
    """GPT: 1 ext4 (legacy-bootable), 2 FAT32, 3 NTFS (top-level files only), each with files."""
    if size_mb < 64:
        raise ValueError("gpt_disk needs >= 64 MiB (FAT32 alone needs ~33 MiB)")
    path = Path(path)
    size = size_mb * MiB
    usable = size_mb - 2  # 1 MiB alignment gap at the start, GPT backup at the end
    fat = max(36, usable // 3)
    ntfs = max(8, usable // 4)
    ext = usable - fat - ntfs
    _blank(path, size)
    _parted(
        path, "mklabel", "gpt",
        "mkpart", "linux-root", "ext4", "1MiB", f"{1 + ext}MiB",
        "mkpart", "fat-data", "fat32", f"{1 + ext}MiB", f"{1 + ext + fat}MiB",
        "mkpart", "données", "ntfs", f"{1 + ext + fat}MiB", "100%",
        "set", "1", "legacy_boot", "on",
    )  # fmt: skip
    specs = [_Spec(1, "ext4"), _Spec(2, "vfat"), _Spec(3, "ntfs", flat=True)]
    parts = _populate(path, specs, _parted_layout(path))
    return DiskManifest(path, size, "gpt", parts)


def gpt_4kn_disk(path: Path, size_mb: int = 64) -> DiskManifest:
    """A 4Kn disk (4096-byte logical sectors): GPT header at byte 4096 (LBA 1), entries and
    partition bounds counted in 4096-byte LBAs, as parted writes them on a loop device with
    4096-byte sectors. 1 ext4 with files, 2 flat ext4 (top-level files only)."""
    path = Path(path)
    size = size_mb * MiB
    _blank(path, size)
    loop = _run("losetup", "--find", "--show", "--sector-size", "4096", path).strip()
    try:
        half = 1 + (size_mb - 2) // 2
        _parted(
            Path(loop), "mklabel", "gpt",
            "mkpart", "root-4k", "ext4", "1MiB", f"{half}MiB",
            "mkpart", "data-4k", "ext4", f"{half}MiB", "100%",
        )  # fmt: skip
        layout = _parted_layout(Path(loop))
    finally:
        _run("losetup", "--detach", loop)
    parts = _populate(path, [_Spec(1, "ext4-4k"), _Spec(2, "ext4-4k", flat=True)], layout)
    return DiskManifest(path, size, "gpt", parts)


def mbr_disk(path: Path, size_mb: int = 64) -> DiskManifest:
    """MBR: 1 primary ext4 (bootable), 2 extended holding logicals 5 ext4 and 6 FAT."""
    if size_mb < 32:
        raise ValueError("mbr_disk needs >= 32 MiB")
    path = Path(path)
    size = size_mb * MiB
    third = (size_mb - 4) // 3
    _blank(path, size)
    # Logicals start 1 MiB into the container's free space: room for each EBR, as fdisk leaves.
    _parted(
        path, "mklabel", "msdos",
        "mkpart", "primary", "ext4", "1MiB", f"{1 + third}MiB",
        "mkpart", "extended", f"{1 + third}MiB", "100%",
        "mkpart", "logical", "ext4", f"{2 + third}MiB", f"{2 + 2 * third}MiB",
        "mkpart", "logical", "fat32", f"{3 + 2 * third}MiB", "100%",
        "set", "1", "boot", "on",
    )  # fmt: skip
    specs = [_Spec(1, "ext4"), _Spec(5, "ext4"), _Spec(6, "vfat")]
    parts = _populate(path, specs, _parted_layout(path))
    return DiskManifest(path, size, "mbr", parts)


def bare_fs_disk(path: Path, size_mb: int = 32, fs: str = "ext4") -> DiskManifest:
    """A filesystem (ext4, xfs or btrfs) spanning the whole disk, no partition table.

    Two images built from one call's output are what two snapshots of an unchanged volume
    hold: the same filesystem UUID, byte for byte.
    """
    path = Path(path)
    size = size_mb * MiB
    if size < MIN_SIZE.get(fs, 0):
        raise ValueError(f"{fs} needs >= {MIN_SIZE[fs] // MiB} MiB")
    files = _payload(0, flat=False)
    with tempfile.TemporaryDirectory(prefix=".ivdfs-img-", dir=path.parent) as tmp:
        _mkfs_for(fs)(path, size, files, Path(tmp), 0)
    whole = PartitionManifest(0, 0, size, fs, files={rel: _sha256(d) for rel, d in files.items()})
    return DiskManifest(path, size, "none", (), whole_disk=whole)


def small_files_disk(path: Path, count: int = 2000, size_mb: int = 64) -> DiskManifest:
    """An ext4 spanning the whole disk holding `count` small files (1-8 KiB, seeded) in
    directories of 100: what an rsync of a guest's /etc or a mail spool looks like."""
    path = Path(path)
    size = size_mb * MiB
    rng = random.Random(count)
    files = {
        f"d{i // 100:03d}/f{i:05d}.txt": rng.randbytes(rng.randint(1024, 8192))
        for i in range(count)
    }
    with tempfile.TemporaryDirectory(prefix=".ivdfs-img-", dir=path.parent) as tmp:
        _mkfs_ext4(path, size, files, Path(tmp))
    whole = PartitionManifest(0, 0, size, "ext4", files={r: _sha256(d) for r, d in files.items()})
    return DiskManifest(path, size, "none", (), whole_disk=whole)


DAMAGE_KINDS = ("primary-header", "primary-entries", "backup-header", "both")


def corrupt_gpt_disk(path: Path, size_mb: int = 32, damage: str = "primary-header") -> DiskManifest:
    """A GPT disk (1 ext4 with files, 2 unformatted) with one or both table copies damaged.

    `damage`: "primary-header" (bytes of LBA 1 flipped), "primary-entries" (primary entry
    array flipped, header intact so only its array CRC fails), "backup-header" (last LBA
    flipped) or "both" (primary header and backup header). `partitions` lists what the table
    held before the damage: a parser should still find it for every kind except "both".
    """
    if damage not in DAMAGE_KINDS:
        raise ValueError(f"damage must be one of {DAMAGE_KINDS}")
    path = Path(path)
    size = size_mb * MiB
    half = (size_mb - 2) // 2
    _blank(path, size)
    _parted(
        path, "mklabel", "gpt",
        "mkpart", "data", "ext4", "1MiB", f"{1 + half}MiB",
        "mkpart", "spare", f"{1 + half}MiB", "100%",
    )  # fmt: skip
    parts = _populate(path, [_Spec(1, "ext4"), _Spec(2, None)], _parted_layout(path))
    last = size - SECTOR
    targets = {
        "primary-header": [SECTOR + 24],  # inside my_lba/alternate_lba
        "primary-entries": [2 * SECTOR + 40],  # entry 1's last LBA
        "backup-header": [last + 24],
        "both": [SECTOR + 24, last + 24],
    }[damage]
    with open(path, "r+b") as f:
        for off in targets:
            f.seek(off)
            byte = f.read(1)
            f.seek(off)
            f.write(bytes([byte[0] ^ 0x5A]))
    return DiskManifest(path, size, "gpt", parts, damage=damage)


# --------------------------------------------------------------------------------------------
# LVM2


class _LvmSandbox:
    """lvm2 on loop devices of one image and on nothing else.

    The loop devices map the PV windows of the image (read-write: lvm2 writes its labels and
    metadata there). A private LVM_SYSTEM_DIR holds the only lvm.conf these commands read: it
    accepts exactly those loop devices, disables activation (``global{activation=0}``: no
    device-mapper, which this kernel may lack, and nothing the host could see as /dev/<vg>),
    hints, udev, backups and archives, and keeps the lock files beside it. So the host's
    /etc/lvm and /run/lvm are never written, and once the loop devices are detached (always, on
    the way out) the host's ``vgs`` has nothing of ours to find.
    """

    def __init__(self, image: Path, windows: list[tuple[int, int]], scratch: Path) -> None:
        self.image = image
        self.windows = windows
        self.dir = scratch / "lvm"
        self.loops: list[str] = []
        self.env = {**_ENV, "LVM_SYSTEM_DIR": str(self.dir), "LVM_SUPPRESS_FD_WARNINGS": "1"}

    def __enter__(self) -> _LvmSandbox:
        try:
            for start, length in self.windows:
                out = _run("losetup", "--find", "--show", "--offset", start, "--sizelimit",
                           length, self.image)  # fmt: skip
                self.loops.append(out.strip())
            accept = " ".join(f'"a|^{loop}$|",' for loop in self.loops)
            (self.dir / "lock").mkdir(parents=True)
            (self.dir / "lvm.conf").write_text(
                f'global {{ activation = 0 locking_dir = "{self.dir / "lock"}" }}\n'
                "activation { udev_sync = 0 udev_rules = 0 }\n"
                "devices {\n"
                f'    filter = [ {accept} "r|.*|" ]\n'
                f'    global_filter = [ {accept} "r|.*|" ]\n'
                '    hints = "none"\n'
                "    obtain_device_list_from_udev = 0\n"
                "    use_devicesfile = 0\n"
                "    scan_lvs = 0\n"
                "}\n"
                "backup { backup = 0 archive = 0 }\n"
            )
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._detach()

    def _detach(self) -> None:
        errors = []
        for loop in reversed(self.loops):
            proc = subprocess.run(["losetup", "--detach", loop], capture_output=True, text=True)
            if proc.returncode != 0:
                errors.append(f"{loop}: {proc.stderr.strip()}")
        self.loops = []
        if errors:
            raise RuntimeError(f"cannot detach loop devices: {'; '.join(errors)}")

    def run(self, *args: str | int) -> str:
        return _run(*args, env=self.env)

    def report(self, command: str, fields: str, *args: str) -> list[dict[str, str]]:
        out = self.run(command, "--reportformat", "json", "--units", "b", "--nosuffix",
                       "-o", fields, *args)  # fmt: skip
        rows: list[dict[str, str]] = []
        for table in json.loads(out)["report"]:
            for v in table.values():
                rows.extend(v)
        return rows

    def window_of(self, loop: str) -> tuple[int, int]:
        return self.windows[self.loops.index(loop)]

    def metadata(self) -> tuple[MetadataManifest, ...]:
        """Each PV's committed metadata place, from ``pvck --dump headers``."""
        out = []
        for loop, (start, _length) in zip(self.loops, self.windows, strict=True):
            fields: dict[str, int] = {}
            for line in self.run("pvck", "--dump", "headers", loop).splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0].startswith("mda_header_1."):
                    try:
                        fields[parts[0].removeprefix("mda_header_1.")] = int(parts[1], 0)
                    except ValueError:
                        pass
            out.append(
                MetadataManifest(
                    start,
                    fields["start"],
                    fields["size"],
                    fields["raw_locn[0].offset"],
                    fields["raw_locn[0].size"],
                )
            )
        return tuple(out)

    def layout(self, vg: str) -> dict[str, tuple[SegmentManifest, ...]]:
        """LV name -> its segments in disk bytes, from lvs --segments and pvs only."""
        pvs = {r["pv_name"]: r for r in self.report("pvs", "pv_name,pe_start,vg_extent_size")}
        rows = self.report(
            "lvs", "lv_name,seg_start,seg_size,segtype,stripes,stripe_size,seg_pe_ranges",
            "--segments", vg,
        )  # fmt: skip
        out: dict[str, list[SegmentManifest]] = {}
        for r in rows:
            stripes = []
            for rng in r["seg_pe_ranges"].split():
                dev, _, pe = rng.rpartition(":")
                first = int(pe.split("-")[0])
                pv = pvs[dev]
                offset = int(pv["pe_start"]) + first * int(pv["vg_extent_size"])
                stripes.append(self.window_of(dev)[0] + offset)
            seg = SegmentManifest(
                int(r["seg_start"]), int(r["seg_size"]), r["segtype"], tuple(stripes),
                int(r["stripe_size"]),
            )  # fmt: skip
            out.setdefault(r["lv_name"], []).append(seg)
        return {k: tuple(sorted(v, key=lambda s: s.lv_offset)) for k, v in out.items()}


def _write_lv(disk: Path, image: Path, segments: tuple[SegmentManifest, ...]) -> None:
    """Write an LV's bytes (`image`) where lvm2 put its segments: chunk by chunk when striped."""
    with open(image, "rb") as s, open(disk, "r+b") as d:
        for seg in segments:
            n = len(seg.stripes)
            chunk = seg.stripe_size if n > 1 else seg.length
            for k in range(seg.length // chunk):
                row, stripe = divmod(k, n)
                _copy_span(s.fileno(), d.fileno(), seg.lv_offset + k * chunk, chunk,
                           seg.stripes[stripe] + row * chunk)  # fmt: skip


@dataclass(frozen=True)
class _LvSpec:
    name: str
    fs: str | None
    number: int  # payload number: files say ivdfs-needle-<number>


def _populate_lvs(
    sandbox: _LvmSandbox, vg: str, specs: list[_LvSpec], scratch: Path
) -> tuple[LvManifest, ...]:
    layout = sandbox.layout(vg)
    out = []
    for spec in specs:
        segments = layout[spec.name]
        size = sum(s.length for s in segments)
        files: dict[str, bytes] = {}
        digest = ""
        if spec.fs is not None:
            files = _payload(spec.number, flat=False)
            image = scratch / f"lv-{spec.name}.img"
            _mkfs_for(spec.fs)(image, size, files, scratch, 0)
            _write_lv(sandbox.image, image, segments)
            with open(image, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            image.unlink()
        out.append(
            LvManifest(
                vg,
                spec.name,
                size,
                segments,
                spec.fs,
                {rel: _sha256(data) for rel, data in files.items()},
                digest,
            )
        )
    return tuple(out)


LVM_LAYOUTS = ("partition", "whole")


def lvm_disk(path: Path, layout: str = "partition") -> DiskManifest:
    """LVM2: VG ``ivdvg`` with LVs ``data`` (XFS, 320 MiB in two segments) and ``logs`` (ext4).

    `layout` "partition": GPT with 1 a small ext4 and 2 the PV (type lvm); "whole": the PV spans
    the whole disk, without a table. 400 MiB, sparse.
    """
    if layout not in LVM_LAYOUTS:
        raise ValueError(f"layout must be one of {LVM_LAYOUTS}")
    path = Path(path)
    size = 400 * MiB
    _blank(path, size)
    parts: tuple[PartitionManifest, ...] = ()
    if layout == "partition":
        _parted(
            path, "mklabel", "gpt",
            "mkpart", "boot", "ext4", "1MiB", "17MiB",
            "mkpart", "lvm", "17MiB", "100%",
            "set", "2", "lvm", "on",
        )  # fmt: skip
        parts = _populate(path, [_Spec(1, "ext4"), _Spec(2, None)], _parted_layout(path))
        window = (parts[1].start, parts[1].length)
    else:
        window = (0, size)
    with tempfile.TemporaryDirectory(prefix=".ivdfs-img-", dir=path.parent) as tmp:
        scratch = Path(tmp)
        with _LvmSandbox(path, [window], scratch) as lvm:
            lvm.run("pvcreate", "-q", lvm.loops[0])
            lvm.run("vgcreate", "-q", "ivdvg", lvm.loops[0])
            # data is extended after logs was created: two segments with logs between them.
            lvm.run("lvcreate", "-q", "-n", "data", "-L", "160M", "ivdvg")
            lvm.run("lvcreate", "-q", "-n", "logs", "-L", "32M", "ivdvg")
            lvm.run("lvextend", "-q", "-L", "+160M", "ivdvg/data")
            specs = [_LvSpec("data", "xfs", 11), _LvSpec("logs", "ext4", 12)]
            lvs = _populate_lvs(lvm, "ivdvg", specs, scratch)
            metadata = lvm.metadata()
    scheme = "gpt" if layout == "partition" else "none"
    return DiskManifest(path, size, scheme, parts, pvs=(window,), lvs=lvs, metadata=metadata)


# Guest-volume matrix (issue 27): partition number -> (filesystem, MiB); 6 is an LVM PV, 7 an
# ext4 whose superblock claims more blocks than its partition has, 8 a LUKS2 volume (an ext4
# inside) whose passphrase the matrix tests never give.
MATRIX = {1: ("ext4", 16), 2: ("xfs", 300), 3: ("btrfs", 128), 4: ("ntfs", 16), 5: ("vfat", 40),
          6: ("LVM2_member", 48), 7: ("ext4", 8), 8: ("crypto_LUKS", 24)}  # fmt: skip
MATRIX_DAMAGED = 7
MATRIX_ENCRYPTED = 8


def matrix_disk(path: Path) -> DiskManifest:
    """GPT with one partition per filesystem of the volume matrix (see MATRIX): ext4 (with a
    transaction in its journal not yet written home, as in a snapshot of a running VM), XFS,
    btrfs, NTFS (top-level files only), FAT32, an LVM PV holding VG ``mxvg`` with LV ``data``
    (ext4, files of payload 16), and an ext4 with a damaged superblock: its block count is set
    far past its partition with ``debugfs`` (which keeps the checksum valid, so blkid still
    says ext4 and only a mount finds the lie), and a LUKS2 volume (cryptsetup; its manifest
    lists the files inside). 584 MiB, sparse but for the encrypted volume. Needs root (LVM)."""
    path = Path(path)
    size = 584 * MiB
    _blank(path, size)
    commands = ["mklabel", "gpt"]
    at = 1
    for number, (fs, mb) in MATRIX.items():
        kind = {"vfat": "fat32", "LVM2_member": "ext4", "crypto_LUKS": "ext4"}.get(fs, fs)
        commands += ["mkpart", f"p{number}", kind, f"{at}MiB", f"{at + mb}MiB"]
        at += mb
    _parted(path, *commands, "set", "6", "lvm", "on")
    specs = [
        _Spec(n, fs, flat=fs == "ntfs")
        for n, (fs, _mb) in MATRIX.items()
        if fs not in ("LVM2_member", "crypto_LUKS")
    ]
    layout = _parted_layout(path)
    parts = list(_populate(path, specs, layout))
    start, length, name, _flags = layout[6]
    parts.insert(5, PartitionManifest(6, start, length, "LVM2_member", name))
    with tempfile.TemporaryDirectory(prefix=".ivdfs-img-", dir=path.parent) as tmp:
        scratch = Path(tmp)
        with _LvmSandbox(path, [(start, length)], scratch) as lvm:
            lvm.run("pvcreate", "-q", lvm.loops[0])
            lvm.run("vgcreate", "-q", "mxvg", lvm.loops[0])
            lvm.run("lvcreate", "-q", "-n", "data", "-L", "24M", "mxvg")
            lvs = _populate_lvs(lvm, "mxvg", [_LvSpec("data", "ext4", 16)], scratch)
        bad = layout[MATRIX_DAMAGED]
        image = scratch / "damaged.img"
        with open(path, "rb") as src, open(image, "wb") as dst:
            _copy_span(src.fileno(), dst.fileno(), bad[0], bad[1], 0)
        os.truncate(image, bad[1])
        _run("debugfs", "-w", "-R", "ssv blocks_count 999999999", image)
        with open(image, "rb") as src, open(path, "r+b") as dst:
            _copy_span(src.fileno(), dst.fileno(), 0, 2 * MiB, bad[0])
        # Partition 1 as a snapshot of a running VM leaves it: a committed transaction in its
        # journal, not yet written home, rewrites the first block of one of its files. A
        # read-only mount serves the snapshot's own bytes and must not replay it (ext4 noload,
        # fuse2fs norecovery; a replay would need a writable device, or change what is served).
        live = layout[1]
        image = scratch / "live.img"
        with open(path, "rb") as src, open(image, "wb") as dst:
            _copy_span(src.fileno(), dst.fileno(), live[0], live[1], 0)
        os.truncate(image, live[1])
        assert parts[0].number == 1
        victim = sorted(parts[0].files)[0]
        block = _run("debugfs", "-R", f"bmap /{victim} 0", image).split()[0]
        size = int(_run("debugfs", "-R", "stats", image).split("Block size:")[1].split()[0])
        (scratch / "pending.blk").write_bytes(b"\xa5" * size)
        (scratch / "journal.cmds").write_text(f"jo\njw -b {block} {scratch / 'pending.blk'}\njc\n")
        _run("debugfs", "-w", "-f", scratch / "journal.cmds", image)
        with open(image, "rb") as src, open(path, "r+b") as dst:
            _copy_span(src.fileno(), dst.fileno(), 0, live[1], live[0])
        enc_start, enc_length, enc_name, _flags = layout[MATRIX_ENCRYPTED]
        files = _payload(MATRIX_ENCRYPTED, flat=False)
        image = scratch / "luks.img"
        _mkfs_ext4(image, enc_length - LUKS_REDUCE, files, scratch)
        os.truncate(image, enc_length)
        _luks2(image, "the matrix never gives this passphrase", scratch)
        _copy_sparse(image, path, enc_start)
        digests = {rel: _sha256(data) for rel, data in files.items()}
        parts.append(PartitionManifest(MATRIX_ENCRYPTED, enc_start, enc_length, "crypto_LUKS",
                                       enc_name, files=digests))  # fmt: skip
    return DiskManifest(path, size, "gpt", tuple(parts), pvs=((start, length),), lvs=lvs,
                        damage=f"partition {MATRIX_DAMAGED}: superblock block count")  # fmt: skip


def lvm_striped_disk(path: Path) -> DiskManifest:
    """Two PVs (GPT partitions 1 and 2) in VG ``stripevg``: LV ``st`` striped over both (64 KiB
    chunks, ext4), ``lin`` linear (ext4) and ``z`` of type zero (no extents: unsupported).

    The PVs have small metadata areas (32 KiB) and data starting off the MiB grid; lvm2 is made
    to rewrite its metadata until each PV's committed copy wraps around the end of its area.
    128 MiB, sparse.
    """
    path = Path(path)
    size = 128 * MiB
    _blank(path, size)
    _parted(
        path, "mklabel", "gpt",
        "mkpart", "pv-a", "1MiB", "64MiB",
        "mkpart", "pv-b", "64MiB", "127MiB",
        "set", "1", "lvm", "on", "set", "2", "lvm", "on",
    )  # fmt: skip
    parts = _populate(path, [_Spec(1, None), _Spec(2, None)], _parted_layout(path))
    windows = [(p.start, p.length) for p in parts]
    with tempfile.TemporaryDirectory(prefix=".ivdfs-img-", dir=path.parent) as tmp:
        scratch = Path(tmp)
        with _LvmSandbox(path, windows, scratch) as lvm:
            lvm.run("pvcreate", "-q", "--metadatasize", "32k", "--dataalignment", "4k",
                    *lvm.loops)  # fmt: skip
            lvm.run("vgcreate", "-q", "-s", "1M", "stripevg", *lvm.loops)
            lvm.run("lvcreate", "-q", "-n", "st", "-i", "2", "-I", "64k", "-L", "48M", "stripevg")
            lvm.run("lvcreate", "-q", "-n", "lin", "-L", "8M", "stripevg")
            lvm.run("lvcreate", "-q", "-n", "z", "--type", "zero", "-L", "4M", "stripevg")
            for i in range(200):
                metadata = lvm.metadata()
                if all(m.wrapped for m in metadata):
                    break
                lvm.run("lvchange", "-q", "--addtag", f"t{i}", "stripevg/lin")
            else:
                raise RuntimeError("lvm2 metadata never wrapped around its area")
            specs = [_LvSpec("st", "ext4", 21), _LvSpec("lin", "ext4", 22), _LvSpec("z", None, 23)]
            lvs = _populate_lvs(lvm, "stripevg", specs, scratch)
    return DiskManifest(path, size, "gpt", parts, pvs=tuple(windows), lvs=lvs, metadata=metadata)


LVM_DAMAGE_KINDS = ("one-copy", "all-copies")


def corrupt_lvm_disk(path: Path, damage: str = "all-copies") -> DiskManifest:
    """lvm_striped_disk with the first byte of PV 1's committed metadata text flipped
    ("one-copy": PV 2's copy still describes the VG) or of both PVs' ("all-copies")."""
    if damage not in LVM_DAMAGE_KINDS:
        raise ValueError(f"damage must be one of {LVM_DAMAGE_KINDS}")
    m = lvm_striped_disk(path)
    hit = m.metadata[:1] if damage == "one-copy" else m.metadata
    with open(m.path, "r+b") as f:
        for md in hit:
            off = md.pv_start + md.mda_start + md.text_offset
            byte = os.pread(f.fileno(), 1, off)
            os.pwrite(f.fileno(), bytes([byte[0] ^ 0x5A]), off)
    return dataclasses.replace(m, damage=damage)


# --------------------------------------------------------------------------------------------
# md RAID and LUKS (issue 27: what only --volumes guestfs opens)

MD_MAGIC = 0xA92B4EFC
MD_SB_OFFSET = 8  # sectors: metadata 1.2 puts its superblock 4 KiB into each member
MD_DATA_OFFSET = 2048  # sectors: where mdadm 4.2 starts the data of a small 1.2 member
MD_MAX_DEV = 128


def md_superblock(
    set_uuid: bytes,
    name: str,
    dev_number: int,
    raid_disks: int,
    member_sectors: int,
    when: int = 1_700_000_000,
) -> bytes:
    """A clean md metadata 1.2 superblock (struct mdp_superblock_1 of the kernel's
    include/uapi/linux/raid/md_p.h) of member `dev_number` of a RAID1 of `raid_disks` equal
    members, no bitmap: what ``mdadm --create --metadata=1.2 --level=1 --bitmap=none`` writes.
    This machine's kernel has no md driver, so mdadm cannot create an array here; ``mdadm
    --examine`` reads what this writes (test_images checks it)."""
    import struct

    data_size = member_sectors - MD_DATA_OFFSET
    device_uuid = hashlib.sha256(set_uuid + bytes([dev_number])).digest()[:16]
    sb = bytearray(256 + 2 * MD_MAX_DEV)
    struct.pack_into("<IIII16s32sQIIQII", sb, 0, MD_MAGIC, 1, 0, 0, set_uuid,
                     name.encode()[:32], when, 1, 0, data_size, 0, raid_disks)  # fmt: skip
    struct.pack_into("<QQQQII16sBBHI", sb, 128, MD_DATA_OFFSET, data_size, MD_SB_OFFSET, 0,
                     dev_number, 0, device_uuid, 0, 0, 0, 0)  # fmt: skip
    # utime, events, resync_offset (all ones: in sync), sb_csum (below), max_dev
    struct.pack_into("<QQQII", sb, 192, when, 1, (1 << 64) - 1, 0, MD_MAX_DEV)
    sb[256:] = b"\xff" * (2 * MD_MAX_DEV)  # unused roles: 0xffff
    for role in range(raid_disks):
        struct.pack_into("<H", sb, 256 + 2 * role, role)
    # mdadm's calc_sb_1_csum: 32-bit little-endian words summed, the carry folded in once.
    total = sum(struct.unpack_from(f"<{len(sb) // 4}I", sb))
    struct.pack_into("<I", sb, 216, (total & 0xFFFFFFFF) + (total >> 32) & 0xFFFFFFFF)
    return bytes(sb)


def _md_raid1(path: Path, members: list[tuple[int, int]], name: str, fs_image: Path) -> None:
    """Write a RAID1 over the partitions `members` (start, length in bytes; equal lengths) of
    `path`, holding `fs_image` (at most the data size)."""
    length = members[0][1]
    set_uuid = hashlib.sha256(f"ivdfs-md:{name}".encode()).digest()[:16]
    with open(path, "r+b") as d, open(fs_image, "rb") as s:
        for number, (start, _len) in enumerate(members):
            sb = md_superblock(set_uuid, name, number, len(members), length // SECTOR)
            os.pwrite(d.fileno(), sb, start + MD_SB_OFFSET * SECTOR)
            size = os.fstat(s.fileno()).st_size
            _copy_span(s.fileno(), d.fileno(), 0, size, start + MD_DATA_OFFSET * SECTOR)


LUKS_REDUCE = 16 * MiB  # room cryptsetup takes for a LUKS2 header when it encrypts in place


def _luks2(image: Path, passphrase: str, scratch: Path) -> None:
    """Encrypt `image` (a filesystem in its first len - LUKS_REDUCE bytes) in place as LUKS2
    with `passphrase`: cryptsetup's offline encryption runs in userspace, no dm-crypt needed.
    The KDF is cheap (PBKDF2, 1000 iterations) so that an appliance opens it at once."""
    key = scratch / f"{image.name}.key"
    key.write_text(passphrase)
    key.chmod(0o600)
    _run(
        "cryptsetup", "reencrypt", "-q", "--encrypt", "--type", "luks2",
        "--force-offline-reencrypt", "--reduce-device-size", f"{LUKS_REDUCE >> 20}M",
        "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", key, image,
    )  # fmt: skip
    key.unlink()


# name -> payload number of what the guest-volume disk holds besides its table.
GUESTVOL_MD = "ivdfs:mirror"  # md set name: <homehost>:<name>, as mdadm writes it
GUESTVOL = {"md": 31, "luks": 32, "luks-other": 33, "ldm": 41}


def guestvol_disk(path: Path, passphrase: str, other_passphrase: str) -> DiskManifest:
    """GPT: 1 and 2 the two members of an md RAID1 (metadata 1.2, set name ivdfs:mirror)
    holding an ext4 (payload 31); 3 a LUKS2 volume opened by `passphrase` holding an ext4
    (payload 32); 4 one opened only by `other_passphrase` (payload 33). The manifest's
    partitions 3 and 4 list the files inside; partition 1 those of the array (2 none).
    64 MiB + 2 x 24 MiB, sparse where nothing is encrypted."""
    path = Path(path)
    size = 128 * MiB
    _blank(path, size)
    _parted(
        path, "mklabel", "gpt",
        "mkpart", "md-a", "1MiB", "17MiB", "mkpart", "md-b", "17MiB", "33MiB",
        "mkpart", "luks", "33MiB", "57MiB", "mkpart", "luks-other", "57MiB", "81MiB",
        "set", "1", "raid", "on", "set", "2", "raid", "on",
    )  # fmt: skip
    layout = _parted_layout(path)
    files: dict[int, dict[str, bytes]] = {2: {}}
    with tempfile.TemporaryDirectory(prefix=".ivdfs-img-", dir=path.parent) as tmp:
        scratch = Path(tmp)
        files[1] = _payload(GUESTVOL["md"], flat=False)
        fs = scratch / "md.img"
        _mkfs_ext4(fs, layout[1][1] - MD_DATA_OFFSET * SECTOR, files[1], scratch)
        _md_raid1(path, [layout[1][:2], layout[2][:2]], GUESTVOL_MD, fs)
        for number, key, payload in ((3, passphrase, GUESTVOL["luks"]),
                                     (4, other_passphrase, GUESTVOL["luks-other"])):  # fmt: skip
            files[number] = _payload(payload, flat=False)
            image = scratch / f"luks{number}.img"
            _mkfs_ext4(image, layout[number][1] - LUKS_REDUCE, files[number], scratch)
            os.truncate(image, layout[number][1])
            _luks2(image, key, scratch)
            _copy_sparse(image, path, layout[number][0])
    parts = tuple(
        PartitionManifest(
            n, layout[n][0], layout[n][1], "linux_raid_member" if n < 3 else "crypto_LUKS",
            layout[n][2], files={rel: _sha256(data) for rel, data in files[n].items()},
        )
        for n in (1, 2, 3, 4)
    )  # fmt: skip
    return DiskManifest(path, size, "gpt", parts)


def ldm_disk(path: Path) -> tuple[DiskManifest, ldm.LdmLayout]:
    """A Windows dynamic disk (tests.testbed.ldm): MBR type 0x42, the LDM database in its last
    MiB, one simple volume ``Volume1`` of disk group ``IvdfsDg0`` (16 MiB at 1 MiB) holding an
    NTFS with payload 41 (top-level files only). The manifest's partition 1 is the volume.
    64 MiB, sparse."""
    path = Path(path)
    size = 64 * MiB
    volume = 16 * MiB
    files = _payload(GUESTVOL["ldm"], flat=True)
    with tempfile.TemporaryDirectory(prefix=".ivdfs-img-", dir=path.parent) as tmp:
        image = Path(tmp) / "volume.img"
        _mkfs_ntfs(image, volume, files, Path(tmp), ldm.DATA_START)
        layout = ldm.write_ldm(path, size, volume, image)
    part = PartitionManifest(1, layout.volume_offset, layout.volume_size, "ntfs", layout.volume,
                             files={rel: _sha256(data) for rel, data in files.items()})  # fmt: skip
    return DiskManifest(path, size, "mbr", (part,)), layout


def sparse_disk(
    path: Path, size_mb: int, allocated_fraction: float = 0.5, seed: int = 0
) -> DataManifest:
    """About `allocated_fraction` of the 1 MiB blocks hold block_data(seed, i); others are holes."""
    path = Path(path)
    size = size_mb * MiB
    rng = random.Random(seed)
    allocated = tuple(i for i in range(size_mb) if rng.random() < allocated_fraction)
    return _write_blocks(path, size, seed, set(allocated))


def random_disk(path: Path, size_mb: int, seed: int = 0) -> DataManifest:
    """Every 1 MiB block holds block_data(seed, i): no holes, nothing compressible."""
    path = Path(path)
    return _write_blocks(path, size_mb * MiB, seed, set(range(size_mb)))


def _write_blocks(path: Path, size: int, seed: int, allocated: set[int]) -> DataManifest:
    _blank(path, size)
    digest = hashlib.sha256()
    zeros = bytes(MiB)
    with open(path, "r+b") as f:
        for i in range(size // MiB):
            if i in allocated:
                data = block_data(seed, i)
                os.pwrite(f.fileno(), data, i * MiB)
                digest.update(data)
            else:
                digest.update(zeros)
    return DataManifest(path, size, seed, MiB, tuple(sorted(allocated)), digest.hexdigest())


# --------------------------------------------------------------------------------------------
# Command line, for the demo and benchmarks


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    kinds = ["gpt", "mbr", "bare", "corrupt", "sparse", "random", "lvm", "lvm-whole",
             "lvm-striped", "lvm-corrupt", "matrix"]  # fmt: skip
    ap.add_argument("kind", choices=kinds)
    ap.add_argument("path", type=Path)
    ap.add_argument("--size-mb", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--damage", choices=DAMAGE_KINDS + LVM_DAMAGE_KINDS)
    ap.add_argument("--fs", choices=["ext4", "xfs", "btrfs"], default="ext4", help="for bare")
    args = ap.parse_args(argv)
    manifest: DiskManifest | DataManifest
    if args.kind == "gpt":
        manifest = gpt_disk(args.path, args.size_mb or 64)
    elif args.kind == "matrix":
        manifest = matrix_disk(args.path)
    elif args.kind == "mbr":
        manifest = mbr_disk(args.path, args.size_mb or 64)
    elif args.kind == "bare":
        manifest = bare_fs_disk(
            args.path, args.size_mb or max(32, MIN_SIZE[args.fs] // MiB), args.fs
        )
    elif args.kind == "corrupt":
        manifest = corrupt_gpt_disk(args.path, args.size_mb or 32, args.damage or "primary-header")
    elif args.kind in ("lvm", "lvm-whole"):
        manifest = lvm_disk(args.path, "partition" if args.kind == "lvm" else "whole")
    elif args.kind == "lvm-striped":
        manifest = lvm_striped_disk(args.path)
    elif args.kind == "lvm-corrupt":
        manifest = corrupt_lvm_disk(args.path, args.damage or "all-copies")
    elif args.kind == "sparse":
        manifest = sparse_disk(args.path, args.size_mb or 64, seed=args.seed)
    else:
        manifest = random_disk(args.path, args.size_mb or 64, seed=args.seed)
    json.dump(dataclasses.asdict(manifest), sys.stdout, indent=2, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
