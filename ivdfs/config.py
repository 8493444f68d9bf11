"""Immutable configuration, built once from flags, environment, a config file and prompts.

`MountConfig` has a field for each setting of `ivdfs mount`, named as the settings table
(`ivdfs.settings`) names it, and no default of its own: it is built from the resolved values
(`MountConfig.of`). The views that the layers take (`Limits` for the disk service,
`TreeSettings`, `VolumeSettings`) are derived from it here, and take their defaults from the
table when a test builds one by hand.

Precedence is flag > environment > config file > built-in default. The config file
(`~/.config/ivdfs/config.toml`, `--config FILE` or IVDFS_CONFIG) is TOML with the long option
names as keys (`server`, `user`, `password_file`, `ca_file`, `thumbprint`, `insecure`,
`vddk_libdir`, `cache_size`, `options`, `refresh`, ...). It never holds a password: a `password`
key is refused, so the file can be world-readable and the secret lives in a 0600 password file.

Secrets live in `Secret`, whose repr never shows the value, so a config can be logged safely.
Nothing here is shared between threads after start-up.
"""

from __future__ import annotations

import dataclasses
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ivdfs.errors import UserError
from ivdfs.settings import default, env

DEFAULT_PORT = 443
# Shown to VDDK and vCenter as who holds the disk; VDDK caps identities at 50 characters.
ACCESS_IDENTITY = "ivdfs read-only snapshot access"


class Secret:
    """A string that never appears in repr/str output."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def parse_server(text: str) -> tuple[str, int]:
    """'vc.example.com[:port]' or '[::1]:443' -> (host, port)."""
    text = text.strip()
    if not text:
        raise UserError("no vCenter/ESXi server given (--server or IVDFS_SERVER)")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host or "/" in host:
        raise UserError(f"invalid server {text!r}: expected HOST or HOST:PORT")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UserError(f"invalid port in server {text!r}")
    return host, int(port_text)


def normalize_thumbprint(text: str) -> str:
    """Accept 'aa:bb:..', 'AABB..' or 'aa bb ..'; return VDDK's form, 'AA:BB:...'."""
    digits = re.sub(r"[\s:]", "", text).upper()
    if not re.fullmatch(r"[0-9A-F]{40}", digits):
        raise UserError(
            f"invalid SHA-1 thumbprint {text!r}: expected 20 hex pairs such as AA:BB:..."
        )
    return ":".join(digits[i : i + 2] for i in range(0, 40, 2))


def read_password_file(path: Path, what: str = "password file") -> str:
    """The first line of a secret's file (`what` names it in errors), which must be the
    owner's alone."""
    try:
        st = path.stat()
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise UserError(f"{what} {path} is readable by group or others; run: chmod 600 {path}")
        text = path.read_text(encoding="utf-8")
    except UserError:
        raise
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    # Only the first line counts; a trailing newline from `echo pw > file` is not part of it.
    password = text.splitlines()[0] if text else ""
    if not password:
        raise UserError(f"{what} {path} is empty")
    return password


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    user: str
    password: Secret
    ca_file: Path | None = None
    thumbprint: str | None = None  # pinned SHA-1, normalised
    insecure: bool = False
    # Where the password came from, if a file: named in printed advice (never the password).
    password_file: Path | None = None
    # --vcenter-timeout: the deadline of each connect, handshake, call and task poll.
    timeout: float = default("vcenter_timeout")


@dataclass(frozen=True)
class VddkOptions:
    """Where VDDK is and how to start it, for the commands that load it outside a mount as a
    mount does: `--vddk-libdir`, `--vddk-config` (InitEx's config file; None: ivdfs's private
    one) and `--nfc-host-port` (0: VDDK's default)."""

    libdir: Path
    config_file: Path | None
    nfc_host_port: int

    def options(self) -> list[str]:
        """These settings as command-line options, for printed advice."""
        out = ["--vddk-libdir", str(self.libdir)]
        if self.config_file is not None:
            out += ["--vddk-config", str(self.config_file)]
        if self.nfc_host_port:
            out += ["--nfc-host-port", str(self.nfc_host_port)]
        return out


# --- the views the layers take ----------------------------------------------------------------

# Not options: the connection cap's policy (ivdfs.vddk.service). A disk in use is closed for
# another only once it has been open MIN_OPEN seconds, and a held disk nobody has read for
# IN_USE_GAP counts as unused.
MIN_OPEN = 3.0
IN_USE_GAP = 0.25


@dataclass(frozen=True)
class Limits:
    """What bounds the disk service (ivdfs.vddk.service)."""

    max_connections: int = default("max_connections")
    idle_timeout: float = default("idle_timeout")
    handles_per_disk: int = default("vddk_handles")
    use_async: bool = default("use_async")
    in_flight_bytes: int = default("max_in_flight")
    block_size: int = default("block_size")
    min_open: float = MIN_OPEN
    in_use_gap: float = IN_USE_GAP
    legacy: bool = False  # the cap and access policy before issue 28 (benchmarks only)


@dataclass(frozen=True)
class TreeSettings:
    """How the tree (ivdfs.tree) reads and refreshes."""

    block_size: int = default("block_size")
    # Seconds after which a directory listing re-queries vCenter; 0: load once, never again.
    refresh: float = default("refresh")
    # Largest read-ahead window of a sequential reader, in blocks (0: none).
    max_prefetch: int = default("prefetch")
    # Inventory queries at once (the vCenter session's pool).
    inventory_threads: int = default("vcenter_connections")


@dataclass(frozen=True)
class VolumeSettings:
    """Which volume backend, and what bounds it (ivdfs.volumes.setup)."""

    mode: str = default("volumes")
    idle_timeout: float = default("idle_timeout")  # guestfs: stop an appliance unused this long
    guestfs_memory: int = default("guestfs_memory")  # guestfs: all running appliances together
    key_file: Path | None = None  # guestfs: --volume-key-file (LUKS/BitLocker passphrase)


@dataclass(frozen=True)
class MountConfig:
    """What `ivdfs mount` needs, resolved and validated: a field per setting (see
    ivdfs.settings for each one), besides the server's (in `server`) and the mountpoint."""

    server: ServerConfig
    mountpoint: Path
    vddk_libdir: Path
    vddk_config: Path | None
    transport: str | None
    datastore_paths: tuple[tuple[str, Path], ...]  # --datastore-path NAME=DIR, unchecked
    nfc_host_port: int
    cache_size: int
    block_size: int
    prefetch: int
    vddk_handles: int
    use_async: bool
    max_in_flight: int
    max_connections: int
    idle_timeout: float
    volumes: str
    guestfs_memory: int
    volume_key_file: Path | None
    refresh: float
    snapshot_now: tuple[str, ...]
    datastores: tuple[str, ...]
    ivds: tuple[str, ...]
    vcenter_connections: int
    foreground: bool
    options: tuple[str, ...]  # FUSE options, one a word (config=FILE taken out)
    debug: bool
    log: Path | None
    audit_log: Path | None
    hashes: bool

    @classmethod
    def of(cls, values: dict[str, Any], server: ServerConfig, mountpoint: Path) -> MountConfig:
        """From the resolved settings of `ivdfs mount` (`ivdfs.settings.resolve`)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"server", "mountpoint"}
        given = {name: values[name] for name in fields}
        given["options"] = option_words(values["options"])
        return cls(server=server, mountpoint=mountpoint.expanduser().absolute(), **given)

    @property
    def limits(self) -> Limits:
        return Limits(
            max_connections=self.max_connections,
            idle_timeout=self.idle_timeout,
            handles_per_disk=self.vddk_handles,
            use_async=self.use_async,
            in_flight_bytes=self.max_in_flight,
            block_size=self.block_size,
        )

    @property
    def tree(self) -> TreeSettings:
        return TreeSettings(self.block_size, self.refresh, self.prefetch, self.vcenter_connections)

    @property
    def volume_settings(self) -> VolumeSettings:
        return VolumeSettings(
            self.volumes, self.idle_timeout, self.guestfs_memory, self.volume_key_file
        )


def option_words(values: tuple[str, ...]) -> tuple[str, ...]:
    """-o values as single options; config=FILE is ours (fstab lines can only pass -o
    options), not a FUSE option."""
    return tuple(
        o.strip()
        for opt in values
        for o in opt.split(",")
        if o.strip() and not o.strip().startswith("config=")
    )


# --- the config file ------------------------------------------------------------------------

CONFIG_ENV = "IVDFS_CONFIG"


def default_config_path() -> Path:
    base = env("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ivdfs" / "config.toml"


def load_config_file(
    path: Path | None, path_keys: frozenset[str] = frozenset()
) -> tuple[Path | None, dict[str, Any]]:
    """Read the config file: `path` if given (it must exist), else IVDFS_CONFIG, else the
    default location if it exists. Returns (the file read or None, its settings); values of
    `path_keys` expand `~` and are made relative to the file."""
    explicit = path is not None or env(CONFIG_ENV) is not None
    if path is None:
        path = Path(env(CONFIG_ENV) or default_config_path())
    path = path.expanduser()
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise UserError(f"config file {path} does not exist") from None
        return None, {}
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path}: {e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8; tomllib lets the decoder's error through
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    if "password" in data:
        raise UserError(
            f"config file {path}: 'password' is not accepted here; put the password in a file "
            "of its own (chmod 600) and name it with password_file"
        )
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            raise UserError(f"config file {path}: [{key}] tables are not supported")
        if name in path_keys:
            if not isinstance(value, str):
                raise UserError(f"config file {path}: {key} must be a string (a path)")
            p = Path(value).expanduser()
            value = str(p if p.is_absolute() else path.parent / p)
        out[name] = value
    return path, out
