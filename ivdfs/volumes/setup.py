"""Choosing and creating the volume backend for ``--volumes`` (mount.py's one entry point).

`prepare` runs the cheap checks before anything connects (root, tools, libvixMntapi present) and
returns a factory that `mount.run` calls once the VDDK service exists. Main thread only.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from ivdfs.errors import ExitCode, UserError
from ivdfs.journal import Journal
from ivdfs.vddk.errors import VddkLoadError
from ivdfs.vddk.library import VddkLibrary
from ivdfs.vddk.service import DiskService
from ivdfs.volumes.base import VolumeBackend

MODES = ("none", "kernel", "vixmntapi")

# Called with the disk service and the mount's journal (what a backend holds is journaled).
Factory = Callable[[DiskService, Journal], VolumeBackend]


def prepare(mode: str, lib: VddkLibrary) -> Factory | None:
    if mode == "none":
        return None
    if mode not in MODES:
        raise UserError(f"--volumes {mode}: choose one of {', '.join(MODES)}")
    if os.geteuid() != 0:
        raise UserError(f"--volumes {mode} mounts filesystems and needs root")
    if mode == "kernel":
        missing = [t for t in ("losetup", "mount", "umount") if shutil.which(t) is None]
        if missing:
            raise UserError(f"--volumes kernel needs {', '.join(missing)} (util-linux)")
        from ivdfs.volumes.kernel import KernelVolumes

        return lambda _service, _journal: KernelVolumes()
    from ivdfs.vddk.mntapi import Mntapi
    from ivdfs.volumes.vixmntapi import MntapiVolumes

    try:
        mntapi = Mntapi(lib)
    except VddkLoadError as e:
        raise UserError(str(e), ExitCode.VDDK) from None
    return lambda service, journal: MntapiVolumes(mntapi, service, journal)
