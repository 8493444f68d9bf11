"""VDDK outside a mount: the library, an IVD's access and a snapshot's disk, each a context
manager, for the commands that read or release something once (check, hash, end-access, the
recovery of a dead mount), as nbdkit keeps VDDK's set-up in one place every entry point calls.

Role: `library` loads and initialises VDDK as `ivdfs mount` does (its --vddk-libdir,
--vddk-config) and ends it with VixDiskLib_Exit; `access` pairs PrepareForAccess with EndAccess
(always, even when Prepare failed: VMware's rule; a failed Prepare only keeps vMotion on, the
snapshot stays readable); `handle` is one read-only ConnectEx + Open, and `disk` the same as
the mount's `OpenDisk` (its I/O thread, ReadAsync), so a command reads through the mount's
reader. `end_access` is EndAccess alone, for an access a dead process left behind. Every
release runs with stop signals held back (`ivdfs.signals.deferred`), so a second Ctrl-C cannot
cut it short, and a failed release is logged (one line), never raised over the error that
ended the block.

Concurrency: main thread only: InitEx, Exit, Open and Close happen on it (VDDK wants InitEx on
the main thread and a handle opened and closed on one thread); an `OpenDisk`'s reads run on its
own I/O thread, from trio.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from ivdfs.config import VddkOptions
from ivdfs.errors import BackendError
from ivdfs.inventory.model import DiskTarget
from ivdfs.settings import default
from ivdfs.signals import deferred
from ivdfs.vddk.connection import Access, DiskHandle, ServerTarget
from ivdfs.vddk.disk import OpenDisk
from ivdfs.vddk.library import VddkLibrary

log = logging.getLogger(__name__)


def load(options: VddkOptions) -> VddkLibrary:
    """The library, initialised (VddkLoadError, VddkPluginError: exit 7). The caller ends it
    with `exit`; `library` does that itself."""
    lib = VddkLibrary(options.libdir)
    lib.init(options.config_file)
    return lib


@contextmanager
def library(options: VddkOptions) -> Iterator[VddkLibrary]:
    lib = load(options)
    try:
        yield lib
    finally:
        with deferred():
            lib.exit()


@contextmanager
def access(
    lib: VddkLibrary, server: ServerTarget, target: DiskTarget, identity: str
) -> Iterator[None]:
    """PrepareForAccess for the IVD while the block runs, EndAccess after it."""
    a = Access(lib, server, target, identity)
    try:
        try:
            a.prepare()
        except BackendError as e:
            # Prepare only keeps vMotion off while we read; the snapshot stays readable.
            log.warning("%s (reading anyway)", e)
        yield
    finally:
        with deferred():
            try:
                a.end()
            except BackendError as e:
                log.warning("EndAccess for %s: %s (ivdfs end-access retries it)",
                            target.ivd_id, e)  # fmt: skip


def end_access(lib: VddkLibrary, server: ServerTarget, target: DiskTarget, identity: str) -> None:
    """EndAccess with no Prepare in this process, for an access a dead process left behind
    (`identity` must be the one it used); VddkError when it fails."""
    with deferred():
        Access(lib, server, target, identity).recover()


@contextmanager
def handle(
    lib: VddkLibrary, server: ServerTarget, target: DiskTarget, transport: str | None
) -> Iterator[DiskHandle]:
    """One read-only ConnectEx + Open of the snapshot, closed after the block."""
    h = DiskHandle(lib, server, target, transport)
    try:
        h.open()
        yield h
    finally:
        with deferred():
            try:
                h.close()
            except BackendError as e:
                log.warning("closing %s: %s", target.describe(), e)


@contextmanager
def disk(
    lib: VddkLibrary, server: ServerTarget, target: DiskTarget, transport: str | None
) -> Iterator[OpenDisk]:
    """The snapshot as the mount opens it, with the mount's default ReadAsync bound and block
    size; its reads (from trio) end before its handle closes."""
    with handle(lib, server, target, transport) as h:
        opened = OpenDisk([h], lib.has_async, default("max_in_flight"), default("block_size"))
        try:
            yield opened
        finally:
            opened.closed = True
            with deferred():
                opened.stop_io()
