"""What the backends that mount guest volumes on this host share: their run directory, the
names of their mount points, and how they run external commands.

Role: every backend mounts into a private run directory (mode 0700, named ``ivdfs-<pid>-*`` so
the recovery of a killed mount finds it even when the journal missed it), one directory per
volume named after the snapshot and the volume, and runs losetup, mount, FUSE drivers and
fusermount3 with a timeout and their stderr in the error.

Concurrency: `run_command` on the trio thread (it never blocks it: the commands read through our
own FUSE mount, which that thread serves); `run_blocking` and the directory calls block, for
the main thread after the trio loop ended (or a worker thread).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio

from ivdfs.volumes.base import VolumeRequest

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 120.0
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def run_directory(run_root: Path | None = None) -> Path:
    """A private directory (0700) for a backend's mounts, named ``ivdfs-<pid>-*`` so that the
    recovery of a killed mount finds it even when the journal missed it."""
    if run_root is None:
        run_root = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    run_dir = Path(tempfile.mkdtemp(prefix=f"ivdfs-{os.getpid()}-", dir=run_root))
    run_dir.chmod(0o700)
    return run_dir


def remove_run_directory(run_dir: Path) -> None:
    """The run directory goes once it is empty; one that is not stays, with an error line."""
    try:
        run_dir.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.error("cannot remove the run directory %s: %s", run_dir, e)


def mount_point_name(request: VolumeRequest, volume_name: object) -> str:
    """The name of a volume's mount point in the run directory: the snapshot and the volume."""
    return _SAFE.sub("_", f"{request.ivd.id}-{request.snapshot.id}-{volume_name}")


def remove_mount_point(path: Path) -> None:
    """A volume's mount point goes (teardown: a failure is logged, the teardown goes on)."""
    try:
        path.rmdir()
    except OSError as e:
        log.error("cannot remove %s: %s", path, e)


async def run_command(argv: Sequence[str], capture: bool = False) -> str:
    """Run a command without blocking trio; RuntimeError with its stderr if it fails.

    stdout is captured only for commands that do not daemonise (losetup): a FUSE driver's
    daemon would inherit the pipe and keep it open for as long as the volume is mounted.
    """
    with tempfile.TemporaryFile() as err:
        with trio.fail_after(COMMAND_TIMEOUT):
            if capture:
                proc = await trio.run_process(
                    list(argv), stdin=subprocess.DEVNULL, stderr=err.fileno(), check=False,
                    capture_stdout=True,
                )  # fmt: skip
            else:
                proc = await trio.run_process(
                    list(argv), stdin=subprocess.DEVNULL, stderr=err.fileno(), check=False,
                    stdout=subprocess.DEVNULL,
                )  # fmt: skip
        if proc.returncode != 0:
            err.seek(0)
            text = err.read().decode("utf-8", "replace").strip().replace("\n", " ")
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {text}")
    return proc.stdout.decode() if capture and proc.stdout else ""


def run_blocking(argv: Sequence[str]) -> bool:
    """Run a teardown command outside trio; a failure is logged with its stderr (False)."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False,
                          timeout=COMMAND_TIMEOUT)  # fmt: skip
    if proc.returncode != 0:
        log.error("%s failed: %s", " ".join(argv), proc.stderr.strip())
    return proc.returncode == 0
