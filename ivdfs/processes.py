"""Which processes use a directory tree: what `ivdfs umount` names when a mount is busy, and
what keeps a guest-volume appliance from stopping when idle; and which name a path on their
command line (the FUSE driver serving a volume).

Pure reads of /proc; blocking (one pass over every process), so async callers use a thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class Holder:
    pid: int
    name: str
    what: str  # e.g. "file /mnt/DS/x/y/disk.raw", "working directory"

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid}) {self.what}"


def holders(roots: list[str], exclude: set[int]) -> list[Holder]:
    """Processes with a working directory, root, open file or mapping under `roots`."""
    out: list[Holder] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        base = Path("/proc") / entry
        try:
            name = (base / "comm").read_text().strip()
        except OSError:
            continue
        found = None
        for label, link in (("working directory", base / "cwd"), ("root", base / "root")):
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if any(under(target, r) for r in roots):
                found = f"{label} {target}"
        if found is None:
            try:
                fds = os.listdir(base / "fd")
            except OSError:
                fds = []
            for fd in fds:
                try:
                    target = os.readlink(base / "fd" / fd)
                except OSError:
                    continue
                if any(under(target, r) for r in roots):
                    found = f"file {target}"
                    break
        if found is None:
            try:
                maps = (base / "map_files").iterdir()
                for m in maps:
                    target = os.readlink(m)
                    if any(under(target, r) for r in roots):
                        found = f"mapping {target}"
                        break
            except OSError:
                pass
        if found is not None:
            out.append(Holder(int(entry), name, found))
    return out


def naming(paths: Iterable[str]) -> list[int]:
    """Processes (but this one) whose command line names one of `paths` as a word of its own:
    the FUSE driver serving a target, or holding a device."""
    me, wanted = os.getpid(), {os.fsencode(p) for p in paths}
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted.intersection(argv):
            out.append(int(entry))
    return out
