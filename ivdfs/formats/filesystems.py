"""Which filesystem a window of a disk holds, from its first bytes (as blkid would say).

Role: `detect_filesystem` names what `--volumes` would mount (or why not): ext2/3/4, vfat,
exfat, ntfs, xfs, btrfs, swap, or an LVM2 physical volume. Pure: it looks only at the bytes it
is given (`FS_PROBE_SIZE` of them to see every kind).

Hostile input: the bytes are untrusted; nothing here raises because of them.

Concurrency contract: no shared state; any thread.
"""

from __future__ import annotations

from ivdfs.formats.lvm_disk import label_sector

__all__ = ["FS_PROBE_SIZE", "detect_filesystem"]

# btrfs keeps its superblock at 64 KiB, so "the first 64 KiB" is not quite enough to see it.
FS_PROBE_SIZE = 0x10000 + 0x1000
_BOOT_SIGNATURE = b"\x55\xaa"

# ext feature bits that ext3 does not know (what blkid uses to tell ext4 from ext3).
_EXT3_INCOMPAT_KNOWN = 0x0002 | 0x0004 | 0x0010  # FILETYPE | RECOVER | META_BG
_EXT3_RO_COMPAT_KNOWN = 0x0001 | 0x0002 | 0x0004  # SPARSE_SUPER | LARGE_FILE | BTREE_DIR
_EXT_COMPAT_HAS_JOURNAL = 0x0004
_EXT_INCOMPAT_JOURNAL_DEV = 0x0008


def _u16(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 2], "little")


def _u32(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "little")


def _ext_kind(head: bytes) -> str | None:
    sb = head[1024:2048]
    if len(sb) < 0x68 or sb[0x38:0x3A] != b"\x53\xef":
        return None
    compat, incompat, ro_compat = _u32(sb, 0x5C), _u32(sb, 0x60), _u32(sb, 0x64)
    if incompat & _EXT_INCOMPAT_JOURNAL_DEV:
        return None  # an external journal holds no files
    if incompat & ~_EXT3_INCOMPAT_KNOWN or ro_compat & ~_EXT3_RO_COMPAT_KNOWN:
        return "ext4"
    if compat & _EXT_COMPAT_HAS_JOURNAL:
        return "ext3"
    return "ext2"


def _is_fat(b: bytes) -> bool:
    if len(b) < 512 or b[510:512] != _BOOT_SIGNATURE or b[0] not in (0xEB, 0xE9):
        return False
    bytes_per_sector, per_cluster = _u16(b, 11), b[13]
    reserved, fats, media = _u16(b, 14), b[16], b[21]
    if bytes_per_sector not in (512, 1024, 2048, 4096):
        return False
    if per_cluster == 0 or per_cluster & (per_cluster - 1):
        return False
    if reserved == 0 or fats not in (1, 2) or not (media == 0xF0 or media >= 0xF8):
        return False
    labelled = b[0x36:0x39] == b"FAT" or b[0x52:0x5A] == b"FAT32   "
    return labelled or bool(_u16(b, 19) or _u32(b, 32))


def _is_xfs(sb: bytes) -> bool:
    """The sanity checks blkid makes on an XFS superblock beyond its magic (big-endian)."""
    if len(sb) < 0x70:
        return False

    def be(off: int, n: int) -> int:
        return int.from_bytes(sb[off : off + n], "big")

    block, sector, inode = be(4, 4), be(0x66, 2), be(0x68, 2)
    agblocks, agcount = be(0x54, 4), be(0x58, 4)
    return (
        block in (512 << i for i in range(8))  # 512 B .. 64 KiB
        and sector in (512, 1024, 2048, 4096, 8192, 16384, 32768)
        and inode in (256, 512, 1024, 2048)
        and agblocks > 0
        and agcount > 0
    )


MD_MAGIC = bytes.fromhex("fc4e2ba9") + (1).to_bytes(4, "little")  # 0xa92b4efc LE, version 1


def detect_filesystem(head: bytes) -> str | None:
    """Name the filesystem whose first bytes are `head`, or None.

    Returns "ext2", "ext3", "ext4", "vfat", "exfat", "ntfs", "xfs", "btrfs", "swap", or as
    blkid names them "LVM2_member" (an LVM2 physical volume), "linux_raid_member" (a member of
    an md array with metadata 1.1 or 1.2, whose superblock is at the start), "crypto_LUKS" or
    "BitLocker". Pass `FS_PROBE_SIZE` bytes to see btrfs, whose superblock is at 64 KiB; less
    only loses that.
    """
    # A label with a valid CRC in the first four sectors is what lvm2 itself goes by; pvcreate
    # wipes other signatures, so a stale one beside it is not the answer.
    if label_sector(head) is not None:
        return "LVM2_member"
    # md superblock 1.x: magic, then major version 1; at 0 (1.1) or 4 KiB (1.2). Metadata 0.90
    # and 1.0 sit at the end: their RAID1 members show their filesystem at the start.
    for at in (0, 4096):
        if head[at : at + 8] == MD_MAGIC:
            return "linux_raid_member"
    if head[:6] == b"LUKS\xba\xbe":
        return "crypto_LUKS"
    if head[3:11] == b"-FVE-FS-":
        return "BitLocker"
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[3:11] == b"EXFAT   ":
        return "exfat"
    if head[:4] == b"XFSB" and _is_xfs(head):
        return "xfs"
    ext = _ext_kind(head)
    if ext is not None:
        return ext
    if head[0x10040:0x10048] == b"_BHRfS_M":
        return "btrfs"
    # The swap signature ends the first page, whose size depends on the architecture.
    for page in (4096, 8192, 16384, 65536):
        if head[page - 10 : page] in (b"SWAPSPACE2", b"SWAP-SPACE"):
            return "swap"
    if _is_fat(head):
        return "vfat"
    return None
