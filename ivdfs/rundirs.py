"""Removing ivdfs's own temporary directories without ever crossing into a mount.

Role: a run directory (guest volumes' mount points, VDDK's private tmpDirectory, where VixMntapi
mounts volumes) may still hold a mount that could not be undone: removing it must neither
descend into that mount nor fail silently. Used by the VDDK library's teardown and by the
recovery of a killed mount.

Concurrency: blocking filesystem calls; any thread but the trio one.
"""

from __future__ import annotations

import os
import stat


def remove_tree(root: str) -> str | None:
    """Remove `root` and everything in it, never descending into another filesystem (a mount
    that could not be undone keeps its directory, and the ones above it). None when it is
    gone, else why not."""
    try:
        device = os.lstat(root).st_dev
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{root}: {e.strerror}"
    problem: str | None = None
    dirs: list[str] = []
    for here, subdirs, files in os.walk(root):
        dirs.append(here)
        keep = []
        for name in subdirs:
            p = os.path.join(here, name)
            try:
                st = os.lstat(p)
            except OSError as e:  # a dead FUSE mount answers ENOTCONN
                problem = problem or f"{p}: {e.strerror}"
                continue
            if stat.S_ISLNK(st.st_mode):
                files.append(name)
            elif st.st_dev != device:
                problem = problem or f"{p} is still mounted"
            else:
                keep.append(name)
        subdirs[:] = keep
        for name in files:
            try:
                os.unlink(os.path.join(here, name))
            except FileNotFoundError:
                pass
            except OSError as e:
                problem = problem or f"{os.path.join(here, name)}: {e.strerror}"
    for d in reversed(dirs):
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as e:
            problem = problem or f"{d}: {e.strerror}"
    return problem
