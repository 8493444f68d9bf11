"""Shared fixtures. A missing prerequisite fails the run: nothing here ever skips, except the
real-VDDK tier (tests marked `real_vddk`) when IVDFS_TEST_VDDK names no VDDK: VMware's library
is proprietary and not installable by scripts/setup (tests/realvddk.py)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import mounting, realvddk
from tests.mounting import VDDK_LIBDIR, Bed
from tests.testbed.vsphere import LAUNCHER, TESTBED, Vcsim


@pytest.fixture(scope="session")
def built_testbed() -> None:
    """Build (incrementally) the vcsim launcher and the stand-in libraries."""
    subprocess.run([str(TESTBED / "build.sh")], check=True, stdout=subprocess.DEVNULL)
    missing = [
        str(p) for p in (LAUNCHER, VDDK_LIBDIR / "lib64" / "libvixDiskLib.so.8") if not p.exists()
    ]
    if missing:
        pytest.fail(f"test bed not built: {missing}; run scripts/setup")
    for tool in ("fusermount3", "openssl"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing; run scripts/setup")
    if realvddk.vddk_dir() is not None and (gone := realvddk.missing_pieces()):
        pytest.fail(f"{realvddk.ENV} is set but the real-VDDK tier is not built: {gone}")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.fail("/dev/fuse is not usable; the tests mount for real and need it")
    # FUSE connections' knobs (ivdfs raises max_background; tests abort connections) live in
    # fusectl, which systemd mounts at boot but containers often lack.
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        if not any(" - fusectl " in ln for ln in f):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"],
                           check=True)  # fmt: skip


@pytest.fixture(scope="module")
def vcsim(built_testbed: None) -> Iterator[Vcsim]:
    with Vcsim() as v:
        yield v


@pytest.fixture(scope="module")
def bed(vcsim: Vcsim, tmp_path_factory: pytest.TempPathFactory) -> Bed:
    root = tmp_path_factory.mktemp("bed")
    (root / "images").mkdir()
    return Bed(vcsim, root)


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    mp = tmp_path / "mnt"
    mp.mkdir()
    return mp


# --- Checks every test gets, so no test can forget them (issue 16; s3ql's pytest_checklogs) --


def _allowed(request: pytest.FixtureRequest) -> list[re.Pattern[str]]:
    marker = request.node.get_closest_marker("allow_log")
    return [re.compile(p) for p in (marker.args if marker else ())]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def checklogs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail on any WARNING or worse that the test did not declare with
    @pytest.mark.allow_log(regex, ...): in this process, and in the log of every ivdfs mount
    the test started (tests.mounting.Mount)."""
    handler = _Records()
    root = logging.getLogger()
    root.addHandler(handler)
    mounting.STARTED.clear()
    try:
        yield
    finally:
        root.removeHandler(handler)
    if request.node.rep_call_failed:
        return  # the test's own failure says more
    allowed = _allowed(request)

    def unexpected(text: str) -> bool:
        return not any(p.search(text) for p in allowed)

    bad = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in handler.records]
    bad = [b for b in bad if unexpected(b)]
    for m in mounting.STARTED:
        bad += [ln for ln in m.log().splitlines() if mounting.is_warning(ln) and unexpected(ln)]
    assert not bad, "unexpected log records (declare them with @pytest.mark.allow_log):\n" + (
        "\n".join(bad)
    )


@pytest.fixture(autouse=True)
def standin_log_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that uses a test bed leaves each bed's stand-in VDDK log clean: no rule
    violation, every PrepareForAccess ended, every connection and handle closed (by a
    recovery, for a killed mount: @pytest.mark.killed_mount relaxes nothing else). Beds the
    test builds itself are checked as well as fixtures' (mounting.BEDS); a bed that a mount
    of this test used must have a log (mounting.LogMarks)."""
    if "bed" in request.fixturenames:
        request.getfixturevalue("bed")  # made before the marks, so its log is marked too
    marks = mounting.LogMarks()
    try:
        yield
        if not request.node.rep_call_failed:
            marks.check(killed=request.node.get_closest_marker("killed_mount"))
    finally:
        marks.close()


# Outcomes of the real-VDDK tier's tests that ran (not skipped), for the summary line.
_REAL_VDDK_RAN: dict[str, str] = {}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.rep_call_failed = rep.failed  # type: ignore[attr-defined]
    elif rep.when == "setup":
        item.rep_call_failed = rep.failed  # type: ignore[attr-defined]
    # A tier test ran once its call did; any failing phase makes it failed.
    if item.get_closest_marker("real_vddk") and (rep.failed or rep.when == "call"):
        if rep.failed or item.nodeid not in _REAL_VDDK_RAN:
            _REAL_VDDK_RAN[item.nodeid] = rep.outcome
    return rep


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Without IVDFS_TEST_VDDK the tier's tests are skipped, all from this one line, so that
    `-ra` folds them into one line of the summary that says why."""
    if item.get_closest_marker("real_vddk") and realvddk.vddk_dir() is None:
        pytest.skip(realvddk.SKIP_REASON)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line on the real-VDDK tier: how many of its tests ran against which VDDK."""
    vddk = realvddk.vddk_dir()
    if vddk is None:
        terminalreporter.write_line(f"real-VDDK tier: skipped ({realvddk.ENV} unset)")
        return
    try:
        lib = str(realvddk.real_library(vddk).resolve())
    except FileNotFoundError as e:
        lib = str(e)
    outcomes = list(_REAL_VDDK_RAN.values())
    counts = ", ".join(f"{outcomes.count(o)} {o}" for o in ("passed", "failed") if o in outcomes)
    terminalreporter.write_line(
        f"real-VDDK tier: {len(outcomes)} tests ran against {lib}"
        + (f" ({counts})" if counts else "")
    )


_MOUNT_FIXTURES = {"bed", "vcsim", "built_testbed", "mountpoint"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that need root, /dev/fuse and the test bed, so `pytest -m "not mount"`
    runs the rest anywhere (scripts/test runs everything)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _MOUNT_FIXTURES or item.module.__name__.split(".")[-1].startswith("t4_"):  # type: ignore[attr-defined]
            item.add_marker(pytest.mark.mount)
