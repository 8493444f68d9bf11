"""Command line: `ivdfs mount ...`; exit codes from errors.ExitCode; no tracebacks for users."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from pathlib import Path

from ivdfs import __version__
from ivdfs.config import (
    MountConfig,
    Secret,
    ServerConfig,
    env,
    normalize_thumbprint,
    parse_server,
    parse_size,
    read_password_file,
)
from ivdfs.errors import ExitCode, UserError

log = logging.getLogger("ivdfs")

ENV_HELP = """environment:
  IVDFS_SERVER, IVDFS_USER, IVDFS_PASSWORD, IVDFS_VDDK_LIBDIR  stand in for the matching options
  (a password is never accepted on the command line: use --password-file, IVDFS_PASSWORD or
  the prompt)

exit codes: 0 ok, 2 usage, 3 bad configuration, 4 login refused, 5 server unreachable or not
vSphere, 6 TLS certificate problem, 7 VDDK library problem, 8 bad mountpoint, 9 FUSE failure
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(ExitCode.USAGE)


def add_server_options(p: argparse.ArgumentParser) -> None:
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
    v.add_argument(
        "--vddk-libdir",
        type=Path,
        metavar="DIR",
        help="VDDK root; the library is DIR/lib64/libvixDiskLib.so.N [IVDFS_VDDK_LIBDIR]",
    )
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
    return parser


def get_password(args: argparse.Namespace) -> Secret:
    if args.password_file is not None:
        return Secret(read_password_file(args.password_file.expanduser()))
    value = os.environ.get("IVDFS_PASSWORD")
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


def mount_config(args: argparse.Namespace) -> MountConfig:
    libdir_text = str(args.vddk_libdir) if args.vddk_libdir else env("IVDFS_VDDK_LIBDIR")
    if not libdir_text:
        raise UserError(
            "no VDDK directory: use --vddk-libdir DIR or IVDFS_VDDK_LIBDIR", ExitCode.VDDK
        )
    cache_size = parse_size(args.cache_size, "--cache-size")
    block_size = parse_size(args.block_size, "--block-size")
    if block_size % 512 or not 64 * 1024 <= block_size <= 2 * 1024 * 1024:
        raise UserError(
            f"--block-size {args.block_size}: must be a multiple of 512 between 64K and 2M"
        )
    if cache_size < 2 * block_size:
        raise UserError(
            f"--cache-size {args.cache_size}: must hold at least two blocks "
            f"({2 * block_size} bytes)"
        )
    options = tuple(o.strip() for opt in args.options for o in opt.split(",") if o.strip())
    return MountConfig(
        server=server_config(args),
        vddk_libdir=Path(libdir_text).expanduser().absolute(),
        mountpoint=args.mountpoint.expanduser().absolute(),
        foreground=args.foreground,
        fuse_options=options,
        cache_size=cache_size,
        block_size=block_size,
        debug=args.debug,
        transport_modes=args.transport,
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    try:
        setup_logging(args.debug, args.log)
        if args.command == "mount":
            from ivdfs import mount

            cfg = mount_config(args)
            if cfg.foreground:
                return mount.run(cfg)
            return mount.daemonize_and_run(cfg)
        raise UserError(f"unknown command {args.command}", ExitCode.USAGE)
    except UserError as e:
        print(f"ivdfs: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ivdfs: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"ivdfs: {e}", file=sys.stderr)
        return ExitCode.INTERNAL
