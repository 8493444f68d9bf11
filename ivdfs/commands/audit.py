"""`ivdfs audit verify FILE`: check an --audit-log audit log and summarise who read what.

Exit 0: every line is intact and in its place (and the noted head is there, with --head);
1: the chain is broken, and stderr names the first bad line; 3: the file cannot be read.
Main thread only.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ivdfs.commands.common import human_size, table
from ivdfs.errors import ExitCode, UserError
from ivdfs.forensics.access import RangeSet
from ivdfs.forensics.chain import ChainBroken
from ivdfs.forensics.chain import verify as verify_chain

BROKEN = 1


@dataclass
class Reader:
    """What one (path, process) read over an audit log: opens and the bytes' union."""

    path: str
    uid: int
    gid: int
    pid: int
    comm: str
    opens: int = 0
    ranges: RangeSet = field(default_factory=RangeSet)


@dataclass
class Summary:
    """Built line by line by `visit` during `verify`."""

    sessions: list[dict[str, Any]] = field(default_factory=list)
    readers: dict[tuple[str, int, int], Reader] = field(default_factory=dict)
    hashes: list[dict[str, Any]] = field(default_factory=list)
    _opens: dict[tuple[int, int], Reader] = field(default_factory=dict)  # (session, fh)
    # Intact lines of a shape this version cannot summarise: said, never skipped silently.
    unsummarised: list[int] = field(default_factory=list)

    def visit(self, doc: dict[str, Any]) -> None:
        try:
            self._visit(doc)
        except (TypeError, ValueError, AttributeError):
            self.unsummarised.append(int(doc.get("n", 0)))

    def _visit(self, doc: dict[str, Any]) -> None:
        event = doc.get("event")
        session = len(self.sessions)
        if event == "start":
            self.sessions.append({"start": doc, "stop": None})
        elif event == "stop" and self.sessions:
            self.sessions[-1]["stop"] = doc
        elif event == "open":
            key = (str(doc.get("path")), int(doc.get("uid", -1)), int(doc.get("pid", -1)))
            r = self.readers.get(key)
            if r is None:
                r = self.readers[key] = Reader(
                    key[0], key[1], int(doc.get("gid", -1)), key[2], str(doc.get("comm", ""))
                )
            r.opens += 1
            self._opens[(session, int(doc.get("fh", -1)))] = r
        elif event in ("read", "close"):
            r = self._opens.get((session, int(doc.get("fh", -1))))
            if r is not None:
                for start, end in doc.get("ranges", []):
                    r.ranges.add(int(start), int(end))
        elif event == "hash":
            self.hashes.append(doc)


def _reader_doc(r: Reader) -> dict[str, Any]:
    return {
        "path": r.path,
        "uid": r.uid,
        "gid": r.gid,
        "pid": r.pid,
        "comm": r.comm,
        "opens": r.opens,
        "bytes": r.ranges.bytes,
        "ranges": r.ranges.pairs(),
    }


def verify(path: Path, head: str | None, as_json: bool) -> int:
    summary = Summary()
    try:
        end = verify_chain(path, summary.visit, head.lower() if head else None)
    except ChainBroken as e:
        print(f"ivdfs: audit log {path} is broken at {e}", file=sys.stderr)
        return BROKEN
    except OSError as e:
        raise UserError(f"audit log {path}: {e.strerror or e}") from None
    if end.lines == 0 or not summary.sessions:
        # Every audit log starts with a start line (AuditLog.start): an empty file, or lines of
        # ours with no session, is not one; "intact, 0 lines" would vouch for nothing.
        what = "empty" if end.lines == 0 else "no start line"
        print(f"ivdfs: {path} is not an ivdfs audit log ({what})", file=sys.stderr)
        return BROKEN
    if summary.unsummarised:
        lines = ", ".join(str(n) for n in summary.unsummarised[:10])
        more = " ..." if len(summary.unsummarised) > 10 else ""
        print(
            f"ivdfs: {len(summary.unsummarised)} intact lines of a shape this version cannot "
            f"summarise are left out of the summary: lines {lines}{more}",
            file=sys.stderr,
        )
    readers = sorted(summary.readers.values(), key=lambda r: (r.path, r.pid))
    if as_json:
        doc: dict[str, Any] = {
            "file": str(path),
            "lines": end.lines,
            "head": end.hash,
            "sessions": summary.sessions,
            "reads": [_reader_doc(r) for r in readers],
            "hashes": summary.hashes,
            "unsummarised_lines": summary.unsummarised,
        }
        print(json.dumps(doc, indent=2))
        return ExitCode.OK
    print(f"audit log {path}: intact, {end.lines} lines")
    print(f"head: line {end.lines} sha256 {end.hash}")
    print("sessions:")
    for s in summary.sessions:
        start, stop = s["start"], s["stop"]
        print(
            f"  line {start['n']} {start['time']}: {start.get('mountpoint')} from "
            f"{start.get('server')} as {start.get('user')} (certificate SHA-1 "
            f"{start.get('thumbprint')}), ivdfs {start.get('version')} pid {start.get('pid')} "
            f"on {start.get('host')}"
        )
        if stop is None:
            print("    no stop record: still mounted, or the process was killed")
        else:
            print(f"    stopped line {stop['n']} {stop['time']} ({stop.get('reason')})")
    if readers:
        print("reads (bytes: distinct bytes served):")
        rows = [
            [str(r.uid), str(r.pid), r.comm, str(r.opens), human_size(r.ranges.bytes),
             str(len(r.ranges)), r.path]
            for r in readers
        ]  # fmt: skip
        print(table(["UID", "PID", "PROCESS", "OPENS", "BYTES", "RANGES", "FILE"], rows))
    if summary.hashes:
        print("hashes (files one open read whole, in order):")
        for h in summary.hashes:
            print(f"  line {h['n']} {h.get('path')}: sha256 {h.get('sha256')} md5 {h.get('md5')}")
    return ExitCode.OK
