"""A password never shows when what holds it is printed, formatted or logged (issue 16)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ivdfs import settings
from ivdfs.config import MountConfig, Secret, ServerConfig
from ivdfs.vddk.connection import ServerTarget

PASSWORD = "hunter2-\u00e9-secret"


def holders() -> list[object]:
    secret = Secret(PASSWORD)
    server = ServerConfig("vc.example.com", 443, "backup@vsphere.local", secret)
    return [
        secret,
        server,
        MountConfig.of(
            {**settings.defaults("mount"), "vddk_libdir": Path("/opt/vddk")},
            server,
            Path("/mnt/ivdfs"),
        ),
        ServerTarget("vc.example.com", 443, "backup@vsphere.local", secret, "AA:BB"),
    ]


def test_repr_str_and_format_hide_the_password() -> None:
    for obj in holders():
        for text in (repr(obj), str(obj), f"{obj}", f"{obj!r}", "%s" % (obj,), "%r" % (obj,)):  # noqa: UP031
            assert PASSWORD not in text, type(obj).__name__
    assert Secret(PASSWORD).reveal() == PASSWORD
    assert Secret(PASSWORD) == Secret(PASSWORD) and Secret(PASSWORD) != Secret("other")


def test_a_logged_config_hides_the_password(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        for obj in holders():
            logging.getLogger("ivdfs.test").debug("config: %s %r", obj, obj)
    assert len(caplog.records) == len(holders())
    assert PASSWORD not in caplog.text
