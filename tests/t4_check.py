"""`ivdfs check`: every failure class reported distinctly, with the exit code mount gives."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.mounting import IVDFS, VDDK6_LIBDIR, VDDK_LIBDIR, Bed
from tests.testbed.vsphere import place_image


@pytest.fixture(scope="module")
def snapshot(bed: Bed) -> str:
    ivd = bed.vcsim.create_ivd("checked", 1, "LocalDS_0")
    snap = bed.vcsim.create_snapshot(ivd, "for check")
    src = bed.root / "img"
    src.write_bytes(b"\x17" * (1 << 20))
    place_image(bed.images, ivd, snap, src)
    return snap


def check(bed: Bed, *changes: str, drop_ca: bool = False, libdir: Path | None = VDDK_LIBDIR,
          **env: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
    v = bed.vcsim
    args = [*IVDFS, "check", "--server", v.server, "--user", v.user]
    if not drop_ca:
        args += ["--ca-file", str(v.ca_file)]
    if libdir is not None:
        args += ["--vddk-libdir", str(libdir)]
    return subprocess.run([*args, *changes], env=bed.env(**env), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)  # fmt: skip


def step(r: subprocess.CompletedProcess[str], name: str) -> str:
    line = next(ln for ln in r.stdout.splitlines() if ln.split()[1:2] == [name])
    return line.split()[0]


def test_all_good(bed: Bed, snapshot: str) -> None:
    r = check(bed)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [step(r, s) for s in ("certificate", "login", "vddk", "read")] == ["ok"] * 4
    assert bed.vcsim.thumbprint in r.stdout and "VDDK 8" in r.stdout
    assert snapshot in r.stdout
    assert bed.vcsim.password not in r.stdout + r.stderr


@pytest.mark.parametrize(
    ("kwargs", "code", "failed", "fragment"),
    [
        ({"IVDFS_PASSWORD": "wrong"}, 4, "login", "rejected user"),
        ({"drop_ca": True}, 6, "certificate", "failed verification"),
        ({"drop_ca": True, "changes": ["--thumbprint", "00:" * 19 + "00"]}, 6, "certificate",
         "thumbprint mismatch"),
        ({"libdir": Path("/nonexistent/vddk")}, 7, "vddk", "does not exist"),
        ({"libdir": None}, 7, "vddk", "no VDDK directory"),
        ({"libdir": VDDK6_LIBDIR}, 7, "vddk", "VDDK 6.7 or later"),
        ({"VDDK_STANDIN_THUMBPRINT": "00:" * 19 + "00"}, 7, "read", "hint:"),
        ({"changes": ["--server", "127.0.0.1:1"]}, 5, "certificate", "cannot reach"),
    ],
    ids=["password", "bad-cert", "thumbprint-pin", "vddk-missing", "no-libdir", "vddk-too-old",
         "vddk-connect", "unreachable"],
)  # fmt: skip
def test_each_failure_class(
    bed: Bed, snapshot: str, kwargs: dict[str, object], code: int, failed: str, fragment: str
) -> None:
    kwargs = dict(kwargs)
    changes = kwargs.pop("changes", [])
    r = check(bed, *changes, **kwargs)  # type: ignore[arg-type]
    assert r.returncode == code, r.stdout + r.stderr
    assert step(r, failed) == "FAIL"
    assert fragment in r.stdout and fragment in r.stderr
    assert "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("ivdfs:")] == [
        next(ln for ln in r.stderr.splitlines() if ln.startswith("ivdfs:"))
    ]
    assert bed.vcsim.password not in r.stdout + r.stderr
    if failed == "vddk":
        assert step(r, "login") == "ok" and step(r, "read") == "skip"
