"""Test-bed disk images built with the real tools, plus manifests of what they hold.

Role: give tests, the demo and the benchmarks disks whose layout and contents are known without
trusting ivdfs: tables come from parted, filesystems from mkfs.ext4 / mkfs.vfat / mkntfs, files
from ``mkfs.ext4 -d``, mcopy and ntfscp. Nothing is mounted and no loop device is needed: each
filesystem is built in its own file and copied, holes skipped, to the offset parted reports.

Every builder takes a target path (overwritten), returns a frozen manifest and leaves the image
sparse. A 64 MiB partitioned disk takes a fraction of a second.

Limits: ntfscp cannot create directories, so NTFS partitions hold only top-level files (the
manifest lists exactly what is there). Needs parted, e2fsprogs, dosfstools, mtools and ntfs-3g
(all in scripts/setup).

Concurrency contract: builders touch only their target path and a scratch directory beside it,
so different targets can be built in parallel.

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
    fs: str | None  # as ivdfs.io.partitions.detect_filesystem names it
    name: str = ""  # GPT partition name
    bootable: bool = False
    files: dict[str, str] = field(default_factory=dict)  # POSIX relative path -> sha256 hex


@dataclass(frozen=True)
class DiskManifest:
    """A disk image: its table scheme, data partitions (no extended containers), files."""

    path: Path
    size: int
    scheme: str  # "gpt", "mbr" or "none"
    partitions: tuple[PartitionManifest, ...] = ()
    whole_disk: PartitionManifest | None = None  # bare filesystem without a table
    damage: str = ""  # corrupt_gpt_disk: which copy of the GPT was damaged


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


def _run(*args: str | Path) -> str:
    argv = [str(a) for a in args]
    if shutil.which(argv[0]) is None:
        raise RuntimeError(f"{argv[0]} not found; run scripts/setup")
    proc = subprocess.run(argv, capture_output=True, text=True, env=_ENV, check=False)
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
            done = 0
            while done < length:
                chunk = os.pread(s.fileno(), min(MiB, length - done), start + done)
                # Zero runs inside a data extent stay holes in the target too.
                if chunk.count(0) != len(chunk):
                    os.pwrite(d.fileno(), chunk, offset + start + done)
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


def _mkfs_ext4(image: Path, size: int, files: dict[str, bytes], scratch: Path) -> None:
    src = scratch / f"{image.name}.d"
    _stage(files, src)
    _blank(image, size)
    _run("mkfs.ext4", "-q", "-F", "-L", "ivdfs", "-d", src, image)


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


_Mkfs = Callable[[Path, int, dict[str, bytes], Path, int], None]


def _mkfs_for(fs: str) -> _Mkfs:
    if fs == "ext4":
        return lambda img, size, files, scratch, _start: _mkfs_ext4(img, size, files, scratch)
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
                    fs=spec.fs,
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


def bare_fs_disk(path: Path, size_mb: int = 32) -> DiskManifest:
    """An ext4 filesystem spanning the whole disk, no partition table."""
    path = Path(path)
    size = size_mb * MiB
    files = _payload(0, flat=False)
    with tempfile.TemporaryDirectory(prefix=".ivdfs-img-", dir=path.parent) as tmp:
        _mkfs_ext4(path, size, files, Path(tmp))
    whole = PartitionManifest(
        0, 0, size, "ext4", files={rel: _sha256(d) for rel, d in files.items()}
    )
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
    ap.add_argument("kind", choices=["gpt", "mbr", "bare", "corrupt", "sparse", "random"])
    ap.add_argument("path", type=Path)
    ap.add_argument("--size-mb", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--damage", choices=DAMAGE_KINDS, default="primary-header")
    args = ap.parse_args(argv)
    manifest: DiskManifest | DataManifest
    if args.kind == "gpt":
        manifest = gpt_disk(args.path, args.size_mb or 64)
    elif args.kind == "mbr":
        manifest = mbr_disk(args.path, args.size_mb or 64)
    elif args.kind == "bare":
        manifest = bare_fs_disk(args.path, args.size_mb or 32)
    elif args.kind == "corrupt":
        manifest = corrupt_gpt_disk(args.path, args.size_mb or 32, args.damage)
    elif args.kind == "sparse":
        manifest = sparse_disk(args.path, args.size_mb or 64, seed=args.seed)
    else:
        manifest = random_disk(args.path, args.size_mb or 64, seed=args.seed)
    json.dump(dataclasses.asdict(manifest), sys.stdout, indent=2, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
