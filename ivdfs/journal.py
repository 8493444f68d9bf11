"""The journal of what a mount holds, so that a killed mount can be undone with one command.

Role: one JSON file per mountpoint under the runtime directory (`/run/ivdfs` for root, else
`$XDG_RUNTIME_DIR/ivdfs` or `/tmp/ivdfs-<uid>`, mode 0700). The daemon writes it before each
acquisition and clears the entry after each release: temporary snapshots (an intent before the
task, the id after it), IVDs it called PrepareForAccess on (with what EndAccess needs), the
guest volumes' run directory, and each running libguestfs appliance of ``--volumes guestfs``
(its helper and qemu processes with their start times, its FUSE mount and private temporary
directory). Loop devices, volume mounts and their helper processes are found
from the kernel (backing files inside the mountpoint, mounts under the run directory), which
cannot miss one that a crash left half made. A clean exit records its status and removes the
file; a file whose process is gone is a dead mount: `ivdfs umount` undoes it
(`ivdfs.commands.recover`), `ivdfs status` shows it, and `ivdfs mount` refuses to stack a new
mount over it. Every write replaces the file atomically (write, fsync, rename).

What cannot be undone automatically is named with the command that would undo it by hand:
`advice` and `connection_options` build that command line, the same way at every site that
prints one (the mount's teardown, recovery), from the connection settings the user gave (or,
when none were given, from what the mount recorded). Never with a password.

Concurrency: the daemon writes from the main thread (start-up, teardown), the trio thread
(volumes) and the VDDK control thread (access); one lock serialises them. Readers are other
processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ivdfs import __version__
from ivdfs.config import ServerConfig
from ivdfs.settings import default

FORMAT = 1
# What a journal holds: each kind is undone by `ivdfs umount` (commands/recover.py).
HOLDINGS = ("snapshots", "prepared", "run_dirs", "vixmntapi", "appliances")


def runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/ivdfs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "ivdfs"
    return Path(f"/tmp/ivdfs-{os.geteuid()}")


def search_dirs() -> list[Path]:
    """Where journals may be: ours, and (for root) every user's."""
    dirs = [runtime_dir()]
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            dirs += [Path("/run/user") / u / "ivdfs" for u in os.listdir("/run/user")]
        with contextlib.suppress(OSError):
            dirs += [Path("/tmp") / n for n in os.listdir("/tmp") if n.startswith("ivdfs-")]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def path_for(mountpoint: Path, directory: Path | None = None) -> Path:
    digest = hashlib.sha256(os.fsencode(str(mountpoint))).hexdigest()[:16]
    return (directory or runtime_dir()) / f"mount-{digest}.json"


def process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 and fields[0] not in ("Z", "X") else None


def server_option(host: str, port: int) -> str:
    """HOST:PORT as --server takes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connection_options(server: ServerConfig) -> list[str]:
    """The options that reach `server` as the user's settings did (whether they came from
    flags, the environment or the config file), for a command printed as advice: server,
    user, the TLS trust settings and the password file's path. Never the password itself:
    whoever runs the command supplies it again as before (IVDFS_PASSWORD, a prompt)."""
    out = ["--server", server_option(server.host, server.port), "--user", server.user]
    if server.ca_file is not None:
        out += ["--ca-file", str(server.ca_file)]
    if server.thumbprint:
        out += ["--thumbprint", server.thumbprint]
    if server.insecure:
        out.append("--insecure")
    if server.password_file is not None:
        out += ["--password-file", str(server.password_file)]
    if server.timeout != default("vcenter_timeout"):
        out += ["--vcenter-timeout", f"{server.timeout:g}"]
    return out


def advice(*words: str, options: Sequence[str] = ()) -> str:
    """An ivdfs command line to print as what to run, quoted for a POSIX shell."""
    return shlex.join(["ivdfs", *words, *options])


@dataclass
class Record:
    """A journal as read back: what a (live or dead) mount holds."""

    path: Path
    doc: dict[str, Any]

    @property
    def mountpoint(self) -> Path:
        return Path(self.doc["mountpoint"])

    @property
    def pid(self) -> int:
        return int(self.doc["pid"])

    @property
    def alive(self) -> bool:
        return process_start(self.pid) == self.doc.get("pid_start")

    @property
    def snapshots(self) -> list[dict[str, Any]]:
        return list(self.doc.get("snapshots", []))

    @property
    def prepared(self) -> list[dict[str, Any]]:
        return list(self.doc.get("prepared", []))

    @property
    def run_dirs(self) -> list[str]:
        return list(self.doc.get("run_dirs", []))

    @property
    def vixmntapi(self) -> list[dict[str, Any]]:
        """VixMntapi's disk mounts: {"ivd", "snapshot", "name", "fuse": [paths]}; "fuse" is
        empty while OpenDisks runs (recovery then finds them by "name")."""
        return list(self.doc.get("vixmntapi", []))

    @property
    def appliances(self) -> list[dict[str, Any]]:
        """--volumes guestfs appliances: {"helper", "helper_start", "qemu", "qemu_start",
        "mount", "tmp"}."""
        return list(self.doc.get("appliances", []))

    def connection_options(self) -> list[str]:
        """Options that reach the mount's own server as it did, for advice when the user gave
        none: its server and user, and the certificate it verified, pinned by thumbprint
        (which replaces a CA file or --insecure the journal does not know of)."""
        doc = self.doc
        if not doc.get("server") or not doc.get("user"):
            return []
        out = ["--server", server_option(str(doc["server"]), int(doc.get("port", 443)))]
        out += ["--user", str(doc["user"])]
        if doc.get("thumbprint"):
            out += ["--thumbprint", str(doc["thumbprint"])]
        return out

    def umount_advice(self) -> str:
        """The command that undoes this (dead) mount: with the connection options when what
        it holds needs vCenter (snapshots, prepared IVDs)."""
        remote = self.snapshots or self.prepared
        options = self.connection_options() if remote else []
        return advice("umount", str(self.mountpoint), options=options)

    def holds_anything(self) -> bool:
        return bool(
            self.snapshots or self.prepared or self.run_dirs or self.vixmntapi or self.appliances
        )


def load(path: Path) -> Record | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "mountpoint" not in doc:
        return None
    return Record(path, doc)


def find(mountpoint: Path) -> Record | None:
    for d in search_dirs():
        rec = load(path_for(mountpoint, d))
        if rec is not None and rec.mountpoint == mountpoint:
            return rec
    return None


def every() -> Iterator[Record]:
    for d in search_dirs():
        for p in sorted(d.glob("mount-*.json")):
            rec = load(p)
            if rec is not None:
                yield rec


class Journal:
    """The live journal of this process's mount."""

    def __init__(self, mountpoint: Path, **facts: Any) -> None:
        """`facts`: what recovery needs besides the holdings (server, user, thumbprint,
        identity, VDDK directory, log file)."""
        directory = runtime_dir()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path_for(mountpoint, directory)
        self._lock = threading.Lock()
        pid = os.getpid()
        self._doc: dict[str, Any] = {
            "format": FORMAT,
            "version": __version__,
            "mountpoint": str(mountpoint),
            "pid": pid,
            "pid_start": process_start(pid),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "state": "starting",
            **facts,
            "snapshots": [],
            "prepared": [],
            "run_dirs": [],
            "vixmntapi": [],
            "appliances": [],
        }
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self._doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _change(self, fn: Any) -> None:
        with self._lock:
            fn(self._doc)
            self._write()

    def set(self, key: str, value: Any) -> None:
        self._change(lambda d: d.__setitem__(key, value))

    def add(self, kind: str, entry: Any) -> None:
        self._change(lambda d: d[kind].append(entry))

    def update(self, kind: str, match: dict[str, Any], **fields: Any) -> None:
        def fn(d: dict[str, Any]) -> None:
            for e in d[kind]:
                if all(e.get(k) == v for k, v in match.items()):
                    e.update(fields)

        self._change(fn)

    def drop_value(self, kind: str, value: Any) -> None:
        """Remove a plain entry (a run directory's path)."""
        self._change(lambda d: d.__setitem__(kind, [e for e in d[kind] if e != value]))

    def drop(self, kind: str, match: dict[str, Any]) -> None:
        def fn(d: dict[str, Any]) -> None:
            d[kind] = [e for e in d[kind] if not all(e.get(k) == v for k, v in match.items())]

        self._change(fn)

    # The DiskService's Holdings protocol.
    def prepared(self, ivd_id: str, datastore_moref: str) -> None:
        self.add("prepared", {"ivd": ivd_id, "datastore": datastore_moref})

    def ended(self, ivd_id: str) -> None:
        self.drop("prepared", {"ivd": ivd_id})

    def record(self) -> Record:
        """The journal as it stands, read back as `ivdfs umount` and `status` would."""
        with self._lock:
            return Record(self.path, json.loads(json.dumps(self._doc)))

    def finish(self, exit_code: int) -> list[str]:
        """The process ends: the file goes if nothing is held any more; otherwise it stays,
        with the exit status, for `ivdfs umount` to finish the job. Returns what is left
        (one of `HOLDINGS`), if anything."""
        with self._lock:
            d = self._doc
            left = [k for k in HOLDINGS if d.get(k)]
            if left:
                d["state"] = "exited"
                d["exit_code"] = exit_code
                self._write()
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            return left
