"""`ivdfs end-access`: EndAccess for one IVD, after a crash that no journal recorded.

Main thread only; blocks on vCenter and VDDK.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ivdfs.config import ACCESS_IDENTITY, ServerConfig
from ivdfs.errors import BackendError, ExitCode, UserError
from ivdfs.inventory.vsphere import VSphere
from ivdfs.vddk.connection import Access, DiskTarget, ServerTarget
from ivdfs.vddk.library import VddkLibrary

log = logging.getLogger(__name__)


def end_access(server: ServerConfig, libdir: Path, ivd_text: str) -> int:
    vs = VSphere(server)
    try:
        thumbprint = vs.connect()
        ivd = vs.find_ivd(ivd_text)
        try:
            lib = VddkLibrary(libdir)
            lib.init()
        except BackendError as e:
            raise UserError(str(e), ExitCode.VDDK) from None
        try:
            s = server
            access = Access(
                lib,
                ServerTarget(s.host, s.port, s.user, s.password, thumbprint),
                DiskTarget(ivd.id, ivd.datastore.moref),
                ACCESS_IDENTITY,
            )
            try:
                access.recover()
            except BackendError as e:
                raise UserError(str(e), ExitCode.VDDK) from None
        finally:
            lib.exit()
        print(f"ended VDDK access to IVD {ivd.name} ({ivd.id}) on {ivd.datastore.name}")
        log.info("EndAccess for IVD %s done", ivd.id)
        return ExitCode.OK
    finally:
        vs.close()
        sys.stdout.flush()
