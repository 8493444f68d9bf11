"""Exception types shared by every layer.

A `UserError` is a failure the user can fix: the CLI prints its one-line message without a
traceback and exits with its code. Exit codes are distinct per failure class so scripts can tell
them apart.
"""

from __future__ import annotations

import enum
import signal


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
    NOT_FOUND = 10  # no such datastore, IVD or snapshot (a name that is not unique: USAGE)
    VSPHERE = 11  # vCenter refused or failed an operation (a task ended in error)
    NOT_SUPPORTED = 12  # the server cannot answer this question (changed areas without CBT)


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
    """vCenter or VDDK failed while serving a request (EIO at the FUSE boundary).

    `quiet`: the failure was already logged (a remembered failure answered again without a new
    attempt), so the FUSE boundary turns it into EIO without another log line.
    """

    def __init__(self, message: str = "", *, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


class TaskFailed(BackendError):
    """A vCenter task (creating or deleting a snapshot) ended in error or never ended; the
    message names the task and vCenter's reason. A BackendError, so EIO at the FUSE boundary."""


class NotSupported(IvdfsError):
    """The server cannot answer, and asking again will not change that: changed block
    tracking was off for the IVD or its snapshot, the server refuses the change id, or the
    server (an ESXi host) has no such query. The message says which, in one line."""


class LoginRefused(IvdfsError):
    """vCenter/ESXi refused the user, its password or its privileges."""


class Unreachable(IvdfsError):
    """The server cannot be reached, or does not answer as vSphere."""


class TlsProblem(IvdfsError):
    """The server's certificate failed verification or did not match the pinned thumbprint."""


class Ambiguous(IvdfsError):
    """A name the user typed matches several objects; the message lists them."""


class Interrupted(IvdfsError):
    """A stop signal arrived during start-up; what was acquired is released on the way out."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"received {signal.Signals(signum).name} during start-up; nothing mounted")


def exit_code_of(e: BaseException) -> int:
    """The one mapping from a failure to the process exit code (CLI and detached start-up)."""
    if isinstance(e, UserError):
        return e.exit_code
    if isinstance(e, Interrupted):
        return 128 + e.signum  # as a shell reports a process ended by that signal
    if isinstance(e, NotFound):
        return ExitCode.NOT_FOUND
    if isinstance(e, LoginRefused):
        return ExitCode.AUTH
    if isinstance(e, Unreachable):
        return ExitCode.CONNECT
    if isinstance(e, TlsProblem):
        return ExitCode.TLS
    if isinstance(e, Ambiguous):
        return ExitCode.USAGE
    if isinstance(e, TaskFailed):  # vCenter's refusal, whatever other backend failures map to
        return ExitCode.VSPHERE
    if isinstance(e, BackendError):
        return ExitCode.VSPHERE
    if isinstance(e, NotSupported):
        return ExitCode.NOT_SUPPORTED
    return ExitCode.INTERNAL
