"""`ivdfs end-access`: EndAccess for one IVD, after a crash that no journal recorded.

Main thread only; blocks on vCenter and VDDK.
"""

from __future__ import annotations

import logging
import sys

from ivdfs.commands.common import session
from ivdfs.config import ACCESS_IDENTITY, ServerConfig, VddkOptions
from ivdfs.errors import ExitCode
from ivdfs.inventory.model import DiskTarget
from ivdfs.vddk import oneshot
from ivdfs.vddk.connection import ServerTarget

log = logging.getLogger(__name__)


def end_access(server: ServerConfig, vddk: VddkOptions, ivd_text: str) -> int:
    with session(server) as vs:
        ivd = vs.find_ivd(ivd_text)
        where = ServerTarget.of(server, vs.thumbprint, vddk.nfc_host_port)
        with oneshot.library(vddk) as lib:
            oneshot.end_access(lib, where, DiskTarget.of(ivd), ACCESS_IDENTITY)
        print(f"ended VDDK access to IVD {ivd.name} ({ivd.id}) on {ivd.datastore.name}")
        log.info("EndAccess for IVD %s done", ivd.id)
    sys.stdout.flush()
    return ExitCode.OK
