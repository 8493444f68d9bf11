"""What is mounted where, from /proc/self/mountinfo.

Never stats a mountpoint: ivdfs asks about its own mount at moments when nothing serves it
(before the FUSE loop runs, after it ended), and a stat would wait for an answer forever.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    device: str  # 'major:minor'
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # Space, tab, newline and backslash appear as \ooo; everything else is verbatim UTF-8.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def entries() -> list[MountEntry]:
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                out.append(MountEntry(_unescape(fields[4]), fields[2], fields[sep + 1],
                                      _unescape(fields[sep + 2])))  # fmt: skip
    except (OSError, ValueError, IndexError):
        pass
    return out


def canonical(path: Path) -> str:
    """An absolute, symlink-free path, resolving the parent only (see the module docstring)."""
    path = Path(os.path.abspath(path))
    return str(path.parent.resolve() / path.name)


def find(path: Path) -> MountEntry | None:
    """The topmost mount at exactly `path`, or None."""
    target = canonical(path)
    found = None
    for e in entries():
        if e.mountpoint == target:
            found = e  # later lines are mounted on top of earlier ones
    return found
