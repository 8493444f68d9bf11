"""Where a vSphere datastore path lies on this host: "[DS1] fcd/x.vmdk" under the DIR of
``--datastore-path DS1=DIR``.

The result must stay inside DIR: a path with ``..``, an absolute path, or a symbolic link that
leads out of DIR is refused, since the file would then be something else than the datastore's
(a hostile copy of a datastore handed to an examiner may hold such links). Symbolic links that
stay inside DIR are followed, and the caller gets the resolved path, so that VDDK, which
resolves a link's parentFileNameHint relative to the link's folder, sees the same folder.

Concurrency: pure functions over the file system's current state; callable from any thread.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

_DATASTORE_PATH = re.compile(r"\[(?P<ds>[^\]]*)\] ?(?P<rel>.*)", re.DOTALL)


class NotOnDatastore(ValueError):
    """A vSphere path that does not name a file of this datastore's directory; `reason` says
    why in a few words (for the one log line per datastore that explains a fallback)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def split_datastore_path(path: str) -> tuple[str, PurePosixPath]:
    """("DS1", "fcd/x.vmdk") from "[DS1] fcd/x.vmdk"; NotOnDatastore for anything else
    (an empty or absolute relative part, ``..``, a NUL byte)."""
    m = _DATASTORE_PATH.fullmatch(path)
    if m is None or not m["ds"]:
        raise NotOnDatastore(path, "not a datastore path")
    rel = m["rel"]
    if not rel or "\0" in rel:
        raise NotOnDatastore(path, "not a datastore path")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise NotOnDatastore(path, "leaves the datastore")
    return m["ds"], pure


def inside(root: Path, candidate: Path) -> bool:
    """Whether the resolved `candidate` is `root` or below it (`root` resolved as well)."""
    return candidate == root or root in candidate.parents


def resolve_under(root: Path, candidate: Path, shown: str) -> Path:
    """`candidate` with every symbolic link resolved, which must lie under the resolved
    `root`; NotOnDatastore (naming `shown`) otherwise. The file need not exist."""
    real = Path(os.path.realpath(candidate))
    if not inside(root, real):
        raise NotOnDatastore(shown, f"leads out of {root}")
    return real


def datastore_file(root: Path, datastore: str, path: str) -> Path:
    """The file under `root` (the datastore's directory on this host, already resolved) that
    vSphere's `path` names, links resolved; NotOnDatastore for a path on another datastore,
    one that climbs out, or one that a symbolic link leads out of `root`."""
    ds, rel = split_datastore_path(path)
    if ds != datastore:
        raise NotOnDatastore(path, f"on datastore {ds}, not {datastore}")
    return resolve_under(root, root.joinpath(*rel.parts), path)
