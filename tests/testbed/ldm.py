"""A Windows dynamic disk (LDM) with one simple volume, written by us: no Linux tool makes one.

Role: the test bed's only source of LDM metadata, for the guest-volume tests of --volumes
guestfs (libguestfs's appliance runs ``ldmtool create all`` and shows the volume as
/dev/mapper/ldm_vol_<group>_<volume>). The layout follows libldm 0.2.5's reader (src/ldm.c:
struct _privhead, _tocblock, _vmdb, _vblk_head, _vblk_rec_head and the _parse_vblk_* functions)
and the Linux kernel's block/partitions/ldm.h, as Windows lays out an MBR dynamic disk:

- MBR: one partition of type 0x42 from `DATA_START` to the end of the disk;
- PRIVHEAD in sector 6 (and its copies in the database, as the kernel's parser wants them),
  every number big-endian, GUIDs as text;
- the LDM database in the last `DB_SECTORS` (1 MiB) of the disk: TOCBLOCKs in its sectors 1,
  2, 2045 and 2046 (the "config" bitmap at sector 17, the "log" one after it), the VMDB at
  sector 17 and its VBLKs from 512 bytes after it, 128 bytes each: disk group, disk, partition,
  component (spanned, one partition) and volume (type "gen"), numbers as length-prefixed
  big-endian integers, the last sector filled with empty VBLKs;
- the volume's bytes at DATA_START + the partition's start.

`ldmtool scan`/`show` on the image (reading metadata only) is the check that libldm takes it;
the Linux kernel's own LDM partition parser (block/partitions/ldm.c, stricter: record sizes,
every slot a VBLK, TOCBLOCK and PRIVHEAD copies) takes it too: inside a libguestfs appliance
the disk's sda1 is then the volume's partition, not the whole 0x42 partition.

Concurrency: pure functions over one target file.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512
DATA_START = 2048  # sectors: where the 0x42 partition and the LDM "logical disk" begin
DB_SECTORS = 2048  # the database: the last MiB of the disk
VMDB_SECTOR = 17  # in the database (the TOCBLOCK's "config" bitmap starts here)
CONFIG_SECTORS = 1472  # Windows' sizes of the config and log areas, in sectors
LOG_SECTORS = 224
VBLK_SIZE = 128
PRIVHEAD_COPIES = (1856, 2047)  # further PRIVHEADs, in sectors of the database (the kernel's)
TOCBLOCKS = (1, 2, 2045, 2046)  # in sectors of the database


@dataclass(frozen=True)
class LdmLayout:
    disk_group: str
    volume: str
    volume_offset: int  # bytes, on the disk
    volume_size: int  # bytes
    disk_guid: str
    group_guid: str

    @property
    def dm_name(self) -> str:
        """What libldm names the volume's device-mapper device."""
        return f"ldm_vol_{self.disk_group}_{self.volume}"


def _var_int(n: int) -> bytes:
    raw = n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")
    return bytes([len(raw)]) + raw


def _var_str(s: str) -> bytes:
    raw = s.encode()
    return bytes([len(raw)]) + raw


def _vblk(seq: int, record_id: int, kind: int, revision: int, data: bytes, flags: int = 0) -> bytes:
    """One VBLK holding a whole record: entry header, record header, data."""
    body = struct.pack(">HBBI", 0, flags, (revision << 4) | kind, len(data)) + data
    if len(body) > VBLK_SIZE - 16:
        raise ValueError("record too long for one VBLK")
    head = struct.pack(">4sIIHH", b"VBLK", seq, record_id, 0, 1)
    return (head + body).ljust(VBLK_SIZE, b"\0")


def _privhead(disk_sectors: int, disk_guid: str, host_guid: str, group_guid: str,
              group: str) -> bytes:  # fmt: skip
    config_start = disk_sectors - DB_SECTORS
    ph = bytearray(SECTOR)
    struct.pack_into(">8sIHHQQQQ", ph, 0, b"PRIVHEAD", 0x2C, 2, 12, 0, 0, 0, 0)
    struct.pack_into("64s64s64s32s", ph, 48, disk_guid.encode(), host_guid.encode(),
                     group_guid.encode(), group.encode())  # fmt: skip
    struct.pack_into(
        ">QQQQQQIIQQI", ph, 283, DATA_START, config_start - DATA_START, config_start,
        DB_SECTORS, 2, 1, 1, 1, CONFIG_SECTORS, LOG_SECTORS, 0,
    )  # fmt: skip
    return bytes(ph)


def _tocblock(seq: int) -> bytes:
    toc = bytearray(SECTOR)
    struct.pack_into(">8sI4xI16x", toc, 0, b"TOCBLOCK", seq, 0)
    struct.pack_into(">8sHQQQ", toc, 36, b"config", 0, VMDB_SECTOR, CONFIG_SECTORS, 0)
    struct.pack_into(">8sHQQQ", toc, 70, b"log", 0, VMDB_SECTOR + CONFIG_SECTORS, LOG_SECTORS, 0)
    return bytes(toc)


def write_ldm(path: Path, disk_size: int, volume_size: int, volume_image: Path | None = None,
              group: str = "IvdfsDg0", volume: str = "Volume1") -> LdmLayout:  # fmt: skip
    """Make `path` (overwritten, sparse) a dynamic disk of `disk_size` bytes holding one simple
    volume of `volume_size` bytes at the start of its data area, with `volume_image`'s bytes."""
    sectors = disk_size // SECTOR
    vol_sectors = volume_size // SECTOR
    if vol_sectors > sectors - DATA_START - DB_SECTORS:
        raise ValueError("the volume does not fit the disk")
    ns = uuid.uuid5(uuid.NAMESPACE_URL, f"ivdfs-ldm:{group}:{volume}")
    disk_guid, host_guid, group_guid, vol_guid = (
        str(uuid.uuid5(ns, what)) for what in ("disk", "host", "group", "volume")
    )
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(disk_size)

    # MBR: one partition of type 0x42 (LDM) over everything after DATA_START.
    mbr = bytearray(SECTOR)
    struct.pack_into("<I", mbr, 440, 0x1D5CB0A1)  # disk signature
    entry = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x42, b"\xfe\xff\xff", DATA_START,
                        sectors - DATA_START)  # fmt: skip
    mbr[446 : 446 + 16] = entry
    mbr[510:512] = b"\x55\xaa"

    config = sectors - DB_SECTORS
    privhead = _privhead(sectors, disk_guid, host_guid, group_guid, group)

    seq = 0

    def nextseq() -> int:
        nonlocal seq
        seq += 1
        return seq

    # Object ids as Windows numbers them; the disk group VBLK is not counted in the VMDB.
    dg_id, disk_id, part_id, comp_id, vol_id = 1, 2, 3, 4, 5
    # After its variable-length fields each record has a fixed part whose size the kernel
    # checks against the record's size field (ldm.h's VBLK_SIZE_*): 44 bytes for a disk group
    # (v4), 45 for a disk (v4: its GUID first), 28 for a partition, 22 for a component, 58
    # for a volume.
    vblks = [
        _vblk(nextseq(), dg_id, 5, 4,
              _var_int(dg_id) + _var_str(group) + uuid.UUID(group_guid).bytes + b"\0" * 28),
        _vblk(nextseq(), disk_id, 4, 4,
              _var_int(disk_id) + _var_str("Disk1") + uuid.UUID(disk_guid).bytes + b"\0" * 29),
        _vblk(nextseq(), part_id, 3, 3,
              _var_int(part_id) + _var_str("Disk1-01") + b"\0" * 4 + b"\0" * 8
              + struct.pack(">QQ", 0, 0) + _var_int(vol_sectors) + _var_int(comp_id)
              + _var_int(disk_id)),
        _vblk(nextseq(), comp_id, 2, 3,
              _var_int(comp_id) + _var_str(f"{volume}-01") + _var_str("ACTIVE") + b"\x02"
              + b"\0" * 4 + _var_int(1) + b"\0" * 8 + b"\0" * 8 + _var_int(vol_id) + b"\0"),
        _vblk(nextseq(), vol_id, 1, 5,
              _var_int(vol_id) + _var_str(volume) + _var_str("gen")
              + _var_str("8000000000000000") + b"ACTIVE".ljust(14, b"\0") + b"\x03" + b"\0"
              + b"\x01" + b"\0" * 3 + b"\0" + _var_int(1) + b"\0" * 8 + b"\0" * 8
              + _var_int(vol_sectors) + b"\0" * 4 + b"\x07" + uuid.UUID(vol_guid).bytes),
    ]  # fmt: skip

    # The kernel reads whole sectors of VBLKs, each slot must say VBLK: fill the last sector
    # with empty ones (no entries: "not in use"). The VMDB's own sector counts as 4 slots, and
    # the kernel reads up to slot last_vblk_seq.
    per_sector = SECTOR // VBLK_SIZE
    while len(vblks) % per_sector:
        vblks.append(struct.pack(">4sIIHH", b"VBLK", nextseq(), 0, 0, 0).ljust(VBLK_SIZE, b"\0"))
    last_slot = per_sector + len(vblks)
    vmdb = bytearray(SECTOR)
    struct.pack_into(">4sIIIHHH31s64sQQIIII", vmdb, 0, b"VMDB", last_slot, VBLK_SIZE,
                     SECTOR, 1, 4, 10, group.encode(), group_guid.encode(), seq, seq,
                     1, 1, 1, 1)  # fmt: skip

    with open(path, "r+b") as disk:
        fd = disk.fileno()
        os.pwrite(fd, bytes(mbr), 0)
        os.pwrite(fd, privhead, 6 * SECTOR)
        for at in PRIVHEAD_COPIES:
            os.pwrite(fd, privhead, (config + at) * SECTOR)
        for at in TOCBLOCKS:
            os.pwrite(fd, _tocblock(seq), (config + at) * SECTOR)
        vmdb_at = (config + VMDB_SECTOR) * SECTOR
        os.pwrite(fd, bytes(vmdb), vmdb_at)
        os.pwrite(fd, b"".join(vblks), vmdb_at + SECTOR)
        if volume_image is not None:
            data = volume_image.read_bytes()
            if len(data) > volume_size:
                raise ValueError("the volume image is larger than the volume")
            os.pwrite(fd, data, DATA_START * SECTOR)
    return LdmLayout(group, volume, DATA_START * SECTOR, vol_sectors * SECTOR, disk_guid,
                     group_guid)  # fmt: skip
