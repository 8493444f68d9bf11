"""What a mount records for examiners, handed to the tree as one object.

Plain records; safe from any thread (the audit log has its own contract).
"""

from __future__ import annotations

from dataclasses import dataclass

from ivdfs.forensics.audit import AuditLog


@dataclass(frozen=True)
class Source:
    """Where the bytes come from: the vCenter/ESXi that ivdfs logged in to."""

    server: str  # host:port
    thumbprint: str  # SHA-1 of its certificate, 'AA:BB:...'


@dataclass(frozen=True)
class Evidence:
    """`hashes`: compute SHA-256/MD5 of disk.raw and windows read in order; `audit`: the
    access journal, if any."""

    source: Source | None = None
    hashes: bool = False
    audit: AuditLog | None = None
