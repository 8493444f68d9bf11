"""Every setting declared once: flags, type, default, environment variable, config key, range,
help, and which commands take it.

Role: the one table (as nbdkit's vddk_config switch and s3ql's shared option declarations)
from which the argument parser, the config file's accepted keys and the validation are all
derived, so a default lives in one place: the help texts render it (`help_text`), and the
configs of `ivdfs.config` take theirs from it (`default`). `resolve` applies the precedence
flag > environment > config file > default to one command's settings and returns typed,
validated values. Argparse defaults are left unset (None), so "given on the command line" is
always knowable, and abbreviated long options are refused (an abbreviation would slip past
the config override).

Concurrency: pure; main thread only.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ivdfs.errors import UserError

# Commands that talk to vCenter (and read the config file).
SERVER_COMMANDS = frozenset(
    {
        "mount",
        "ls",
        "snapshot create",
        "snapshot delete",
        "check",
        "end-access",
        "umount",
        "status",
        "changes",
        "hash",
    }
)
VDDK_COMMANDS = frozenset({"mount", "check", "end-access", "umount", "hash"})
TRANSPORTS = ("file", "san", "hotadd", "nbdssl", "nbd")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def parse_size(text: str, what: str = "size") -> int:
    """'256M' -> 268435456. Binary units; a bare number is bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UserError(
            f"invalid {what} {text!r}: use a number with an optional K, M, G or T suffix"
        )
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def size_text(n: int) -> str:
    """268435456 -> '256M': the largest unit that divides it, as parse_size reads it."""
    for unit in "tgmk":
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit.upper()}"
    return str(n)


def _transport(text: str) -> str:
    modes = text.split(":")
    bad = [m for m in modes if m not in TRANSPORTS]
    if bad or not text:
        raise ValueError(f"use modes from {', '.join(TRANSPORTS)} separated by ':'")
    return text


def parse_datastore_path(text: str) -> tuple[str, Path]:
    at = text.find("=/")  # DIR is absolute: the first "=/" ends NAME, which may hold "="
    if at <= 0:
        name, _, directory = text.partition("=")
        if name and directory:
            raise ValueError("DIR must be an absolute path")
        raise ValueError("use NAME=DIR (a datastore's name or moref, a directory)")
    return text[:at], Path(text[at + 1 :])


def _absolute(text: str) -> Path:
    # Absolute: the detached daemon changes to / before it reads the file.
    return Path(text).expanduser().absolute()


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UserError:
        raise ValueError("use a number with an optional K, M, G or T suffix") from None


def physical_memory() -> int:
    """Bytes of RAM on this machine (0 when the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _cache_size(text: str) -> int:
    n = _size(text)
    # The cache is the mount's own memory: more than half the machine's RAM invites the OOM
    # killer (and a typo such as 1T would be taken at its word).
    ram = physical_memory()
    if ram and n > ram // 2:
        raise ValueError(f"more than half of this machine's memory ({ram >> 20} MiB)")
    return n


def _block_size(text: str) -> int:
    n = _size(text)
    # QueryAllocatedBlocks wants a power-of-two chunk of 64K..64M: a block that is one can be
    # the chunk; at most one VDDK request (2M).
    if n & (n - 1) or not 64 << 10 <= n <= 2 << 20:
        raise ValueError("must be a power of two from 64K to 2M")
    return n


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1e9:
        raise ValueError("use a number of seconds")
    return value


@dataclass(frozen=True)
class Setting:
    name: str  # the dest, the config-file key, and the field of ivdfs.config.MountConfig
    flags: tuple[str, ...]
    help: str
    commands: frozenset[str]
    parse: Callable[[str], Any] | None = None  # text -> value; ValueError is a bad value
    default: Any = None
    kind: str = "value"  # "value", "flag" (store_true), "list" (repeatable)
    env: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    config: bool = True  # may appear in the config file
    # An environment variable that replaces this setting without being its value: a password
    # in IVDFS_PASSWORD outranks the config file's password_file.
    shadowed_by: str | None = None
    group: str = "options"
    extra: dict[str, Any] = field(default_factory=dict)
    # The help text ends with "(default <value>[; note])" when the default is a value worth
    # showing; `show_default` False when the help says what the default means instead.
    note: str = ""
    show_default: bool = True

    def check_range(self, value: Any) -> None:
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"must be at most {self.maximum:g}")


_SERVER = "vCenter / ESXi"
_VDDK = "VDDK and data path"
_TREE = "tree"
_PROC = "FUSE and process"
_FORENSICS = "forensics"

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "config",
        ("--config",),
        "config file (default ~/.config/ivdfs/config.toml if it exists) [IVDFS_CONFIG]",
        SERVER_COMMANDS,
        Path,
        metavar="FILE",
        config=False,
    ),
    Setting(
        "server",
        ("--server",),
        "vCenter or ESXi host (default port 443) [IVDFS_SERVER]",
        SERVER_COMMANDS,
        str,
        env="IVDFS_SERVER",
        metavar="HOST[:PORT]",
        group=_SERVER,
    ),
    Setting(
        "user",
        ("--user",),
        "user name, e.g. backup@vsphere.local [IVDFS_USER]",
        SERVER_COMMANDS,
        str,
        env="IVDFS_USER",
        group=_SERVER,
    ),
    Setting(
        "password_file",
        ("--password-file",),
        "file whose first line is the password "
        "(must not be group/other readable) [or IVDFS_PASSWORD, or a prompt on a terminal]",
        SERVER_COMMANDS,
        Path,
        metavar="FILE",
        group=_SERVER,
        shadowed_by="IVDFS_PASSWORD",
    ),
    Setting(
        "ca_file",
        ("--ca-file",),
        "PEM file of CA certificates to trust besides the system's",
        SERVER_COMMANDS,
        Path,
        metavar="FILE",
        group=_SERVER,
    ),
    Setting(
        "thumbprint",
        ("--thumbprint",),
        "pin the server certificate's SHA-1 thumbprint instead of CA checks",
        SERVER_COMMANDS,
        str,
        metavar="AA:BB:...",
        group=_SERVER,
    ),
    Setting(
        "insecure",
        ("--insecure",),
        "do not verify the server certificate (lab use only)",
        SERVER_COMMANDS,
        kind="flag",
        default=False,
        group=_SERVER,
    ),
    Setting(
        "vcenter_connections",
        ("--vcenter-connections",),
        "inventory queries to vCenter/ESXi at once, on one login",
        frozenset({"mount", "ls"}),
        int,
        default=8,
        metavar="N",
        minimum=1,
        maximum=64,
        group=_SERVER,
    ),
    Setting(
        "vcenter_timeout",
        ("--vcenter-timeout",),
        "seconds to wait for vCenter/ESXi at each step: connecting, the TLS handshake, each "
        "call and each poll of a task; a server that does not answer in time counts as "
        "unreachable",
        SERVER_COMMANDS,
        _seconds,
        default=30.0,
        metavar="SECONDS",
        minimum=1,
        maximum=3600,
        group=_SERVER,
    ),
    Setting(
        "vddk_libdir",
        ("--vddk-libdir",),
        "VDDK root; the library is DIR/lib64/libvixDiskLib.so.N [IVDFS_VDDK_LIBDIR]",
        VDDK_COMMANDS,
        _absolute,
        env="IVDFS_VDDK_LIBDIR",
        metavar="DIR",
        group=_VDDK,
    ),
    Setting(
        "vddk_config",
        ("--vddk-config",),
        "VDDK configuration file handed to "
        "VixDiskLib_InitEx (default: one of ivdfs's with a private tmpDirectory)",
        VDDK_COMMANDS,
        _absolute,
        metavar="FILE",
        group=_VDDK,
    ),
    Setting(
        "transport",
        ("--transport",),
        "VDDK transport modes in order of preference, e.g. "
        "nbdssl:nbd (file, san, hotadd, nbdssl, nbd; default: VDDK's choice)",
        frozenset({"mount", "check", "hash"}),
        _transport,
        metavar="MODES",
        group=_VDDK,
    ),
    Setting(
        "datastore_paths",
        ("--datastore-path",),
        "read the snapshots of IVDs on datastore NAME (name or moref) from their VMDK files "
        "under DIR, a read-only mount of that datastore on this host, past NFC; the others, "
        "and snapshots whose files are not there, over the network (--transport file: not at "
        "all); repeatable",
        frozenset({"mount", "check"}),
        parse_datastore_path,
        kind="list",
        default=(),
        metavar="NAME=DIR",
        group=_VDDK,
    ),
    Setting(
        "nfc_host_port",
        ("--nfc-host-port",),
        "ESXi NFC port when it is not 902 (default: VDDK's)",
        VDDK_COMMANDS,
        int,
        default=0,
        show_default=False,
        metavar="PORT",
        minimum=0,
        maximum=65535,
        group=_VDDK,
    ),
    Setting(
        "cache_size",
        ("--cache-size",),
        "block cache size",
        frozenset({"mount"}),
        _cache_size,
        default=256 << 20,
        note="at most half of the RAM",
        metavar="SIZE",
        group=_VDDK,
    ),
    Setting(
        "block_size",
        ("--block-size",),
        "cache block and VDDK request size, a power of two from 64K to 2M",
        frozenset({"mount"}),
        _block_size,
        default=1 << 20,
        metavar="SIZE",
        group=_VDDK,
    ),
    Setting(
        "prefetch",
        ("--prefetch",),
        "read up to N blocks ahead of a sequential reader, in "
        "the background; the window starts at 1 block, doubles while reads stay in order "
        "and collapses on a random jump",
        frozenset({"mount"}),
        int,
        default=16,
        note="0: off",
        metavar="N",
        minimum=0,
        maximum=256,
        group=_VDDK,
    ),
    Setting(
        "vddk_handles",
        ("--vddk-handles",),
        "VDDK handles per open snapshot, each its own "
        "connection and I/O thread; more than 1 gives parallel reads on transports without "
        "asynchronous reads (SAN, HotAdd)",
        frozenset({"mount"}),
        int,
        default=1,
        metavar="N",
        minimum=1,
        maximum=16,
        group=_VDDK,
    ),
    Setting(
        "use_async",
        ("--no-async",),
        "do not use VixDiskLib_ReadAsync (by default reads "
        "overlap over NBD/NBDSSL, up to --max-in-flight per handle)",
        frozenset({"mount"}),
        kind="flag",
        default=True,
        group=_VDDK,
        extra={"action": "store_false"},
    ),
    Setting(
        "max_in_flight",
        ("--max-in-flight",),
        "bytes of ReadAsync requests in flight per "
        "VDDK handle; ESXi's NFC server limits each session's memory",
        frozenset({"mount"}),
        _size,
        # Below what ESXi's NFC server accepts per session (16 x 2 MiB can exceed it), and
        # enough for an 8-block prefetch window.
        default=8 << 20,
        metavar="SIZE",
        minimum=64 << 10,
        maximum=64 << 20,
        group=_VDDK,
    ),
    Setting(
        "max_connections",
        ("--max-connections",),
        "VDDK connections (NFC sessions) open at "
        "once across the mount; idle disks close first, then reads wait",
        frozenset({"mount"}),
        int,
        default=8,
        metavar="N",
        minimum=1,
        maximum=1024,
        group=_VDDK,
    ),
    Setting(
        "idle_timeout",
        ("--idle-timeout",),
        "close a snapshot's VDDK connection this long "
        "after its last file closed (and EndAccess its IVD when none is open); with "
        "--volumes guestfs, also stop an appliance unused this long",
        frozenset({"mount"}),
        _seconds,
        default=60.0,
        metavar="SECONDS",
        group=_VDDK,
    ),
    Setting(
        "volumes",
        ("--volumes",),
        "guest volumes as <snapshot>/volumes/<n> symlinks to "
        "read-only mounts, set up when volumes/ is first used: 'kernel' mounts each "
        "filesystem with the host kernel from a read-only loop device (trusts the snapshot), "
        "'fuse' with userspace drivers only (fuse2fs, ntfs-3g, fusefat), 'guestfs' inside a "
        "libguestfs appliance (a small VM per snapshot: for untrusted or damaged disks), "
        "'vixmntapi' asks VDDK's libvixMntapi (needs libfuse2); root only",
        frozenset({"mount", "check"}),
        str,
        default="none",
        choices=("none", "kernel", "fuse", "guestfs", "vixmntapi"),
        group=_TREE,
    ),
    Setting(
        "guestfs_memory",
        ("--guestfs-memory",),
        "memory of all running --volumes guestfs appliances together (512M each); past "
        "it, the appliance idle longest stops first",
        frozenset({"mount"}),
        _size,
        default=2 << 30,
        metavar="SIZE",
        minimum=512 << 20,
        group=_TREE,
    ),
    Setting(
        "volume_key_file",
        ("--volume-key-file",),
        "file whose first line is the passphrase of the guests' LUKS and BitLocker volumes: "
        "--volumes guestfs opens them read-only inside the appliance "
        "(must not be group/other readable)",
        frozenset({"mount"}),
        _absolute,
        metavar="FILE",
        group=_TREE,
    ),
    Setting(
        "refresh",
        ("--refresh",),
        "list a directory again from vCenter when its listing is "
        "older than this, so new IVDs and snapshots appear and deleted ones go",
        frozenset({"mount"}),
        _seconds,
        default=60.0,
        note="0: never",
        metavar="SECONDS",
        group=_TREE,
    ),
    Setting(
        "snapshot_now",
        ("--snapshot-now",),
        "snapshot IVD (UUID or unique name) when "
        "mounting and delete that snapshot at unmount; repeatable",
        frozenset({"mount"}),
        str,
        kind="list",
        default=(),
        metavar="IVD",
        group=_TREE,
    ),
    Setting(
        "datastores",
        ("--datastore",),
        "show only this datastore (name or moref); repeatable",
        frozenset({"mount"}),
        str,
        kind="list",
        default=(),
        metavar="NAME",
        group=_TREE,
    ),
    Setting(
        "ivds",
        ("--ivd",),
        "show only this IVD (UUID or unique name); repeatable",
        frozenset({"mount"}),
        str,
        kind="list",
        default=(),
        metavar="IVD",
        group=_TREE,
    ),
    Setting(
        "foreground",
        ("-f", "--foreground"),
        "stay in the foreground (default: detach once the mount is ready)",
        frozenset({"mount"}),
        kind="flag",
        default=False,
        config=False,
        group=_PROC,
    ),
    Setting(
        "options",
        ("-o",),
        "FUSE options, e.g. allow_other (the mount is private to you "
        "without it), uid=N, gid=N, umask=OOO",
        frozenset({"mount"}),
        str,
        kind="list",
        default=(),
        metavar="OPT[,OPT]",
        group=_PROC,
    ),
    Setting(
        "debug",
        ("--debug",),
        "verbose logging, and VDDK call statistics at unmount",
        frozenset({"mount"}),
        kind="flag",
        default=False,
        group=_PROC,
    ),
    Setting(
        "log",
        ("--log",),
        "append log lines to FILE (default: standard error)",
        frozenset({"mount"}),
        _absolute,
        metavar="FILE",
        group=_PROC,
    ),
    Setting(
        "audit_log",
        ("--audit-log",),
        "record every open and the byte ranges read (who, what, "
        "when) in the audit log FILE, one hash-chained JSON line per event; an existing one is "
        "verified "
        "and continued; reads fail if it cannot be written; disk files are then read without "
        "the page cache (check it with ivdfs audit verify)",
        frozenset({"mount"}),
        _absolute,
        metavar="FILE",
        group=_FORENSICS,
    ),
    Setting(
        "hashes",
        ("--hashes",),
        "compute SHA-256 and MD5 of disk.raw, partN.raw and lv-*.raw as "
        "they are read in order (dd, sha256sum, ewfacquire): the user.ivdfs.sha256/.md5 "
        "attributes and info.json show them once one open has read a whole file; costs about "
        "2 ms of CPU per MiB, and files not yet hashed are read past the kernel's page cache",
        frozenset({"mount"}),
        kind="flag",
        default=False,
        group=_FORENSICS,
        extra={"action": "store_true"},
    ),
)

BY_NAME = {s.name: s for s in SETTINGS}
# Keys holding paths: `~` expands, and a relative path is relative to the config file.
PATH_KEYS = frozenset(s.name for s in SETTINGS if s.parse in (Path, _absolute))
# The TLS trust settings go together: any of them on the command line replaces all of the file's.
TLS_KEYS = ("ca_file", "thumbprint", "insecure")


def settings_of(command: str) -> list[Setting]:
    return [s for s in SETTINGS if command in s.commands]


def default(name: str) -> Any:
    """The table's default of one setting: what every config record takes as its own."""
    return BY_NAME[name].default


def defaults(command: str) -> Values:
    """Every setting of `command` at its default (what `resolve` gives when nothing is set)."""
    return Values({s.name: s.default for s in settings_of(command)})


def help_text(s: Setting) -> str:
    """The help, ending with the default as a user would write it (sizes as 256M)."""
    if s.kind != "value" or s.default is None or not s.show_default:
        return s.help
    value = s.default
    if isinstance(value, float):
        shown = f"{value:g}"
    elif isinstance(value, int) and s.parse not in (int, None):
        shown = size_text(value)  # a size: the only other parse that yields an int
    else:
        shown = str(value)
    return f"{s.help} (default {shown}{'; ' + s.note if s.note else ''})"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    groups: dict[str, Any] = {}
    for s in settings_of(command):
        target = parser if s.group == "options" else groups.get(s.group)
        if target is None:
            target = groups[s.group] = parser.add_argument_group(s.group)
        kw: dict[str, Any] = {"dest": s.name, "help": help_text(s), "default": None}
        if s.kind == "flag":
            kw["action"] = s.extra.get("action", "store_true")
        elif s.kind == "list":
            kw.update(action="append", metavar=s.metavar)
        else:
            kw.update(metavar=s.metavar, choices=s.choices)
        target.add_argument(*s.flags, **kw)


class Values(dict[str, Any]):
    """Resolved settings of one command; also readable as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _convert(s: Setting, text: str, name: str, prefix: str = "") -> Any:
    """`text` as the setting's value; `name` is what the user wrote (flag, key, variable)."""
    try:
        value = s.parse(text) if s.parse is not None else text
        s.check_range(value)
    except (TypeError, ValueError) as e:
        reason = f": {e}" if str(e) and "invalid literal" not in str(e) else ""
        raise UserError(f"{prefix}invalid {name} {text!r}{reason}") from None
    if s.choices is not None and value not in s.choices:
        raise UserError(f"{prefix}{name}: choose one of {', '.join(s.choices)}")
    return value


def _from_file(s: Setting, value: Any, source: Path) -> Any:
    bad = f"config file {source}: invalid {s.name} {value!r}"
    prefix = f"config file {source}: "
    if s.kind == "flag":
        if not isinstance(value, bool):
            raise UserError(f"{bad}: use true or false")
        return value
    if s.kind == "list":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise UserError(f"{bad}: use a string or a list of strings")
        return tuple(_convert(s, i, s.name, prefix) for i in items)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UserError(f"{bad}: use a string or a number")
    return _convert(s, str(value), s.name, prefix)


def check_file_keys(values: dict[str, Any], source: Path) -> None:
    known = {s.name for s in SETTINGS if s.config}
    for key in values:
        if key not in known:
            raise UserError(
                f"config file {source}: unknown setting {key!r} (known: {', '.join(sorted(known))})"
            )


def resolve(
    command: str,
    args: argparse.Namespace,
    file_values: dict[str, Any],
    source: Path | None,
) -> Values:
    """flag > environment > config file > default, for every setting of `command`."""
    tls_flag = any(getattr(args, k, None) not in (None, False) for k in TLS_KEYS)
    out = Values()
    for s in settings_of(command):
        given = getattr(args, s.name, None)
        flag = s.flags[-1]
        if s.kind == "list" and given is not None:
            # Lists add up: an fstab line's `-o config=FILE,ro` keeps the file's options.
            from_file = s.name in file_values and source is not None
            base = _from_file(s, file_values[s.name], source) if from_file else ()  # type: ignore[arg-type]
            out[s.name] = base + tuple(_convert(s, str(v), flag) for v in given)
            continue
        if given is not None:
            if s.kind == "flag":
                out[s.name] = given
            else:
                out[s.name] = _convert(s, str(given), flag)
            continue
        if s.env and env(s.env):
            out[s.name] = _convert(s, env(s.env) or "", s.env)
            continue
        if s.shadowed_by and env(s.shadowed_by):
            out[s.name] = s.default
            continue
        if source is not None and s.name in file_values and not (s.name in TLS_KEYS and tls_flag):
            out[s.name] = _from_file(s, file_values[s.name], source)
            continue
        out[s.name] = s.default
    return out
