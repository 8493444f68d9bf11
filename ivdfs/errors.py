"""Exception types shared by every layer.

A `UserError` is a failure the user can fix: the CLI prints its one-line message without a
traceback and exits with its code. Exit codes are distinct per failure class so scripts can tell
them apart.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 2
    CONFIG = 3
    AUTH = 4
    CONNECT = 5
    TLS = 6
    VDDK = 7
    MOUNTPOINT = 8
    FUSE = 9
    NOT_FOUND = 10  # no such datastore, IVD or snapshot (or a name that is not unique)
    VSPHERE = 11  # vCenter refused or failed an operation (a task ended in error)


class IvdfsError(Exception):
    """Base of every error ivdfs raises on purpose."""


class UserError(IvdfsError):
    def __init__(self, message: str, exit_code: ExitCode = ExitCode.CONFIG) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class NotFound(IvdfsError):
    """A name or object that does not exist (ENOENT at the FUSE boundary)."""


class BackendError(IvdfsError):
    """vCenter or VDDK failed while serving a request (EIO at the FUSE boundary)."""
