"""Shell completion (bash, zsh) and the man page, generated from ivdfs's own argument parser.

The files live in share/ and are installed by `pip install` (pyproject's data-files); this
generator writes them (`scripts/generate-docs`), and tests/t1_docs.py fails when they no longer
match the parser. shtab and argparse-manpage are test extras: nothing at run time needs them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# argparse wraps help to the terminal's width: fix it, so the output does not depend on it.
os.environ["COLUMNS"] = "100"

import shtab
from argparse_manpage.manpage import Manpage

from ivdfs import __version__
from ivdfs.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
# Fixed, so the output only changes when the parser does.
MAN_DATE = "2026-12-01"

FILES = {
    "share/bash-completion/completions/ivdfs": lambda: shtab.complete(build_parser(), "bash"),
    "share/zsh/site-functions/_ivdfs": lambda: shtab.complete(build_parser(), "zsh"),
    "share/man/man1/ivdfs.1": lambda: str(
        Manpage(
            build_parser(),
            _data={
                "date": MAN_DATE,
                "project_name": "ivdfs",
                "version": __version__,
                "manual_title": "ivdfs manual",
                "description": "read-only FUSE filesystem for vSphere IVD snapshots",
            },
        )
    ),
}


def generate() -> dict[str, str]:
    return {name: make() for name, make in FILES.items()}


def main() -> int:
    for name, text in generate().items():
        path = REPO / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if text.endswith("\n") else text + "\n")
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
