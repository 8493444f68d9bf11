"""The installed shell completion and man page match the argument parser they come from."""

from __future__ import annotations

import re
import subprocess

from tests.generate_docs import REPO, generate


def test_completion_and_man_page_are_current() -> None:
    for name, text in generate().items():
        on_disk = (REPO / name).read_text()
        assert on_disk.rstrip("\n") == text.rstrip("\n"), f"{name} is stale: scripts/generate-docs"


def test_bash_completion_loads_and_knows_the_commands() -> None:
    script = REPO / "share/bash-completion/completions/ivdfs"
    r = subprocess.run(
        ["bash", "-c", f"source {script} && complete -p ivdfs"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0 and "ivdfs" in r.stdout, r.stderr
    text = script.read_text()
    for command in ("mount", "umount", "status", "refresh", "end-access", "--idle-timeout"):
        assert command in text


def test_man_page_renders() -> None:
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(REPO / "share/man/man1/ivdfs.1")],
                       capture_output=True, text=True, check=True)  # fmt: skip
    assert r.stderr == "", r.stderr  # no groff warning
    # Bold and underlined text are overstruck (X backspace X): read the letters only. The
    # synopsis may break an option across lines; the OPTIONS section names each whole.
    text = re.sub(".\b", "", r.stdout).replace("\u2010", "-")
    options = ("--max-connections", "--idle-timeout", "--snapshot-now", "--vcenter-connections",
               "--vcenter-timeout")  # fmt: skip
    assert all(option in text for option in options)
