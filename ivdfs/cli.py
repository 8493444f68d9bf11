"""Command line: the parser (built from ivdfs.settings), credentials, and dispatch.

`ivdfs mount|ls|snapshot|changes|check|umount|status|refresh|end-access|hash|audit`.
Settings come from `ivdfs.settings` (flag > environment > config file > default); this module
adds the positional arguments, reads the password, builds the frozen configs of
`ivdfs.config`, and hands over to `ivdfs.mount` and `ivdfs.commands.*`. Every failure ends here
as one line on stderr and the exit code of `errors.exit_code_of`; users never see a traceback.
Runs on the main thread only.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ivdfs import __version__, logs, settings
from ivdfs.config import (
    CONFIG_ENV,
    MountConfig,
    Secret,
    ServerConfig,
    VddkOptions,
    load_config_file,
    normalize_thumbprint,
    parse_server,
    read_password_file,
)
from ivdfs.errors import ExitCode, IvdfsError, TlsProblem, UsageError, UserError, exit_code_of
from ivdfs.settings import Values
from ivdfs.vddk.errors import VddkLoadError

log = logging.getLogger("ivdfs")

ENV_HELP = f"""environment:
  IVDFS_SERVER, IVDFS_USER, IVDFS_PASSWORD, IVDFS_VDDK_LIBDIR  stand in for the matching options
  (a password is never accepted on the command line: use --password-file, IVDFS_PASSWORD or
  the prompt)
  {CONFIG_ENV}  the config file (default ~/.config/ivdfs/config.toml, read if it exists)

config file: TOML, keys are the long option names with '_' (server, user, password_file,
ca_file, thumbprint, insecure, vddk_libdir, cache_size, options = ["allow_other"], refresh and
the others); precedence: flag > environment > config file. It never holds the password itself.

exit codes: 0 ok, 2 usage, 3 bad configuration, 4 login refused, 5 server unreachable or not
vSphere, 6 TLS certificate problem, 7 VDDK library problem, 8 bad mountpoint or busy mount,
9 FUSE failure, 10 no such datastore/IVD/snapshot, 11 a vCenter task failed,
12 the server cannot answer (changes without changed block tracking, or on an ESXi host),
128+N stopped by signal N during start-up
"""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, as for every other bad input; the usage is one --help away.
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(ExitCode.USAGE)


def _command(sub: Any, name: str, key: str, help_text: str, description: str = "") -> Any:
    p = sub.add_parser(name, help=help_text, description=description or help_text, epilog=ENV_HELP)
    p.set_defaults(_command=key)
    settings.add_arguments(p, key)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ivdfs",
        description="Read-only FUSE filesystem for vSphere Improved Virtual Disk (First Class "
        "Disk) snapshots.",
        epilog=ENV_HELP,
    )
    parser.add_argument("--version", action="version", version=f"ivdfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    m = _command(
        sub,
        "mount",
        "mount",
        "mount IVD snapshots as /<datastore>/<ivd-uuid>/<snapshot-id>/disk.raw",
        "Mount every IVD snapshot the user can see, read-only, at MOUNTPOINT as "
        "/<datastore>/<ivd-uuid>/<snapshot-id>/disk.raw. Stop with ivdfs umount.",
    )
    m.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", help="an empty directory")

    ls = _command(
        sub,
        "ls",
        "ls",
        "list datastores, the IVDs of a datastore, or the snapshots of an IVD",
        "Without arguments: datastores. With DATASTORE: its IVDs. With DATASTORE and "
        "IVD (UUID or unique name): that IVD's snapshots. --all: every datastore's "
        "IVDs with their snapshots.",
    )
    ls.add_argument("datastore", nargs="?", metavar="DATASTORE")
    ls.add_argument("ivd", nargs="?", metavar="IVD")
    ls.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")
    ls.add_argument("--all", action="store_true", help="every IVD of every datastore")

    snap = sub.add_parser("snapshot", help="create or delete an IVD snapshot")
    snap_sub = snap.add_subparsers(dest="snapshot_command", metavar="ACTION", parser_class=_Parser)
    snap_sub.required = True
    create = _command(
        snap_sub,
        "create",
        "snapshot create",
        "snapshot an IVD",
        "Snapshot an IVD (UUID or unique name); prints the new snapshot's id.",
    )
    create.add_argument("ivd", metavar="IVD")
    create.add_argument("--description", default="", metavar="TEXT", help="snapshot description")
    delete = _command(snap_sub, "delete", "snapshot delete", "delete one snapshot of an IVD")
    delete.add_argument("ivd", metavar="IVD")
    delete.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id (see ivdfs ls)")

    ch = _command(
        sub,
        "changes",
        "changes",
        "what changed between two snapshots of an IVD (changed block tracking)",
        "List the extents that changed from snapshot OLDER to snapshot NEWER of IVD (UUID "
        "or unique name), as vCenter's changed block tracking reports them: the same as "
        "<NEWER>/changes/<OLDER>.json in a mount. Needs a vCenter and tracking enabled on the "
        "IVD before OLDER was taken; otherwise says why (exit 12).",
    )
    ch.add_argument("ivd", metavar="IVD")
    ch.add_argument("older", metavar="OLDER", help="snapshot id (see ivdfs ls)")
    ch.add_argument("newer", metavar="NEWER", help="a later snapshot id of the same IVD")
    ch.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")

    _command(
        sub,
        "check",
        "check",
        "validate a configuration without mounting",
        "Check the vCenter certificate and login, load the VDDK library, and read from "
        "one IVD snapshot if there is one. Exits with the code mount would give.",
    )

    um = _command(
        sub,
        "umount",
        "umount",
        "unmount an ivdfs mount and wait for its process; undo a dead mount",
        "Unmount MOUNTPOINT and wait until the ivdfs process serving it has ended "
        "(snapshots deleted, VDDK access ended). Refuses while files are open there "
        "(exit 8), unless --force or --lazy. If the process died (kill -9, a crash), "
        "undoes what the mount's journal says it held: guest volumes, loop devices, "
        "the FUSE mount, --snapshot-now snapshots and PrepareForAccess (the last two "
        "need the connection options, as for end-access).",
    )
    um.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    um.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the process to end (default 120)",
    )
    um.add_argument(
        "--force", action="store_true", help="stop the mount even while programs read from it"
    )
    um.add_argument(
        "--lazy",
        action="store_true",
        help="detach now; the mount ends when the last file is closed",
    )

    st = _command(sub, "status", "status", "list ivdfs mounts, live and dead, and what they hold")
    st.add_argument("mountpoint", type=Path, nargs="?", metavar="MOUNTPOINT")
    st.add_argument("--json", action="store_true", help="JSON for scripts")

    rf = _command(
        sub,
        "refresh",
        "refresh",
        "list a directory of a mount from vCenter again now",
        "Make the ivdfs mount list PATH (a directory of the mount; default its root) "
        "from vCenter again at once, instead of waiting for --refresh.",
    )
    rf.add_argument("path", type=Path, metavar="PATH")

    end = _command(
        sub,
        "end-access",
        "end-access",
        "call VDDK EndAccess for an IVD (recovery after a crash)",
        "When ivdfs was killed while reading an IVD it could not call "
        "VixDiskLib_EndAccess, so vMotion stays disabled for the VMs the IVD is "
        "attached to. This calls it. (ivdfs umount MOUNTPOINT does it for a dead "
        "mount from its journal.)",
    )
    end.add_argument("ivd", metavar="IVD", help="UUID or unique name")

    hs = _command(
        sub,
        "hash",
        "hash",
        "compute SHA-256 and MD5 of a snapshot (or one partition) for sha256sum -c",
        "Read a snapshot's disk (or partition N) through VDDK, skipping unallocated "
        "regions (they hash as zeros), and print its hashes as lines that sha256sum -c and "
        "md5sum -c check when run in the root of an ivdfs mount: the file name is "
        "<datastore>/<ivd-uuid>/<snapshot-id>/disk.raw (or partN.raw).",
    )
    hs.add_argument("ivd", metavar="IVD", help="UUID or unique name")
    hs.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id (see ivdfs ls)")
    hs.add_argument(
        "--partition", type=int, metavar="N", help="hash partition N (partN.raw) instead"
    )
    hs.add_argument(
        "--algorithm",
        choices=("both", "sha256", "md5"),
        default="both",
        help="both (default): 'SHA256 (file) = ...' and 'MD5 (file) = ...' lines; one: "
        "that tool's own '<hex>  <file>' line",
    )

    audit = sub.add_parser("audit", help="check an --audit-log audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="ACTION", parser_class=_Parser)
    audit_sub.required = True
    av = _command(
        audit_sub,
        "verify",
        "audit verify",
        "verify an audit log's hash chain and summarise who read what",
        "Check every line of FILE (an ivdfs mount --audit-log FILE): its own hash, its "
        "number and its link to the line before. Prints the mount sessions, each process's "
        "reads per file and the evidence hashes recorded, and the head (last line and its "
        "hash): note it, and pass it later with --head to show that nothing was cut off or "
        "rewritten since. Exit 0: intact; 1: broken, naming the first bad line.",
    )
    av.add_argument("file", type=Path, metavar="FILE")
    av.add_argument("--head", metavar="SHA256", help="a head noted earlier: it must be there")
    av.add_argument("--json", action="store_true", help="the summary as JSON for scripts")
    return parser


# --- credentials and configs -----------------------------------------------------------------


def get_password(v: Values) -> Secret:
    # Taken out of the environment either way, so that no program ivdfs starts (losetup,
    # mount, ntfs-3g for --volumes kernel) inherits it.
    value = os.environ.pop("IVDFS_PASSWORD", None)
    if v.password_file is not None:
        return Secret(read_password_file(v.password_file.expanduser()))
    if value:
        return Secret(value)
    if sys.stdin.isatty():
        try:
            return Secret(getpass.getpass(f"Password for {v.user}@{v.server}: "))
        except (EOFError, KeyboardInterrupt):
            raise UserError("no password entered") from None
    raise UserError("no password: use --password-file FILE, IVDFS_PASSWORD, or run on a terminal")


def server_config(v: Values) -> ServerConfig:
    if not v.server:
        raise UserError("no server: use --server HOST[:PORT] or IVDFS_SERVER")
    host, port = parse_server(v.server)
    if not v.user:
        raise UserError("no user: use --user USER or IVDFS_USER")
    if v.insecure and v.thumbprint:
        raise UserError("--insecure and --thumbprint contradict each other; choose one")
    # Absolute: the detached daemon changes to / before it connects.
    ca_file = v.ca_file.expanduser().absolute() if v.ca_file else None
    if ca_file is not None and not ca_file.is_file():
        raise TlsProblem(f"CA file {ca_file} does not exist")
    return ServerConfig(
        host=host,
        port=port,
        user=v.user,
        password=get_password(v),
        ca_file=ca_file,
        thumbprint=normalize_thumbprint(v.thumbprint) if v.thumbprint else None,
        insecure=v.insecure,
        password_file=v.password_file.expanduser().absolute() if v.password_file else None,
        timeout=v.vcenter_timeout,
    )


def vddk_libdir(v: Values) -> Path:
    if v.vddk_libdir is None:
        raise VddkLoadError("no VDDK directory: use --vddk-libdir DIR or IVDFS_VDDK_LIBDIR")
    libdir: Path = v.vddk_libdir
    return libdir


def mount_config(v: Values, mountpoint: Path) -> MountConfig:
    vddk_libdir(v)
    if v.cache_size < 2 * v.block_size:
        raise UserError(f"--cache-size: must hold at least two blocks ({2 * v.block_size} bytes)")
    if v.max_connections < v.vddk_handles:
        raise UserError("--max-connections must be at least --vddk-handles")
    return MountConfig.of(v, server_config(v), mountpoint)


def _config_path(args: argparse.Namespace) -> Path | None:
    given = getattr(args, "config", None)
    path = Path(given) if given else None
    for opt in getattr(args, "options", None) or []:
        for o in opt.split(","):
            if o.strip().startswith("config="):
                path = Path(o.strip().removeprefix("config="))
    return path


def resolve(args: argparse.Namespace) -> Values:
    command: str = args._command
    file_values: dict[str, Any] = {}
    source = None
    if command in settings.SERVER_COMMANDS:
        source, file_values = load_config_file(_config_path(args), settings.PATH_KEYS)
        if source is not None:
            settings.check_file_keys(file_values, source)
    return settings.resolve(command, args, file_values, source)


# --- dispatch --------------------------------------------------------------------------------


def _mount(args: argparse.Namespace, v: Values) -> int:
    from ivdfs import daemon, mount

    cfg = mount_config(v, args.mountpoint)
    logs.for_mount(cfg.debug, cfg.log)
    if cfg.foreground:
        return mount.run(cfg)
    return daemon.detached(lambda ready: mount.run(cfg, ready))


def _ls(args: argparse.Namespace, v: Values) -> int:
    from ivdfs.commands import inventory

    if args.all:
        if args.datastore is not None:
            raise UsageError("ls --all takes no DATASTORE")
        return inventory.ls_all(server_config(v), args.json, v.vcenter_connections)
    return inventory.ls(
        server_config(v), args.datastore, args.ivd, args.json, v.vcenter_connections
    )


def _snapshot_create(args: argparse.Namespace, v: Values) -> int:
    from ivdfs.commands import inventory

    return inventory.snapshot_create(server_config(v), args.ivd, args.description)


def _snapshot_delete(args: argparse.Namespace, v: Values) -> int:
    from ivdfs.commands import inventory

    return inventory.snapshot_delete(server_config(v), args.ivd, args.snapshot)


def _changes(args: argparse.Namespace, v: Values) -> int:
    from ivdfs.commands import changes

    return changes.changes(server_config(v), args.ivd, args.older, args.newer, args.json)


def vddk_options(v: Values, libdir: Path) -> VddkOptions:
    """The VDDK settings of a command that loads VDDK outside a mount, as mount takes them."""
    return VddkOptions(libdir, v.vddk_config, v.nfc_host_port)


def _check(args: argparse.Namespace, v: Values) -> int:
    from ivdfs.commands import check

    try:
        vddk: VddkOptions | None = vddk_options(v, vddk_libdir(v))
    except VddkLoadError:
        vddk = None  # reported by the check itself, after the vCenter steps
    # --volumes decides whether VixMntapi must load; a command without it mounts none.
    return check.check(server_config(v), vddk, v.transport, v.get("volumes", "none"))


def _umount(args: argparse.Namespace, v: Values) -> int:
    from ivdfs import journal
    from ivdfs.commands import umount

    rec = journal.find(Path(os.path.abspath(args.mountpoint.expanduser())))
    if rec is not None and rec.prepared:
        # Undoing a dead mount (or one that dies while we wait) calls EndAccess from here.
        used = rec.doc.get("vddk_libdir")
        _vddk_search_path(v, Path(used) if used else None)

    def connection(used: Path | None) -> tuple[ServerConfig, VddkOptions]:
        libdir = used if v.vddk_libdir is None and used is not None else vddk_libdir(v)
        return server_config(v), vddk_options(v, libdir)

    return umount.umount(args.mountpoint, args.timeout, args.force, args.lazy, connection)


def _status(args: argparse.Namespace, v: Values) -> int:
    from ivdfs.commands import status

    return status.status(args.mountpoint, args.json)


def _refresh(args: argparse.Namespace, v: Values) -> int:
    from ivdfs.commands import status

    return status.refresh(args.path)


def _end_access(args: argparse.Namespace, v: Values) -> int:
    from ivdfs.commands import admin

    return admin.end_access(server_config(v), vddk_options(v, vddk_libdir(v)), args.ivd)


def _hash(args: argparse.Namespace, v: Values) -> int:
    from ivdfs.commands import hash as hash_cmd

    return hash_cmd.hash_snapshot(
        server_config(v),
        vddk_options(v, vddk_libdir(v)),
        v.transport,
        args.ivd,
        args.snapshot,
        args.partition,
        args.algorithm,
    )


def _audit_verify(args: argparse.Namespace, v: Values) -> int:
    from ivdfs.commands import audit

    return audit.verify(args.file, args.head, args.json)


# Commands that load VDDK in this process: they run with its lib64 on the search path.
LOADS_VDDK = frozenset({"mount", "check", "end-access", "hash"})


def _vddk_search_path(v: Values, fallback: Path | None = None) -> None:
    """Re-execute once with VDDK's lib64 on LD_LIBRARY_PATH (its libraries and plugin have no
    RPATH). Called once the VDDK directory is known and before the password is read: an exec
    would lose a password typed at the prompt."""
    from ivdfs.vddk.reexec import ensure_library_path

    try:
        libdir = vddk_libdir(v)
    except VddkLoadError:
        if fallback is None:
            return  # the command reports it
        libdir = fallback
    ensure_library_path(libdir)


HANDLERS: dict[str, Callable[[argparse.Namespace, Values], int]] = {
    "mount": _mount,
    "ls": _ls,
    "snapshot create": _snapshot_create,
    "snapshot delete": _snapshot_delete,
    "changes": _changes,
    "check": _check,
    "umount": _umount,
    "status": _status,
    "refresh": _refresh,
    "end-access": _end_access,
    "hash": _hash,
    "audit verify": _audit_verify,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    try:
        values = resolve(args)
        if args._command != "mount":
            # Commands report on stdout/stderr themselves; the log says only what went wrong.
            logs.setup(False, None)
            logging.getLogger().setLevel(logging.WARNING)
        if args._command in LOADS_VDDK:
            _vddk_search_path(values)
        return HANDLERS[args._command](args, values)
    except IvdfsError as e:
        print(f"ivdfs: {e}", file=sys.stderr)
        return exit_code_of(e)
    except KeyboardInterrupt:
        print("ivdfs: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"ivdfs: {e}", file=sys.stderr)
        return ExitCode.INTERNAL
    except Exception as e:  # a bug: one line for the user, the trace for the log
        log.debug("internal error", exc_info=True)
        print(f"ivdfs: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return ExitCode.INTERNAL
