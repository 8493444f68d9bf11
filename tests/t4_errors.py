"""Bad input, table-driven: one clear line, a distinct exit code, nothing mounted (issue 5)."""

from __future__ import annotations

import contextlib
import errno
import http.server
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivdfs import journal
from tests.mounting import VDDK6_LIBDIR, Bed, Mount, as_nobody, fuse_mounts, mounted_at
from tests.testbed.vsphere import https_server, place_image


@pytest.fixture(scope="module")
def not_vsphere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """An HTTPS server that is not vSphere (every request: 404)."""
    with https_server(tmp_path_factory.mktemp("https")) as (port, ca):
        yield f"127.0.0.1:{port}", str(ca)


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # a TLS ClientHello is a "bad request" line on stderr otherwise


@pytest.fixture(scope="module")
def plain_http() -> Iterator[str]:
    """An HTTP server without any TLS (every request: an HTTP error page)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def closes_at_once() -> Iterator[str]:
    """A TCP port that accepts each connection and closes it before reading anything."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):  # the listener closed: the module is done
            while True:
                conn, _ = listener.accept()
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def replace_opt(args: list[str], opt: str, value: str | None) -> list[str]:
    """Set (or with None, drop) an option's value in an argument list."""
    out = list(args)
    if opt in out:
        i = out.index(opt)
        del out[i : i + 2]
    if value is not None:
        out[-1:-1] = [opt, value]
    return out


def run_mount(args: list[str], env: dict[str, str], user: list[str] | None = None
              ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        [*(user or []), *args], env=env, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


CASES = [
    # id, option changes, env changes, exit code, message fragment
    ("wrong-password", {}, {"IVDFS_PASSWORD": "wrong"}, 4, "rejected user"),
    ("unreachable", {"--server": "127.0.0.1:1"}, {}, 5, "cannot reach 127.0.0.1:1"),
    (
        "not-vsphere",
        {"--server": "NOTVSPHERE", "--ca-file": "NOTVSPHERE_CA"},
        {},
        5,
        "does not answer as a vCenter",
    ),
    ("unverified-cert", {"--ca-file": None}, {}, 6, "failed verification"),
    (
        "thumbprint-mismatch",
        {"--ca-file": None, "--thumbprint": "00:" * 19 + "00"},
        {},
        6,
        "thumbprint mismatch",
    ),
    # No TLS at all: the handshake gets an HTTP error page back.
    ("plain-http", {"--server": "PLAINHTTP"}, {}, 5, "does not speak TLS"),
    # Closed before the handshake: the client sees a reset or an EOF, whichever comes first.
    ("closes-at-once", {"--server": "CLOSER"}, {}, 5, "closed the connection"),
    ("thumbprint-invalid", {"--thumbprint": "xyz"}, {}, 3, "invalid SHA-1 thumbprint"),
    (
        "insecure-and-pinned",
        {"--insecure": "", "--thumbprint": "00:" * 19 + "00"},
        {},
        3,
        "contradict",
    ),
    ("libdir-missing", {"--vddk-libdir": "/nonexistent/vddk"}, {}, 7, "does not exist"),
    ("libdir-empty", {"--vddk-libdir": "EMPTYDIR"}, {}, 7, "no libvixDiskLib.so.N"),
    ("library-unloadable", {"--vddk-libdir": "GARBAGE"}, {}, 7, "cannot load"),
    ("library-too-old", {"--vddk-libdir": str(VDDK6_LIBDIR)}, {}, 7, "VDDK 6.7 or later"),
    ("no-server", {"--server": None}, {}, 3, "no server"),
    ("no-password", {}, {"IVDFS_PASSWORD": ""}, 3, "no password"),
    (
        "password-file-open",
        {"--password-file": "PWFILE644"},
        {"IVDFS_PASSWORD": ""},
        3,
        "chmod 600",
    ),
    (
        "password-file-missing",
        {"--password-file": "/nonexistent/pw"},
        {},
        3,
        "cannot read password file",
    ),
    ("ca-file-missing", {"--ca-file": "/nonexistent/ca.pem"}, {}, 6, "does not exist"),
    ("cache-size-invalid", {"--cache-size": "lots"}, {}, 3, "invalid --cache-size"),
    ("block-size-invalid", {"--block-size": "1000"}, {}, 3, "--block-size"),
    # Not a power of two: VDDK's allocation queries could not use it.
    ("block-size-not-power-of-two", {"--block-size": "384K"}, {}, 3, "power of two"),
    ("transport-unknown", {"--transport": "nbdssl:carrier-pigeon"}, {}, 3, "invalid --transport"),
    ("max-connections-zero", {"--max-connections": "0"}, {}, 3, "must be at least 1"),
    ("idle-timeout-invalid", {"--idle-timeout": "-1"}, {}, 3, "invalid --idle-timeout"),
    # libfuse refuses it at INIT, after the mount was reported ready: refused up front.
    ("fuse-option-max-read", {"-o": "max_read=131072"}, {}, 3, "unsupported FUSE option"),
    ("fuse-option-uid-text", {"-o": "uid=root"}, {}, 3, "uid=, gid= take numbers"),
    ("cache-smaller-than-blocks", {"--cache-size": "1M"}, {}, 3, "at least two blocks"),
    ("fuse-option-rw", {"-o": "rw"}, {}, 3, "-o rw is not allowed"),
    ("fuse-option-unknown", {"-o": "bogus"}, {}, 3, "unsupported FUSE option"),
    ("mountpoint-missing", {"MOUNTPOINT": "MISSING"}, {}, 8, "does not exist"),
    ("mountpoint-file", {"MOUNTPOINT": "FILE"}, {}, 8, "not a directory"),
    ("mountpoint-not-empty", {"MOUNTPOINT": "NONEMPTY"}, {}, 8, "not empty"),
    ("mountpoint-mounted", {"MOUNTPOINT": "MOUNTED"}, {}, 8, "already a mount point"),
]


@pytest.mark.parametrize(("changes", "env_changes", "code", "fragment"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input(
    bed: Bed, not_vsphere: tuple[str, str], plain_http: str, closes_at_once: str, tmp_path: Path,
    changes: dict[str, str | None], env_changes: dict[str, str], code: int, fragment: str,
) -> None:  # fmt: skip
    mp = tmp_path / "mnt"
    mp.mkdir()
    special = {
        "NOTVSPHERE": not_vsphere[0],
        "NOTVSPHERE_CA": not_vsphere[1],
        "PLAINHTTP": plain_http,
        "CLOSER": closes_at_once,
        "EMPTYDIR": str(tmp_path),
        "MISSING": str(tmp_path / "missing"),
        "FILE": str(tmp_path / "file"),
        "NONEMPTY": str(tmp_path / "nonempty"),
        "MOUNTED": str(tmp_path / "mounted"),
    }
    (tmp_path / "file").write_text("x")
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "x").write_text("x")
    garbage = tmp_path / "garbage"
    (garbage / "lib64").mkdir(parents=True)
    (garbage / "lib64" / "libvixDiskLib.so.8").write_bytes(b"not an ELF file")
    special["GARBAGE"] = str(garbage)
    pw = tmp_path / "pw644"
    pw.write_text(bed.vcsim.password)
    pw.chmod(0o644)
    special["PWFILE644"] = str(pw)
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mounted)], check=True)
    try:
        args = bed.mount_args(mp)
        for opt, value in changes.items():
            if opt == "MOUNTPOINT":
                assert value is not None
                args[-1] = special[value]
            elif value == "":
                args.insert(-1, opt)
            else:
                args = replace_opt(args, opt, special.get(value, value) if value else value)
        env = bed.env(**env_changes)
        r = run_mount(args, env)
        assert r.returncode == code, r.stderr
        assert fragment in r.stderr
        assert "Traceback" not in r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ivdfs:")]
        assert len(errors) == 1, r.stderr  # one line says what is wrong
        assert bed.vcsim.password not in r.stderr
        assert not mounted_at(mp)
        assert not [m for m in fuse_mounts() if m.startswith(str(tmp_path))]
    finally:
        subprocess.run(["umount", str(mounted)], check=True)


def test_a_password_file_others_can_reach_is_refused(bed: Bed, tmp_path: Path) -> None:
    """Any permission for group or others (read, write or search) refuses the file with one
    line before anything connects; 0600 and 0400 are the only shapes accepted."""
    modes = (0o640, 0o660, 0o620, 0o604)
    runs = []
    for mode in modes:
        pw = tmp_path / f"pw{mode:o}"
        pw.write_text(bed.vcsim.password + "\n")
        pw.chmod(mode)
        mp = tmp_path / f"mnt{mode:o}"
        mp.mkdir()
        args = bed.mount_args(mp)
        args[-1:-1] = ["--password-file", str(pw)]
        proc = subprocess.Popen(
            args, env=bed.env(IVDFS_PASSWORD=""), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        runs.append((mode, mp, proc))
    try:
        for mode, mp, proc in runs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 3, (oct(mode), err)
            assert err.startswith("ivdfs: password file "), (oct(mode), err)
            assert "chmod 600" in err and len(err.splitlines()) == 1
            assert bed.vcsim.password not in err
            assert not mounted_at(mp)
    finally:
        for _, mp, proc in runs:  # what a bug mounted (detached) goes again
            proc.kill()
            if mounted_at(mp):
                subprocess.run(["fusermount3", "-u", str(mp)], check=False)


def test_usage_errors_exit_2(bed: Bed, tmp_path: Path) -> None:
    r = run_mount([*bed.mount_args(tmp_path)[:-1], "--no-such-option", str(tmp_path)], bed.env())
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_permission_on_dev_fuse(bed: Bed) -> None:
    """A user who may not use /dev/fuse: exit 9, one line. The test makes that user (nobody,
    in a mount namespace where /dev/fuse is a node of ours with mode 0600, and with an
    interpreter it can run), whatever mode the host's /dev/fuse has."""
    # pytest's own temporary directories are private to root: use one nobody can reach.
    tmp_path = Path(tempfile.mkdtemp(prefix="ivdfs-nobody-"))
    tmp_path.chmod(0o755)
    mp = tmp_path / "mnt"
    mp.mkdir()
    subprocess.run(["chown", "65534:65534", str(mp)], check=True)
    args = replace_opt(bed.mount_args(mp), "--ca-file", None)
    args.insert(-1, "--insecure")
    r = run_mount(as_nobody(args, tmp_path, fuse_mode=0o600), bed.env(HOME=str(tmp_path)))
    assert r.returncode == 9, r.stderr
    assert "/dev/fuse" in r.stderr and "Traceback" not in r.stderr
    assert not mounted_at(mp)
    shutil.rmtree(tmp_path)


@pytest.mark.allow_log("injected", "VixDiskLib_", "read: ")
def test_vddk_failure_is_eio_with_a_hint_and_the_mount_survives(bed: Bed, tmp_path: Path) -> None:
    """VDDK's generic error on a wrong thumbprint: EIO for the reader, one log line with a
    hint, and the rest of the mount keeps working."""
    v = bed.vcsim
    ivd = v.create_ivd("hint", 1, "LocalDS_2")
    snap = v.create_snapshot(ivd, "x")
    src = tmp_path / "img"
    src.write_bytes(b"\x42" * (1 << 20))
    place_image(bed.images, ivd, snap, src)
    mp = tmp_path / "mnt"
    with Mount(bed, mp, VDDK_STANDIN_THUMBPRINT="00:" * 19 + "00") as m:
        disk = mp / ivd.datastore_name / ivd.id / snap / "disk.raw"
        with pytest.raises(OSError) as e:
            disk.read_bytes()
        assert e.value.errno == errno.EIO
        assert (mp / ivd.datastore_name).is_dir()
        assert m.unmount() == 0
    log = m.log()
    assert "VixDiskLib_ConnectEx" in log and "hint:" in log and "thumbprint" in log
    assert "Traceback" not in log


def test_a_failed_snapshot_task_is_exit_11(bed: Bed, tmp_path: Path) -> None:
    """vCenter fails the --snapshot-now task: exit 11 with vCenter's reason in one line, and
    nothing left: no mount, no journal, no snapshot, the access ended (the fixture)."""
    v = bed.vcsim
    ivd = v.create_ivd("refused-snapshot", 1, "LocalDS_2")
    mp = tmp_path / "mnt"
    mp.mkdir()
    for how in ([], ["-f"]):
        with v.failing("createSnapshot"):
            r = run_mount(bed.mount_args(mp, *how, "--snapshot-now", ivd.id), bed.env())
        assert r.returncode == 11, r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ivdfs:")]
        assert len(errors) == 1 and "--snapshot-now" in errors[0] and "failed" in errors[0]
        assert "Traceback" not in r.stderr
        assert not mounted_at(mp) and journal.find(mp) is None
        assert v.snapshots(ivd) == []
