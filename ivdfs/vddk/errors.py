"""VddkError: a failed VixDiskLib call, with the library's own error text and a hint.

This is the one place where a raw VixError code becomes a Python exception, and the one place
that knows which codes a new connection cannot fix (`is_permanent`).
"""

from __future__ import annotations

from ivdfs.errors import BackendError, ExitCode

# Low 16 bits of a VixError are the code; the rest are flags.
_CODE_MASK = 0xFFFF

# Codes for which VDDK's own text misleads users; the hint says what usually causes them.
_HINTS: dict[int, str] = {
    1: "VDDK's generic failure; when connecting this is most often a wrong SSL thumbprint, "
    "or the ESXi host's NFC port 902 being unreachable from this machine",
    13: "the host refused access to the disk file; PrepareForAccess and reads need the "
    "Global.DisableMethods and VirtualMachine.Provisioning.DiskRandomRead privileges",
    35: "vCenter rejected the user name or password",
    36: "the connection to the ESXi host was lost (NFC port 902, or the host restarted)",
    3014: "the vCenter user lacks a privilege for this operation: check its role (reading IVD "
    "snapshots needs Datastore.Browse and Datastore.FileManagement, "
    "VirtualMachine.Provisioning.DiskRandomRead, and Global.DisableMethods/EnableMethods for "
    "PrepareForAccess/EndAccess)",
    16053: "VDDK's vSphere plugin libvddkVimAccess.so did not load: VDDK finds it, and the "
    "libraries VDDK bundles, only through the library search path, which must hold "
    "<vddk-libdir>/lib64 when the process starts (ivdfs re-executes itself with "
    "LD_LIBRARY_PATH set for that); check that lib64 holds libvddkVimAccess.so and that "
    "`ldd` finds everything it needs",
    18000: "cannot connect to the host: check the server name and that ports 443 and 902 "
    "are reachable",
}

# Errors no reconnect can fix. Retrying them is worse than useless: every reconnect is a fresh
# vCenter login, and repeated failed logins can lock a service account.
_PERMANENT: frozenset[int] = frozenset(
    {
        3,  # VIX_E_INVALID_ARG: our request is wrong
        4,  # VIX_E_FILE_NOT_FOUND: no such disk or snapshot
        6,  # VIX_E_NOT_SUPPORTED
        11,  # VIX_E_FILE_READ_ONLY
        13,  # VIX_E_FILE_ACCESS_ERROR: permissions on the disk file
        35,  # VIX_E_AUTHENTICATION_FAIL: wrong user or password
        1000,  # VIX_E_INVALID_HANDLE
        3014,  # VIX_E_HOST_USER_PERMISSIONS: a missing vCenter privilege
        3015,  # VIX_E_GUEST_USER_PERMISSIONS
        16000,  # VIX_E_DISK_INVAL: an invalid disk parameter
        16001,  # VIX_E_DISK_NOINIT: the library is not initialised
        16007,  # VIX_E_DISK_OUTOFRANGE: beyond the end of the disk
        16053,  # VIX_E_DISK_SUBSYSTEM_INIT_FAIL: the plugin did not load
        16054,  # a connection VDDK considers invalid; a new one is built the same way
    }
)
# Everything else counts as transient (36 connection lost, 18000 cannot connect, 14009
# connection refused, 1 generic failure, ...): a new connection may well work.


# Permanent codes that concern every disk, not one: the credentials, the user's privileges, or
# VDDK itself. After one of them no disk is opened for a while (each open is a vCenter login).
ACCOUNT_CODES = frozenset({35, 3014, 16053})


def code_of(err: int) -> int:
    return err & _CODE_MASK


def is_permanent(err: int) -> bool:
    """Whether a new connection cannot fix this VixError (or bare code)."""
    return code_of(err) in _PERMANENT


class VddkError(BackendError):
    exit_code = ExitCode.VDDK

    def __init__(self, err: int, function: str, text: str, context: str = "") -> None:
        self.err = err
        self.code = code_of(err)
        self.function = function
        self.text = text
        self.context = context
        self.hint = _HINTS.get(self.code, "")
        super().__init__(str(self))

    @property
    def permanent(self) -> bool:
        return is_permanent(self.code)

    def __str__(self) -> str:
        where = f" ({self.context})" if self.context else ""
        hint = f"; hint: {self.hint}" if self.hint else ""
        return f"{self.function}{where} failed: {self.text} [VixError {self.code}]{hint}"


class VddkLoadError(BackendError):
    """The library could not be found (or no directory was given), loaded, initialised, or is
    too old."""

    exit_code = ExitCode.VDDK


class VddkPluginError(VddkLoadError):
    """VDDK initialised, but reported that its vSphere plugin (libvddkVimAccess.so) did not
    load: nothing that talks to vSphere can work."""
