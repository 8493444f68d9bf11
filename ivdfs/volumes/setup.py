"""Choosing and creating the volume backend for ``--volumes`` (mount.py's one entry point).

`prepare` runs the cheap checks before anything connects (root, tools, libvixMntapi present;
for guestfs, libguestfs and whether qemu can use KVM, decided here once and logged) and
returns a factory that `mount.run` calls once the VDDK service and the journal exist. Main
thread only.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable

from ivdfs.config import Secret, VolumeSettings, read_password_file
from ivdfs.errors import UserError
from ivdfs.journal import Journal
from ivdfs.vddk.library import VddkLibrary
from ivdfs.vddk.service import DiskService
from ivdfs.volumes.base import VolumeBackend

log = logging.getLogger(__name__)

MODES = ("none", "kernel", "fuse", "guestfs", "vixmntapi")

# Called with the disk service and the mount's journal (what a backend holds is journaled).
Factory = Callable[[DiskService, Journal], VolumeBackend]


def prepare(settings: VolumeSettings, lib: VddkLibrary) -> Factory | None:
    mode = settings.mode
    if mode == "none":
        return None
    if mode not in MODES:
        raise UserError(f"--volumes {mode}: choose one of {', '.join(MODES)}")
    if settings.key_file is not None and mode != "guestfs":
        raise UserError("--volume-key-file: only --volumes guestfs opens encrypted volumes")
    if os.geteuid() != 0:
        raise UserError(f"--volumes {mode} mounts filesystems and needs root")
    if mode == "kernel":
        missing = [t for t in ("losetup", "mount", "umount") if shutil.which(t) is None]
        if missing:
            raise UserError(f"--volumes kernel needs {', '.join(missing)} (util-linux)")
        from ivdfs.volumes.kernel import KernelVolumes

        return lambda _service, _journal: KernelVolumes()
    if mode == "fuse":
        if shutil.which("fusermount3") is None:
            raise UserError("--volumes fuse needs fusermount3 (fuse3)")
        from ivdfs.volumes.fuse import FuseVolumes

        return lambda _service, _journal: FuseVolumes()
    if mode == "guestfs":
        return _guestfs(settings)
    from ivdfs.vddk.mntapi import Mntapi
    from ivdfs.volumes.vixmntapi import MntapiVolumes

    mntapi = Mntapi(lib)  # VddkLoadError (exit 7) when it does not load
    return lambda service, journal: MntapiVolumes(mntapi, service, journal)


def _guestfs(settings: VolumeSettings) -> Factory:
    from ivdfs.volumes import guestfs

    missing = guestfs.missing_prerequisites()
    if missing is not None:
        raise UserError(f"--volumes guestfs: {missing}; install {guestfs.PACKAGES}")
    if settings.guestfs_memory < guestfs.APPLIANCE_MIB << 20:
        raise UserError(
            f"--guestfs-memory must hold one appliance ({guestfs.APPLIANCE_MIB} MiB) at least"
        )
    key = None
    if settings.key_file is not None:
        # Read once, here: a bad file fails the mount at once, not the first appliance.
        key = Secret(read_password_file(settings.key_file, "volume key file"))
    accelerator = guestfs.probe_accelerator()  # once per mount: every appliance runs alike
    log.info("volumes: guestfs appliances run under %s", accelerator.describe())
    return lambda _service, journal: guestfs.GuestfsVolumes(
        accelerator, settings.idle_timeout, settings.guestfs_memory, holdings=journal, key=key
    )
