"""Command line: argument parsing, the config file, and dispatch to the subcommands.

`ivdfs mount|ls|snapshot|check|umount|end-access`. This module turns flags, environment and the
config file (flag > environment > file) into the frozen configs of `ivdfs.config`; the work
happens in `ivdfs.mount` and `ivdfs.commands.*`. Exit codes come from errors.ExitCode; users
never see a traceback. Runs on the main thread only.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ivdfs import __version__
from ivdfs.config import (
    ENV_KEYS,
    TLS_KEYS,
    MountConfig,
    Secret,
    ServerConfig,
    env,
    load_config_file,
    normalize_thumbprint,
    parse_server,
    parse_size,
    read_password_file,
)
from ivdfs.errors import BackendError, ExitCode, NotFound, UserError
from ivdfs.vddk import _cdefs

log = logging.getLogger("ivdfs")

ENV_HELP = """environment:
  IVDFS_SERVER, IVDFS_USER, IVDFS_PASSWORD, IVDFS_VDDK_LIBDIR  stand in for the matching options
  (a password is never accepted on the command line: use --password-file, IVDFS_PASSWORD or
  the prompt)
  IVDFS_CONFIG  the config file (default ~/.config/ivdfs/config.toml, read if it exists)

config file: TOML, keys are the long option names (server, user, password_file, ca_file,
thumbprint, insecure, vddk_libdir, cache_size, options = ["allow_other"], refresh, ...);
precedence: flag > environment > config file. It never holds the password itself.

exit codes: 0 ok, 2 usage, 3 bad configuration, 4 login refused, 5 server unreachable or not
vSphere, 6 TLS certificate problem, 7 VDDK library problem, 8 bad mountpoint, 9 FUSE failure,
10 no such datastore/IVD/snapshot, 11 a vCenter task failed
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(ExitCode.USAGE)


def add_server_options(p: argparse.ArgumentParser) -> None:
    # Commands with server options read the config file; the parser is kept for its defaults.
    p.set_defaults(_cmd_parser=p)
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="config file (default ~/.config/ivdfs/config.toml if it exists) [IVDFS_CONFIG]",
    )
    g = p.add_argument_group("vCenter / ESXi")
    g.add_argument(
        "--server",
        metavar="HOST[:PORT]",
        help="vCenter or ESXi host (default port 443) [IVDFS_SERVER]",
    )
    g.add_argument("--user", help="user name, e.g. backup@vsphere.local [IVDFS_USER]")
    g.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="file whose first line is the password (must not be group/other "
        "readable) [or IVDFS_PASSWORD, or a prompt on a terminal]",
    )
    g.add_argument(
        "--ca-file",
        type=Path,
        metavar="FILE",
        help="PEM file of CA certificates to trust besides the system's",
    )
    g.add_argument(
        "--thumbprint",
        metavar="AA:BB:...",
        help="pin the server certificate's SHA-1 thumbprint instead of CA checks",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the server certificate (lab use only)",
    )


def add_libdir_option(p: Any) -> None:
    p.add_argument(
        "--vddk-libdir",
        type=Path,
        metavar="DIR",
        help="VDDK root; the library is DIR/lib64/libvixDiskLib.so.N [IVDFS_VDDK_LIBDIR]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ivdfs",
        description="Read-only FUSE filesystem for vSphere Improved "
        "Virtual Disk (First Class Disk) snapshots.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=ENV_HELP,
    )
    parser.add_argument("--version", action="version", version=f"ivdfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    m = sub.add_parser(
        "mount",
        help="mount IVD snapshots as /<datastore>/<ivd-uuid>/<snapshot-id>/disk.raw",
        description="Mount every IVD snapshot the user can see, read-only, at MOUNTPOINT as "
        "/<datastore>/<ivd-uuid>/<snapshot-id>/disk.raw. Unmount with fusermount3 -u.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=ENV_HELP,
    )
    m.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", help="an empty directory")
    add_server_options(m)
    v = m.add_argument_group("VDDK and data path")
    add_libdir_option(v)
    v.add_argument(
        "--transport",
        metavar="MODES",
        help="VDDK transport modes in order of preference, e.g. nbdssl:nbd "
        "(default: VDDK's choice)",
    )
    v.add_argument(
        "--cache-size", default="256M", metavar="SIZE", help="block cache size (default 256M)"
    )
    v.add_argument(
        "--block-size",
        default="1M",
        metavar="SIZE",
        help="cache block size, a multiple of 512 from 64K to 2M (default 1M)",
    )
    v.add_argument(
        "--prefetch",
        type=int,
        default=16,
        metavar="N",
        help="read up to N blocks ahead of a sequential reader, in the background; the window "
        "starts at 1 block, doubles while reads stay in order and collapses on a random jump "
        "(default 16; 0: off)",
    )
    v.add_argument(
        "--vddk-handles",
        type=int,
        default=1,
        metavar="N",
        help="VDDK handles per open snapshot, each its own connection and I/O thread; more "
        "than 1 gives parallel reads on transports without asynchronous reads (SAN, HotAdd) "
        "(default 1)",
    )
    v.add_argument(
        "--no-async",
        dest="use_async",
        action="store_false",
        help="do not use VixDiskLib_ReadAsync (by default up to 16 reads per handle are in "
        "flight over NBD/NBDSSL)",
    )
    t = m.add_argument_group("tree")
    t.add_argument(
        "--volumes",
        choices=("none", "kernel", "vixmntapi"),
        default="none",
        help="guest volumes as <snapshot>/volumes/<n> symlinks to read-only mounts, set up "
        "when volumes/ is first listed: 'kernel' mounts each partition from a read-only loop "
        "device (ext2/3/4, XFS, btrfs, NTFS via ntfs-3g, FAT via vfat or fusefat; n is the "
        "partition number, 0 for a whole-disk filesystem; stop with SIGTERM or Ctrl-C, since "
        "the loop devices keep fusermount3 -u from unmounting), 'vixmntapi' asks VDDK's "
        "libvixMntapi (root needed for both; default none)",
    )
    t.add_argument(
        "--refresh",
        default="60",
        metavar="SECONDS",
        help="list a directory again from vCenter when its listing is older than this, so new "
        "IVDs and snapshots appear and deleted ones go (default 60; 0: never)",
    )
    t.add_argument(
        "--snapshot-now",
        dest="snapshot_now",
        action="append",
        default=[],
        metavar="IVD",
        help="snapshot IVD (UUID or unique name) when mounting and delete that snapshot at "
        "unmount; repeat for several IVDs",
    )
    f = m.add_argument_group("FUSE and process")
    f.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground (default: detach once the mount is ready)",
    )
    f.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT]",
        help="FUSE options, e.g. allow_other (the mount is private to you without it)",
    )
    f.add_argument(
        "--debug", action="store_true", help="verbose logging, and VDDK call statistics at unmount"
    )
    f.add_argument(
        "--log",
        type=Path,
        metavar="FILE",
        help="append log lines to FILE (default: standard error)",
    )
    add_other_commands(sub)
    return parser


def add_other_commands(sub: Any) -> None:
    ls = sub.add_parser(
        "ls",
        help="list datastores, the IVDs of a datastore, or the snapshots of an IVD",
        description="Without arguments: datastores. With DATASTORE: its IVDs. With DATASTORE "
        "and IVD (UUID or unique name): that IVD's snapshots.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument("datastore", nargs="?", metavar="DATASTORE")
    ls.add_argument("ivd", nargs="?", metavar="IVD")
    ls.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")
    add_server_options(ls)

    snap = sub.add_parser("snapshot", help="create or delete an IVD snapshot")
    snap_sub = snap.add_subparsers(dest="snapshot_command", metavar="ACTION", parser_class=_Parser)
    snap_sub.required = True
    create = snap_sub.add_parser(
        "create",
        help="snapshot an IVD",
        description="Snapshot an IVD (UUID or unique name); prints the new snapshot's id.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    create.add_argument("ivd", metavar="IVD")
    create.add_argument("--description", default="", metavar="TEXT", help="snapshot description")
    add_server_options(create)
    delete = snap_sub.add_parser(
        "delete",
        help="delete one snapshot of an IVD",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    delete.add_argument("ivd", metavar="IVD")
    delete.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id (see ivdfs ls)")
    add_server_options(delete)

    check = sub.add_parser(
        "check",
        help="validate a configuration without mounting",
        description="Check the vCenter certificate and login, load the VDDK library, and read "
        "from one IVD snapshot if there is one. Exits with the code mount would give.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_server_options(check)
    add_libdir_option(check)
    check.add_argument("--transport", metavar="MODES", help="VDDK transport modes to try")

    umount = sub.add_parser(
        "umount",
        help="unmount an ivdfs mount and wait for its process to finish",
        description="Unmount MOUNTPOINT (fusermount3 -u) and wait until the ivdfs process "
        "serving it has ended (its snapshots deleted, VDDK access ended).",
    )
    umount.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    umount.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the process to end (default 120)",
    )

    end = sub.add_parser(
        "end-access",
        help="call VDDK EndAccess for an IVD (recovery after a crash)",
        description="When ivdfs was killed while reading an IVD it could not call "
        "VixDiskLib_EndAccess, so vMotion stays disabled for the VMs the IVD is attached to. "
        "This calls it.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    end.add_argument("ivd", metavar="IVD", help="UUID or unique name")
    add_server_options(end)
    add_libdir_option(end)


def get_password(args: argparse.Namespace) -> Secret:
    # Taken out of the environment either way, so that no program ivdfs starts (losetup,
    # mount, ntfs-3g for --volumes kernel) inherits it.
    value = os.environ.pop("IVDFS_PASSWORD", None)
    if args.password_file is not None:
        return Secret(read_password_file(args.password_file.expanduser()))
    if value:
        return Secret(value)
    if sys.stdin.isatty():
        try:
            return Secret(getpass.getpass(f"Password for {args.user}@{args.server}: "))
        except (EOFError, KeyboardInterrupt):
            raise UserError("no password entered") from None
    raise UserError("no password: use --password-file FILE, IVDFS_PASSWORD, or run on a terminal")


def server_config(args: argparse.Namespace) -> ServerConfig:
    server = args.server or env("IVDFS_SERVER")
    if not server:
        raise UserError("no server: use --server HOST[:PORT] or IVDFS_SERVER")
    host, port = parse_server(server)
    args.server = server
    user = args.user or env("IVDFS_USER")
    if not user:
        raise UserError("no user: use --user USER or IVDFS_USER")
    args.user = user
    if args.insecure and args.thumbprint:
        raise UserError("--insecure and --thumbprint contradict each other; choose one")
    ca_file = args.ca_file.expanduser() if args.ca_file else None
    if ca_file is not None and not ca_file.is_file():
        raise UserError(f"CA file {ca_file} does not exist", ExitCode.TLS)
    return ServerConfig(
        host=host,
        port=port,
        user=user,
        password=get_password(args),
        ca_file=ca_file,
        thumbprint=normalize_thumbprint(args.thumbprint) if args.thumbprint else None,
        insecure=args.insecure,
    )


def vddk_libdir(args: argparse.Namespace) -> Path:
    libdir_text = str(args.vddk_libdir) if args.vddk_libdir else env("IVDFS_VDDK_LIBDIR")
    if not libdir_text:
        raise UserError(
            "no VDDK directory: use --vddk-libdir DIR or IVDFS_VDDK_LIBDIR", ExitCode.VDDK
        )
    return Path(libdir_text).expanduser().absolute()


def parse_refresh(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise UserError(f"invalid --refresh {text!r}: use a number of seconds (0: never)")
    return value


def mount_config(args: argparse.Namespace) -> MountConfig:
    libdir = vddk_libdir(args)
    cache_size = parse_size(args.cache_size, "--cache-size")
    block_size = parse_size(args.block_size, "--block-size")
    # At least one QueryAllocatedBlocks chunk (64K), at most one VDDK request (2M).
    smallest = _cdefs.VIXDISKLIB_MIN_CHUNK_SIZE * _cdefs.SECTOR_SIZE
    if block_size % _cdefs.SECTOR_SIZE or not smallest <= block_size <= _cdefs.MAX_REQUEST_BYTES:
        raise UserError(
            f"--block-size {args.block_size}: must be a multiple of 512 between 64K and 2M"
        )
    if cache_size < 2 * block_size:
        raise UserError(
            f"--cache-size {args.cache_size}: must hold at least two blocks "
            f"({2 * block_size} bytes)"
        )
    options = tuple(
        o.strip()
        for opt in args.options
        for o in opt.split(",")
        # config=FILE is ours (fstab lines can only pass -o options), not a FUSE option.
        if o.strip() and not o.strip().startswith("config=")
    )
    refresh = parse_refresh(str(args.refresh))
    if not 0 <= args.prefetch <= 256:
        raise UserError(f"--prefetch {args.prefetch}: must be between 0 and 256 blocks")
    if not 1 <= args.vddk_handles <= 16:
        raise UserError(f"--vddk-handles {args.vddk_handles}: must be between 1 and 16")
    return MountConfig(
        server=server_config(args),
        vddk_libdir=libdir,
        mountpoint=args.mountpoint.expanduser().absolute(),
        foreground=args.foreground,
        fuse_options=options,
        cache_size=cache_size,
        block_size=block_size,
        debug=args.debug,
        transport_modes=args.transport,
        prefetch=args.prefetch,
        vddk_handles=args.vddk_handles,
        use_async=args.use_async,
        refresh=refresh,
        snapshot_now=tuple(args.snapshot_now),
        volumes=args.volumes,
    )


def setup_logging(debug: bool, log_file: Path | None) -> None:
    handler: logging.Handler
    if log_file is not None:
        handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("pyVmomi", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config_settings(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every setting a config file may hold: the long options of the commands that read it."""
    out: dict[str, argparse.Action] = {}
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif (
                action.option_strings
                and action.dest not in ("help", "version", "config")
                and p.get_default("_cmd_parser") is p
            ):
                out.setdefault(action.dest, action)
    return out


def apply_config_file(
    parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace
) -> argparse.Namespace:
    """Re-parse with the config file's settings as defaults: a flag still wins, and an
    environment variable (read later, when its option is unset) beats the file."""
    cmd_parser: argparse.ArgumentParser | None = getattr(args, "_cmd_parser", None)
    if cmd_parser is None:
        return args
    path = args.config
    for opt in getattr(args, "options", None) or []:
        for o in opt.split(","):
            if o.strip().startswith("config="):
                path = Path(o.strip().removeprefix("config="))
    source, values = load_config_file(path)
    if source is None:
        return args
    known = _config_settings(parser)
    mine = {a.dest: a for a in cmd_parser._actions if a.option_strings}
    defaults: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(
                f"config file {source}: unknown setting {key!r} (known: {', '.join(sorted(known))})"
            )
        if key not in mine:
            continue  # a setting for another command, e.g. cache_size for ls
        env_name = ENV_KEYS.get(key)
        if env_name and env(env_name):
            continue
        if key in TLS_KEYS and any(
            a.split("=")[0] in ("--ca-file", "--thumbprint", "--insecure") for a in argv
        ):
            continue
        defaults[key] = _setting_value(source, key, value, mine[key])
    cmd_parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def _setting_value(source: Path, key: str, value: Any, action: argparse.Action) -> Any:
    bad = f"config file {source}: invalid {key} {value!r}"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise UserError(f"{bad}: use true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise UserError(f"{bad}: use a string or a list of strings")
        return list(items)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UserError(f"{bad}: use a string or a number")
    text = str(value)
    if callable(action.type):
        try:
            return action.type(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise UserError(bad) from None
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    try:
        args = apply_config_file(parser, argv, args)
        setup_logging(getattr(args, "debug", False), getattr(args, "log", None))
        if args.command != "mount":
            # Commands report on stdout/stderr themselves; the log says only what went wrong.
            logging.getLogger().setLevel(logging.WARNING)
        if args.command in ("mount", "check", "end-access"):
            # Once the VDDK directory is known, before the password is read (an exec would lose
            # one typed at the prompt): puts VDDK's lib64 on the loader's search path.
            from ivdfs.vddk.reexec import ensure_library_path

            try:
                reexec_libdir: Path | None = vddk_libdir(args)
            except UserError:
                reexec_libdir = None  # the command reports it
            if reexec_libdir is not None:
                ensure_library_path(reexec_libdir)
        if args.command == "mount":
            from ivdfs import mount

            cfg = mount_config(args)
            if cfg.foreground:
                return mount.run(cfg)
            return mount.daemonize_and_run(cfg)
        if args.command == "umount":
            from ivdfs.commands.admin import umount

            return umount(args.mountpoint, args.timeout)
        from ivdfs.commands import admin, check, inventory

        if args.command == "ls":
            return inventory.ls(server_config(args), args.datastore, args.ivd, args.json)
        if args.command == "snapshot":
            if args.snapshot_command == "create":
                return inventory.snapshot_create(server_config(args), args.ivd, args.description)
            return inventory.snapshot_delete(server_config(args), args.ivd, args.snapshot)
        if args.command == "check":
            try:
                libdir: Path | None = vddk_libdir(args)
            except UserError:
                libdir = None  # reported by the check itself, after the vCenter steps
            return check.check(server_config(args), libdir, args.transport)
        if args.command == "end-access":
            return admin.end_access(server_config(args), vddk_libdir(args), args.ivd)
        raise UserError(f"unknown command {args.command}", ExitCode.USAGE)
    except UserError as e:
        print(f"ivdfs: {e.message}", file=sys.stderr)
        return e.exit_code
    except NotFound as e:
        print(f"ivdfs: {e}", file=sys.stderr)
        return ExitCode.NOT_FOUND
    except BackendError as e:
        print(f"ivdfs: {e}", file=sys.stderr)
        return ExitCode.VSPHERE
    except KeyboardInterrupt:
        print("ivdfs: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"ivdfs: {e}", file=sys.stderr)
        return ExitCode.INTERNAL
