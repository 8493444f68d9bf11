"""The unit every disk address in ivdfs counts in: a 512-byte sector.

VDDK counts capacities, reads and allocation queries in it whatever the disk's logical sector
size (VIXDISKLIB_SECTOR_SIZE), LVM counts its extents in it, and the tree's windows are whole
sectors of it. A 4Kn disk's partition table counts in 4096-byte LBAs instead: that is the
disk's own `sector_size`, passed where it matters, never this. Pure; a leaf every layer may
import.
"""

from __future__ import annotations

SECTOR_SIZE = 512
