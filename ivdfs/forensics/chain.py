"""The audit log's format: hash-chained JSON lines, and their verification.

Format (version 1): one JSON object per line, ASCII, ending in "\\n". Every line has
`n` (its line number, from 1), `prev`, `time` (UTC, ISO 8601 with microseconds and "Z"),
`event`, the event's fields, and last `hash`: the lowercase hex SHA-256 of the line's bytes
without that member, that is of everything before `,"hash":` followed by `}`. `prev` is the
previous line's `hash`; line 1 has the SHA-256 of the empty string (GENESIS). So a changed
byte shows in the line's own hash (or, if that was recomputed, in the next line's `prev`), a
removed, added or reordered line in `n` and `prev`. What a chain alone cannot show is lines cut
off at the end, or an audit log rewritten from the start with every hash recomputed: for that,
note the head (`ivdfs audit verify` prints it, the mount log has it at unmount) and check
against it later with `--head`.

Events: `start` and `stop` of a mount (server, user, certificate thumbprint, ivdfs version);
`open` (path relative to the mount root, handle, the caller's uid, gid, pid, thread id and
process name, from the FUSE request and /proc at the open); `read` (the byte ranges of a file
served to one open since its last record, coalesced, [start, end) pairs in the file's own
offsets); `close` (the rest of its ranges, and the total); `hash` (evidence hashes of a file
whose bytes one open read in order). `ivdfs.forensics.writer` writes them.

Pure functions over bytes and files; any thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FORMAT = 1
GENESIS = hashlib.sha256(b"").hexdigest()
_HASH_SUFFIX = re.compile(rb',"hash":"([0-9a-f]{64})"\}$')


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def seal(n: int, prev: str, event: dict[str, Any]) -> tuple[bytes, str]:
    """Line `n` (with its newline) and its hash."""
    text = json.dumps({"n": n, "prev": prev, **event}, ensure_ascii=True, separators=(",", ":"))
    body = text.encode("ascii")
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}\n', digest


class ChainBroken(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


def _raw_lines(path: Path) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        yield from f


def check_line(raw: bytes, n: int, prev: str) -> tuple[dict[str, Any], str]:
    """The event of line `n` and its hash; ChainBroken if it is not what follows `prev`."""
    if not raw.endswith(b"\n"):
        raise ChainBroken(n, "incomplete (no newline at the end): a write was cut short")
    line = raw[:-1]
    m = _HASH_SUFFIX.search(line)
    if m is None:
        raise ChainBroken(n, 'no "hash" at the end of the line: not an ivdfs audit line')
    body = line[: m.start()] + b"}"
    digest = m.group(1).decode()
    if hashlib.sha256(body).hexdigest() != digest:
        raise ChainBroken(n, "its content does not match its hash: the line was changed")
    try:
        doc = json.loads(body)
    except ValueError:
        raise ChainBroken(n, "not a JSON object") from None
    if not isinstance(doc, dict) or "hash" in doc:
        raise ChainBroken(n, "not an ivdfs audit line")
    if doc.get("n") != n:
        raise ChainBroken(
            n,
            f"numbered {doc.get('n')!r}, expected {n}: lines were removed, added or reordered",
        )
    if doc.get("prev") != prev:
        raise ChainBroken(
            n,
            "does not follow the line before it (prev is not its hash): a line before it "
            "was changed, removed, added or reordered",
        )
    return doc, digest


@dataclass(frozen=True)
class Head:
    lines: int
    hash: str  # of the last line; GENESIS for an empty audit log


def verify(
    path: Path, visit: Callable[[dict[str, Any]], None] | None = None, head: str | None = None
) -> Head:
    """Check every line of the audit log at `path`; ChainBroken names the first bad one. With
    `head` (a hash noted earlier), that line must still be there."""
    n, prev = 0, GENESIS
    seen_head = head is None
    for raw in _raw_lines(path):
        doc, prev = check_line(raw, n + 1, prev)
        n += 1
        if prev == head:
            seen_head = True
        if visit is not None:
            visit(doc)
    if not seen_head:
        raise ChainBroken(
            n + 1,
            f"no line has the recorded head {head}: lines were removed from the end, or the "
            "audit log was rewritten",
        )
    return Head(n, prev)
