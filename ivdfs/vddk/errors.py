"""VddkError: a failed VixDiskLib call, with the library's own error text and a hint.

This is the one place where a raw VixError code becomes a Python exception.
"""

from __future__ import annotations

from ivdfs.errors import BackendError

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
    3015: "the user lacks a privilege for this operation (check its vCenter role)",
    18000: "cannot connect to the host: check the server name and that ports 443 and 902 "
    "are reachable",
}


def code_of(err: int) -> int:
    return err & _CODE_MASK


class VddkError(BackendError):
    def __init__(self, err: int, function: str, text: str, context: str = "") -> None:
        self.err = err
        self.code = code_of(err)
        self.function = function
        self.text = text
        self.context = context
        self.hint = _HINTS.get(self.code, "")
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" ({self.context})" if self.context else ""
        hint = f"; hint: {self.hint}" if self.hint else ""
        return f"{self.function}{where} failed: {self.text} [VixError {self.code}]{hint}"


class VddkLoadError(BackendError):
    """The library could not be found, loaded or is too old."""


# Codes a new connection cannot fix, so a read is not retried on a fresh one: every reconnect
# is a fresh vCenter login, and repeated failed logins lock service accounts. Bad arguments
# (3), not supported (6), beyond the disk (16007), bad login (35), host permissions (3014),
# file access (13), not found (4), VDDK subsystems not initialised (16053), 16054.
PERMANENT_CODES = frozenset({3, 4, 6, 13, 35, 3014, 16007, 16053, 16054})


def is_permanent(code: int) -> bool:
    return code in PERMANENT_CODES
