"""Exception types shared by every layer, each carrying the exit code it ends a command with.

A `UserError` is a failure the user can fix: the CLI prints its one-line message without a
traceback. Every error type names its exit code once (`exit_code`), and `exit_code_of` reads
it, so no call site wraps an error only to choose a code. Exit codes are distinct per failure
class so scripts can tell them apart.
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

    exit_code: int = ExitCode.INTERNAL


class UserError(IvdfsError):
    """A bad setting or input, said in one line (exit 3); subclasses for other classes."""

    exit_code: int = ExitCode.CONFIG

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(UserError):
    """Arguments that do not go together (exit 2, as argparse's own errors)."""

    exit_code = ExitCode.USAGE


class MountpointError(UserError):
    """The mountpoint cannot take a mount (missing, busy, not empty), or one cannot be
    unmounted."""

    exit_code = ExitCode.MOUNTPOINT


class FuseError(UserError):
    """The kernel's FUSE refused or ended the mount."""

    exit_code = ExitCode.FUSE


class NotFound(IvdfsError):
    """A name or object that does not exist (ENOENT at the FUSE boundary)."""

    exit_code = ExitCode.NOT_FOUND


class BackendError(IvdfsError):
    """vCenter or VDDK failed while serving a request (EIO at the FUSE boundary).

    `quiet`: the failure was already logged (a remembered failure answered again without a new
    attempt), so the FUSE boundary turns it into EIO without another log line.
    """

    exit_code = ExitCode.VSPHERE

    def __init__(self, message: str = "", *, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


class TaskFailed(BackendError):
    """A vCenter task (creating or deleting a snapshot) ended in error or never ended; the
    message names the task and vCenter's reason. A BackendError, so EIO at the FUSE boundary."""

    exit_code = ExitCode.VSPHERE


class NotSupported(IvdfsError):
    """The server cannot answer, and asking again will not change that: changed block
    tracking was off for the IVD or its snapshot, the server refuses the change id, or the
    server (an ESXi host) has no such query. The message says which, in one line."""

    exit_code = ExitCode.NOT_SUPPORTED


class LoginRefused(IvdfsError):
    """vCenter/ESXi refused the user, its password or its privileges."""

    exit_code = ExitCode.AUTH


class Unreachable(IvdfsError):
    """The server cannot be reached, or does not answer as vSphere."""

    exit_code = ExitCode.CONNECT


class TlsProblem(IvdfsError):
    """The server's certificate failed verification or did not match the pinned thumbprint
    (or the CA file to verify it with is missing)."""

    exit_code = ExitCode.TLS


class Ambiguous(IvdfsError):
    """A name the user typed matches several objects; the message lists them."""

    exit_code = ExitCode.USAGE


class Interrupted(IvdfsError):
    """A stop signal arrived during start-up; what was acquired is released on the way out."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum  # as a shell reports a process ended by that signal
        super().__init__(f"received {signal.Signals(signum).name} during start-up; nothing mounted")


def exit_code_of(e: BaseException) -> int:
    """The one mapping from a failure to the process exit code (CLI and detached start-up)."""
    return e.exit_code if isinstance(e, IvdfsError) else ExitCode.INTERNAL
