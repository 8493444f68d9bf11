"""`ivdfs end-access`: EndAccess for one IVD, after a crash that no journal recorded; and the
VDDK settings that every command loading VDDK outside a mount honours as `ivdfs mount` does.

Main thread only; blocks on vCenter and VDDK.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from ivdfs.config import ACCESS_IDENTITY, ServerConfig
from ivdfs.errors import ExitCode
from ivdfs.inventory.model import DiskTarget
from ivdfs.inventory.vsphere import VSphere
from ivdfs.vddk.connection import Access, ServerTarget
from ivdfs.vddk.library import VddkLibrary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VddkOptions:
    """Where VDDK is and how to start it: `--vddk-libdir`, `--vddk-config` (InitEx's config
    file; None: ivdfs's private one) and `--nfc-host-port` (0: VDDK's default)."""

    libdir: Path
    config_file: Path | None = None
    nfc_host_port: int = 0

    def load(self) -> VddkLibrary:
        """The library, initialised; BackendError (VddkPluginError among them) on failure."""
        lib = VddkLibrary(self.libdir)
        lib.init(self.config_file)
        return lib

    def options(self) -> list[str]:
        """These settings as command-line options, for printed advice."""
        out = ["--vddk-libdir", str(self.libdir)]
        if self.config_file is not None:
            out += ["--vddk-config", str(self.config_file)]
        if self.nfc_host_port:
            out += ["--nfc-host-port", str(self.nfc_host_port)]
        return out

    def server(self, s: ServerConfig, thumbprint: str) -> ServerTarget:
        return ServerTarget(s.host, s.port, s.user, s.password, thumbprint, self.nfc_host_port)


def end_access(server: ServerConfig, vddk: VddkOptions, ivd_text: str) -> int:
    vs = VSphere(server)
    try:
        thumbprint = vs.connect()
        ivd = vs.find_ivd(ivd_text)
        lib = vddk.load()
        try:
            access = Access(
                lib,
                vddk.server(server, thumbprint),
                DiskTarget.of(ivd),
                ACCESS_IDENTITY,
            )
            access.recover()
        finally:
            lib.exit()
        print(f"ended VDDK access to IVD {ivd.name} ({ivd.id}) on {ivd.datastore.name}")
        log.info("EndAccess for IVD %s done", ivd.id)
        return ExitCode.OK
    finally:
        vs.close()
        sys.stdout.flush()
