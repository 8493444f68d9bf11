"""The forensic building blocks without a mount: in-order hashing of reordered reads, byte
ranges, and the hash-chained audit journal (tampering, continuation, refusals, fail closed)."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import random
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivdfs.commands import audit as audit_command
from ivdfs.commands.audit import Summary
from ivdfs.errors import UserError
from ivdfs.forensics.access import Caller, RangeSet
from ivdfs.forensics.chain import GENESIS, ChainBroken, seal, verify
from ivdfs.forensics.hashing import MAX_GAP, Digester, InOrder, SequentialHash
from ivdfs.forensics.writer import AuditLog

KiB = 1024
MiB = 1 << 20


def reads_of(size: int, rng: random.Random, piece: int) -> list[tuple[int, int]]:
    """A sequential reader's requests as a FUSE daemon may see them: in pieces, neighbours
    swapped, some repeated, some overlapping the one before."""
    reqs = [(o, min(piece, size - o)) for o in range(0, size, piece)]
    for i in range(0, len(reqs) - 1, 3):
        if rng.random() < 0.5:
            reqs[i], reqs[i + 1] = reqs[i + 1], reqs[i]
    out: list[tuple[int, int]] = []
    for off, n in reqs:
        out.append((off, n))
        if rng.random() < 0.2:
            out.append((max(0, off - piece // 2), n))  # overlaps what came before
        if rng.random() < 0.1:
            out.append((off, n))  # repeated
    return out


@pytest.mark.parametrize("seed", range(8))
def test_in_order_hashes_each_byte_once_whatever_the_arrival_order(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.randrange(1, 3 * MiB)
    data = rng.randbytes(size)
    h = SequentialHash(size)
    covered = RangeSet()
    for off, n in reads_of(size, rng, rng.choice([4 * KiB, 128 * KiB, 1 * MiB])):
        h.feed(off, memoryview(data)[off : off + n])
        covered.add(off, off + n)
        assert h.complete == (covered.pairs() == [[0, size]])
    assert h.complete and not h.abandoned
    d = h.result()
    assert d.sha256 == hashlib.sha256(data).hexdigest()
    assert d.md5 == hashlib.md5(data).hexdigest()
    assert d.size == size


def test_in_order_gives_up_on_jumps_and_never_claims_a_partial_file() -> None:
    got = bytearray()
    size = 64 * MiB
    o = InOrder(size, lambda v: got.extend(v))
    o.add(0, bytes(MiB))
    o.add(MiB + MAX_GAP + 1, bytes(10))  # a random reader's jump
    assert o.abandoned and not o.complete
    o.add(MiB, bytes(MiB))
    assert len(got) == MiB  # nothing more after giving up

    # Too much held back waiting for a gap that never fills.
    o = InOrder(size, lambda v: None, max_gap=MAX_GAP, max_pending=2 * MiB)
    for i in range(1, 4):
        o.add(i * MiB, bytes(MiB))
    assert o.abandoned

    # A reader that stops early: never complete, so never a hash.
    h = SequentialHash(3 * MiB)
    h.feed(0, bytes(2 * MiB))
    assert not h.complete and not h.abandoned
    h.cancel()


def test_digester_matches_hashlib_and_applies_back_pressure() -> None:
    rng = random.Random(5)
    chunks = [rng.randbytes(rng.randrange(1, 300 * KiB)) for _ in range(200)]
    d = Digester()
    for c in chunks:
        d.update(c)
        d.wait_below(MiB)
        assert d.backlog <= MiB  # only the pool takes from it now
    whole = b"".join(chunks)
    assert d.result() == {
        "sha256": hashlib.sha256(whole).hexdigest(),
        "md5": hashlib.md5(whole).hexdigest(),
    }
    cancelled = Digester()
    cancelled.update(bytes(MiB))
    cancelled.cancel()
    with pytest.raises(RuntimeError):
        cancelled.result()


def test_range_set_coalesces() -> None:
    r = RangeSet()
    for s, e in [(10, 20), (30, 40), (20, 30), (5, 6), (100, 200), (150, 160), (0, 5), (6, 7)]:
        r.add(s, e)
    assert r.pairs() == [[0, 7], [10, 40], [100, 200]]
    assert r.bytes == 7 + 30 + 100
    r.add(7, 10)
    assert r.pairs() == [[0, 40], [100, 200]]
    r.add(50, 50)
    assert r.take() == [[0, 40], [100, 200]] and len(r) == 0


def test_caller_from_proc() -> None:
    me = Caller.of(os.getuid(), os.getgid(), os.getpid())
    assert me.pid == os.getpid()
    assert me.comm == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert Caller.of(0, 0, 0) == Caller(0, 0, 0, 0, "")


# --- the journal -----------------------------------------------------------------------------


def write_journal(path: Path, opens: int = 3) -> list[bytes]:
    log = AuditLog.open(path)
    log.start(server="vc:443", user="u", thumbprint="AA:BB", mountpoint="/mnt")
    me = Caller.of(os.getuid(), os.getgid(), os.getpid())
    for fh in range(1, opens + 1):
        access, ticket = log.opened(fh, f"DS/ivd/snap/part{fh}.raw", me)
        ticket.wait()
        log.read(access, 0, 4096)
        log.read(access, 4096, 4096)
        log.read(access, MiB, 10)
        log.closed(access)
    log.close(reason="unmounted")
    return path.read_bytes().splitlines(keepends=True)


def test_journal_lines_chain_and_summarise(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_journal(path)
    docs = [json.loads(line) for line in lines]
    assert [d["n"] for d in docs] == list(range(1, len(docs) + 1))
    assert docs[0]["prev"] == GENESIS == hashlib.sha256(b"").hexdigest()
    assert [d["event"] for d in docs] == ["start"] + ["open", "close"] * 3 + ["stop"]
    for prev, line in itertools.pairwise(lines):
        # The documented rule: prev is the SHA-256 of the previous line minus its hash member.
        body = prev.rstrip(b"\n").rsplit(b',"hash":', 1)[0] + b"}"
        assert json.loads(line)["prev"] == hashlib.sha256(body).hexdigest()
    close = docs[2]
    assert close["ranges"] == [[0, 8192], [MiB, MiB + 10]] and close["bytes"] == 8202
    assert close["pid"] == os.getpid() and close["path"] == "DS/ivd/snap/part1.raw"
    assert docs[-1]["reason"] == "unmounted"
    summary = Summary()
    head = verify(path, summary.visit)
    assert head.lines == len(lines) and head.hash == docs[-1]["hash"]
    assert len(summary.sessions) == 1 and summary.sessions[0]["stop"] is not None
    reader = summary.readers[("DS/ivd/snap/part2.raw", os.getuid(), os.getpid())]
    assert reader.opens == 1 and reader.ranges.bytes == 8202
    assert os.stat(path).st_mode & 0o777 == 0o600


def tampered(lines: list[bytes]) -> Iterator[tuple[str, int, list[bytes]]]:
    """(what, first line that must be reported, the journal's lines after it)."""
    for i in range(len(lines)):
        doc = lines[i].decode()
        edited = doc.replace('"time":"2', '"time":"1', 1)
        assert edited != doc
        yield "edit", i + 1, [*lines[:i], edited.encode(), *lines[i + 1 :]]
        if i < len(lines) - 1:
            yield "delete", i + 1, lines[:i] + lines[i + 1 :]
            yield "swap", i + 1, [*lines[:i], lines[i + 1], lines[i], *lines[i + 2 :]]


def test_any_edit_deletion_or_swap_breaks_the_chain_at_that_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_journal(path)
    head = verify(path).hash
    bad = tmp_path / "bad.jsonl"
    checked = 0
    for what, line_no, changed in tampered(lines):
        bad.write_bytes(b"".join(changed))
        with pytest.raises(ChainBroken) as e:
            verify(bad)
        assert e.value.line == line_no, (what, line_no, str(e.value))
        checked += 1
    assert checked == 3 * len(lines) - 2
    # An edit whose hash was recomputed shows at the next line.
    doc = json.loads(lines[3])
    doc["ranges"] = [[0, 1]]
    doc.pop("hash")
    n, prev = doc.pop("n"), doc.pop("prev")
    forged, _ = seal(n, prev, doc)
    bad.write_bytes(b"".join([*lines[:3], forged, *lines[4:]]))
    with pytest.raises(ChainBroken) as e:
        verify(bad)
    assert e.value.line == 5 and "before it" in e.value.reason
    # Cutting off the end is invisible to the chain alone, not to the noted head.
    bad.write_bytes(b"".join(lines[:-1]))
    assert verify(bad).lines == len(lines) - 1
    with pytest.raises(ChainBroken) as e:
        verify(bad, head=head)
    assert "recorded head" in e.value.reason
    assert verify(path, head=head).lines == len(lines)
    # A write cut short.
    bad.write_bytes(b"".join(lines)[:-5])
    with pytest.raises(ChainBroken) as e:
        verify(bad)
    assert e.value.line == len(lines)


def test_journal_is_continued_after_checking_and_refused_when_damaged(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = write_journal(path, opens=1)
    second = write_journal(path, opens=2)
    assert second[: len(first)] == first
    docs = [json.loads(line) for line in second]
    assert docs[len(first)]["event"] == "start" and docs[len(first)]["n"] == len(first) + 1
    assert docs[len(first)]["prev"] == json.loads(first[-1])["hash"]
    assert verify(path).lines == len(second)
    summary = Summary()
    verify(path, summary.visit)
    assert len(summary.sessions) == 2
    path.write_bytes(b"".join(second[:2] + second[3:]))
    with pytest.raises(UserError) as e:
        AuditLog.open(path)
    assert "damaged at line 3" in str(e.value)
    assert path.read_bytes() == b"".join(second[:2] + second[3:])  # untouched


def test_journal_refuses_links_other_files_and_a_second_writer(tmp_path: Path) -> None:
    target = tmp_path / "real.jsonl"
    target.write_bytes(b"")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with pytest.raises(UserError, match="symbolic link"):
        AuditLog.open(link)
    with pytest.raises(UserError, match="not a regular file"):
        os.mkfifo(tmp_path / "fifo")
        AuditLog.open(tmp_path / "fifo")
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_bytes(b"")
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UserError, match="owned by uid 65534"):
        AuditLog.open(theirs)
    with pytest.raises(UserError, match="inside the mountpoint"):
        AuditLog.open(tmp_path / "mnt" / "a.jsonl", not_under=tmp_path / "mnt")
    log = AuditLog.open(target)
    try:
        with pytest.raises(UserError, match="in use by another process"):
            AuditLog.open(target)
    finally:
        log.close()
    assert target.read_bytes() == b""  # never started: no stop record either


@pytest.mark.allow_log(r"audit log .* cannot write .*fail closed")
def test_a_failed_write_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.open(path)
    log.start(server="vc:443", user="u", thumbprint="AA", mountpoint="/mnt")
    size = path.stat().st_size
    me = Caller.of(os.getuid(), os.getgid(), os.getpid())
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, old_limit[1]))
    try:
        _, ticket = log.opened(1, "DS/x/y/disk.raw", me)
        with pytest.raises(OSError) as e:
            ticket.wait()
        assert e.value.errno == errno.EIO
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    with pytest.raises(OSError) as e:
        log.check()
    assert e.value.errno == errno.EIO
    log.close()
    # What was written before the failure still verifies up to the torn line.
    with pytest.raises(ChainBroken) as broken:
        verify(path)
    assert broken.value.line == 2 and "cut short" in broken.value.reason


def test_verify_refuses_what_is_not_a_journal_and_names_lines_it_cannot_summarise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An empty file (or /dev/null) vouches for nothing: not "intact, 0 lines".
    assert audit_command.verify(Path("/dev/null"), None, False) == audit_command.BROKEN
    assert "not an ivdfs audit log (empty)" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    assert audit_command.verify(empty, None, True) == audit_command.BROKEN
    # Intact lines this version cannot summarise are counted and named, not skipped silently.
    path = tmp_path / "odd.jsonl"
    lines = write_journal(path)
    prev = json.loads(lines[-1])["hash"]
    odd, _ = seal(len(lines) + 1, prev, {"event": "open", "fh": "not-a-number", "uid": []})
    with open(path, "ab") as f:
        f.write(odd)
    assert audit_command.verify(path, None, True) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["unsummarised_lines"] == [len(lines) + 1]
    assert f"lines {len(lines) + 1}" in out.err and "left out of the summary" in out.err
