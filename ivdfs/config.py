"""Immutable configuration, built once from flags, environment, a config file and prompts.

Precedence is flag > environment > config file > built-in default. The config file
(`~/.config/ivdfs/config.toml`, `--config FILE` or IVDFS_CONFIG) is TOML with the long option
names as keys (`server`, `user`, `password_file`, `ca_file`, `thumbprint`, `insecure`,
`vddk_libdir`, `cache_size`, `options`, `refresh`, ...). It never holds a password: a `password`
key is refused, so the file can be world-readable and the secret lives in a 0600 password file.

Secrets live in `Secret`, whose repr never shows the value, so a config can be logged safely.
Nothing here is shared between threads after start-up.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ivdfs.errors import UserError

DEFAULT_PORT = 443
DEFAULT_CACHE_SIZE = 256 * 1024 * 1024
DEFAULT_BLOCK_SIZE = 1024 * 1024
# Seconds vCenter/ESXi gets to answer each step (connect, handshake, call, task poll).
DEFAULT_VCENTER_TIMEOUT = 30.0
# Shown to VDDK and vCenter as who holds the disk; VDDK caps identities at 50 characters.
ACCESS_IDENTITY = "ivdfs read-only snapshot access"

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


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


def parse_size(text: str, what: str = "size") -> int:
    """'256M' -> 268435456. Binary units; a bare number is bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UserError(
            f"invalid {what} {text!r}: use a number with an optional K, M, G or T suffix"
        )
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


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


def read_password_file(path: Path) -> str:
    try:
        st = path.stat()
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise UserError(
                f"password file {path} is readable by group or others; run: chmod 600 {path}"
            )
        text = path.read_text(encoding="utf-8")
    except UserError:
        raise
    except UnicodeDecodeError as e:
        raise UserError(f"password file {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read password file {path}: {e.strerror}") from None
    # Only the first line counts; a trailing newline from `echo pw > file` is not part of it.
    password = text.splitlines()[0] if text else ""
    if not password:
        raise UserError(f"password file {path} is empty")
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
    timeout: float = DEFAULT_VCENTER_TIMEOUT


@dataclass(frozen=True)
class MountConfig:
    """What `ivdfs mount` needs, resolved and validated (see ivdfs.settings for each one)."""

    server: ServerConfig
    vddk_libdir: Path
    mountpoint: Path
    foreground: bool = False
    fuse_options: tuple[str, ...] = ()
    cache_size: int = DEFAULT_CACHE_SIZE
    block_size: int = DEFAULT_BLOCK_SIZE
    debug: bool = False
    log_file: Path | None = None
    transport_modes: str | None = None
    vddk_config: Path | None = None
    nfc_host_port: int = 0
    prefetch: int = 16
    vddk_handles: int = 1
    use_async: bool = True
    in_flight_bytes: int = 8 << 20
    max_connections: int = 8
    idle_timeout: float = 60.0
    refresh: float = 60.0
    snapshot_now: tuple[str, ...] = ()
    datastores: tuple[str, ...] = ()
    ivds: tuple[str, ...] = ()
    volumes: str = "none"
    guestfs_memory: int = 2 << 30
    vcenter_connections: int = 8
    audit_log: Path | None = None
    hashes: bool = False


def env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


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
