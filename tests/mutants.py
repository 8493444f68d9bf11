"""The mutants of scripts/mutate: one realistic bug each, and the tests that must catch it.

A mutant replaces `old` by `new` in one file; `old` must occur exactly once there (a mutant
whose text moved or changed is reported as stale, never applied somewhere else). `tests` are
pytest node ids, fastest and most likely killers first: the run stops at the first failure.
`why` says what the bug would do to a user, in a few words.

Areas: read path, cache, partitions, vddk, credentials, volumes, vcenter, direct. Not collected
by pytest (no t<N>_ prefix); imported by scripts/mutate only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


# --- test groups: what covers each area, fast files first --------------------------------------

CACHE = ("tests/t2_cache.py", "tests/t2_vddk_readpath.py")
READ = (
    "tests/t2_cache.py",
    "tests/t3_partition_windows.py",
    "tests/t3_operations.py",
    "tests/t4_mount.py::test_size_is_the_disks_own",
)
WINDOWS = ("tests/t3_partition_windows.py", "tests/t4_restore.py::test_partition_windows")
PARTS = ("tests/t1_partitions.py", "tests/t3_partition_windows.py")
HOLES = (
    "tests/t2_vddk_real.py",
    "tests/t2_vddk.py",
    "tests/t4_perf.py::test_holes_read_as_zeros_without_vddk_reads",
    "tests/t4_perf.py::test_data_in_every_allocation_region_reads_as_itself",
    "tests/t4_real_vddk.py::test_a_half_allocated_odd_sized_disk_reads_only_its_data_and_its_tail",
)
MOUNT = ("tests/t4_mount.py",)
ACCESS = (
    "tests/t4_connections.py::test_a_failed_prepare_still_reads_and_still_ends_access",
    "tests/t4_mount.py",
    "tests/t4_errors.py::test_vddk_failure_is_eio_with_a_hint_and_the_mount_survives",
)
ERRORS = (
    "tests/t2_vddk_real.py::test_permanent_errors_are_told_from_transient_ones",
    "tests/t4_connections.py::test_a_read_failing_with_a_permanent_code_is_not_retried",
    "tests/t4_real_vddk.py",
    "tests/t4_faults.py",
)
# Disks that stay busy past MIN_OPEN while others wait: the cap's turns.
TURNS = "tests/t4_lifetime.py::test_more_busy_disks_than_connections_take_turns_without_churn"
SERVICE = (
    "tests/t4_connections.py",
    "tests/t4_perf.py",
    "tests/t4_mount.py",
    "tests/t4_faults.py",
    "tests/t4_restore.py",
)
PASSWORD = (
    "tests/t1_secrets.py",
    "tests/t4_errors.py::test_a_password_file_others_can_reach_is_refused",
    "tests/t4_errors.py::test_bad_input",
    "tests/t4_mount.py::test_password_never_in_argv_or_logs",
    "tests/t4_cli.py::test_log_is_one_line_per_event_without_secrets_or_ceip",
)
ENVIRON = (
    "tests/t4_real_vddk.py::test_children_of_the_daemon_inherit_the_users_environment_not_vddks",
    "tests/t4_mount.py::test_password_never_in_argv_or_logs",
)

# Issue 25 #1: the areas of the last rounds' code, each with its own tests.
LIFETIME = (
    "tests/t2_lifetime_clock.py",
    TURNS,
    "tests/t4_connections.py",
    "tests/t4_lifetime.py",
    "tests/t4_open_failures.py::test_an_open_storm_on_an_unopenable_disk_is_bounded",
)
RECOVERY = ("tests/t1_journal.py", "tests/t4_recover.py", "tests/t4_vixmntapi.py")
GUESTFS_RECOVERY = ("tests/t4_volumes_modes.py::test_guestfs_lifetime_and_recovery",)
CHANGES = ("tests/t4_changes.py",)
LVM = ("tests/t1_lvm.py", "tests/t4_volumes_lvm.py")
KERNEL_VOLUMES = ("tests/t4_volumes.py", "tests/t4_volumes_modes.py::test_matrix[kernel]")
FUSE_VOLUMES = ("tests/t4_volumes_modes.py::test_matrix[fuse]",)
GUESTFS_VOLUMES = ("tests/t4_volumes_modes.py::test_guestfs_matrix",)
VIXMNTAPI = ("tests/t4_vixmntapi.py",)
FORENSICS = ("tests/t1_audit.py", "tests/t4_forensics.py")
SESSION = (
    "tests/t4_inventory.py::test_one_relogin_for_the_whole_pool",
    "tests/t4_inventory.py::test_a_silent_vcenter_costs_one_login_attempt_not_one_per_thread",
    "tests/t4_vcenter.py",
    "tests/t4_outage.py",
)


# fmt: off
MUTANTS: tuple[Mutant, ...] = (
    # --- read path ---------------------------------------------------------------------------
    Mutant(
        "span-drops-partial-last-block", "read path", "ivdfs/io/reader.py",
        "return offset // block_size, (end - 1) // block_size + 1, end",
        "return offset // block_size, end // block_size, end",
        READ, "a read ending inside a block leaves that block out",
    ),
    Mutant(
        "short-last-block-read-whole", "read path", "ivdfs/io/reader.py",
        "return min(self.block_size, self.size - index * self.block_size)",
        "return self.block_size",
        READ, "the last block of a disk that is not a whole number of blocks is read past the end",
    ),
    Mutant(
        "multi-block-read-ignores-end", "read path", "ivdfs/io/reader.py",
        "parts.append(memoryview(blk)[max(offset, base) - base : min(end, base + bs) - base])",
        "parts.append(memoryview(blk)[max(offset, base) - base :])",
        READ, "a read over several blocks returns the whole last block",
    ),
    Mutant(
        "window-not-clipped", "read path", "ivdfs/tree/nodes.py",
        "end = min(offset + length, self.length)\n        return [(self.start + offset,",
        "end = offset + length\n        return [(self.start + offset,",
        WINDOWS, "a read of partN.raw runs on into the next partition",
    ),
    Mutant(
        "window-base-dropped", "read path", "ivdfs/tree/tree.py",
        "return await reader.read(spans[0][0], spans[0][1], f.stream)",
        "return await reader.read(offset, spans[0][1], f.stream)",
        WINDOWS, "partN.raw reads the disk from its start, not from the partition's",
    ),
    Mutant(
        "prefetch-window-uncapped", "read path", "ivdfs/io/reader.py",
        "self.window = min(max(1, 2 * self.window), self.max_window)",
        "self.window = max(1, 2 * self.window)",
        ("tests/t2_vddk_readpath.py", "tests/t4_perf.py"),
        "read-ahead doubles without bound: a long scan floods VDDK and the cache",
    ),
    Mutant(
        "unknown-region-is-a-hole", "read path", "ivdfs/io/reader.py",
        "if not await self.holes.is_allocated(index):",
        "if not self.holes.known(index):",
        HOLES, "blocks of a region not yet queried read as zeros",
    ),
    # --- block cache -------------------------------------------------------------------------
    Mutant(
        "main-counts-alone-against-budget", "cache", "ivdfs/io/block_cache.py",
        "while self._main.currsize + self._scan.currsize + nbytes > self.max_bytes:",
        "while (self._scan if scan else self._main).currsize + nbytes > self.max_bytes:",
        CACHE, "issue 16 #1: each segment may fill the whole budget, the cache holds twice it",
    ),
    Mutant(
        "scan-evicts-only-when-main-empty", "cache", "ivdfs/io/block_cache.py",
        "if self._scan and (self._scan.currsize + (nbytes if scan else 0) > self.scan_reserve\n"
        "                               or not self._main):  # fmt: skip",
        "if self._scan and not self._main:",
        CACHE, "a scan larger than the cache evicts the hot set",
    ),
    Mutant(
        "scan-eviction-keeps-reference", "cache", "ivdfs/io/block_cache.py",
        "key, _ = self._scan.popitem()\n                self._referenced.pop(key, None)\n",
        "key, _ = self._scan.popitem()\n",
        CACHE, "an evicted block's old reference makes its next scan promote it (and leaks)",
    ),
    Mutant(
        "in-flight-recorded-after-read", "cache", "ivdfs/io/block_cache.py",
        "pending = self._inflight[key] = _Pending(prefetch=prefetch)\n        try:\n"
        "            value = await fetch()\n",
        "pending = _Pending(prefetch=prefetch)\n        try:\n"
        "            value = await fetch()\n            self._inflight[key] = pending\n",
        CACHE, "concurrent misses on one block each read it from VDDK",
    ),
    Mutant(
        "every-touch-promotes", "cache", "ivdfs/io/block_cache.py",
        "again = previous is not None and self._clock - previous > self.correlated",
        "again = previous is not None",
        CACHE, "a sequential reader's repeated touches promote every scanned block",
    ),
    Mutant(
        "failed-prefetch-fails-waiters", "cache", "ivdfs/io/block_cache.py",
        "_PrefetchGaveUp() if prefetch and not isinstance(e, trio.Cancelled) else e",
        "e",
        (*CACHE, "tests/t4_faults.py"),
        "a read-ahead failure is reported to a reader that never tried",
    ),
    Mutant(
        "cancelled-reader-poisons-waiters", "cache", "ivdfs/io/block_cache.py",
        "if pending.error is not None and not isinstance(pending.error, trio.Cancelled):",
        "if pending.error is not None:",
        CACHE, "a reader the kernel gave up on fails the others waiting for its block",
    ),
    # --- partitions --------------------------------------------------------------------------
    Mutant(
        "ebr-link-relative-to-ebr", "partitions", "ivdfs/formats/partitions.py",
        "ebr_lba = base + link.start_lba",
        "ebr_lba = ebr_lba + link.start_lba",
        PARTS, "logical partitions after the second are lost or misplaced",
    ),
    Mutant(
        "ebr-data-relative-to-container", "partitions", "ivdfs/formats/partitions.py",
        "start, length = (ebr_lba + e.start_lba) * ss, e.sectors * ss",
        "start, length = (base + e.start_lba) * ss, e.sectors * ss",
        PARTS, "logical partitions after the first point at the wrong bytes",
    ),
    Mutant(
        "gpt-numbers-skip-empty-entries", "partitions", "ivdfs/formats/partitions.py",
        "number = index + 1\n",
        "number = len(parts) + 1\n",
        PARTS, "partN.raw is not /dev/sdaN on a GPT with an empty slot",
    ),
    Mutant(
        "gpt-sectors-always-512", "partitions", "ivdfs/formats/partitions.py",
        "start, length = first * ss, (last - first + 1) * ss",
        "start, length = first * 512, (last - first + 1) * 512",
        PARTS, "a 4Kn GPT disk's partitions point at an eighth of their offsets",
    ),
    Mutant(
        "mbr-sectors-always-512", "partitions", "ivdfs/formats/partitions.py",
        "start, length = e.start_lba * ss, e.sectors * ss",
        "start, length = e.start_lba * 512, e.sectors * 512",
        PARTS, "a 4Kn MBR disk's primary partitions point at the wrong bytes",
    ),
    Mutant(
        "lba-extended-type-unknown", "partitions", "ivdfs/formats/partitions.py",
        "_MBR_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})",
        "_MBR_EXTENDED_TYPES = frozenset({0x05, 0x85})",
        PARTS, "logical partitions in a 0x0F (LBA) extended partition are not listed",
    ),
    # --- VDDK protocol -----------------------------------------------------------------------
    Mutant(
        "no-endaccess-after-failed-prepare", "vddk", "ivdfs/vddk/connection.py",
        "        self._attempted = True\n        self._lib.call(\n"
        '            "VixDiskLib_PrepareForAccess",\n            self._params.ptr,\n'
        "            self._identity,\n            context=self.target.describe(),\n        )\n",
        "        self._lib.call(\n"
        '            "VixDiskLib_PrepareForAccess",\n            self._params.ptr,\n'
        "            self._identity,\n            context=self.target.describe(),\n        )\n"
        "        self._attempted = True\n",
        ACCESS, "issue 16 #2: vMotion stays disabled after a Prepare that failed",
    ),
    Mutant(
        "failed-prepare-forgets-access", "vddk", "ivdfs/vddk/ledger.py",
        'log.warning("%s (reading anyway)", e)',
        "del self._states[target.ivd_id]\n                raise",
        ACCESS, "a failed Prepare fails the open and drops the IVD without EndAccess",
    ),
    Mutant(
        "idle-close-off-the-control-thread", "vddk", "ivdfs/vddk/service.py",
        "await self._control.run(lambda: self._close_blocking(disk, end))",
        "await trio.to_thread.run_sync(lambda: self._close_blocking(disk, end))",
        SERVICE, "VixDiskLib_Close on another thread than Open (VDDK's rule)",
    ),
    Mutant(
        "unmount-close-on-main-thread", "vddk", "ivdfs/vddk/service.py",
        "self._control.run_blocking(lambda: self._close_blocking(disk, True))",
        "self._close_blocking(disk, True)",
        MOUNT, "VixDiskLib_Close at unmount on the main thread, not the Open thread",
    ),
    Mutant(
        "open-not-read-only", "vddk", "ivdfs/vddk/connection.py",
        "        self._flags = _cdefs.VIXDISKLIB_FLAG_OPEN_READ_ONLY | (",
        "        self._flags = 0 | (",
        MOUNT, "the disk is opened for writing",
    ),
    Mutant(
        "connect-not-read-only", "vddk", "ivdfs/vddk/connection.py",
        '"VixDiskLib_ConnectEx",\n            self._params.ptr,\n            b"\\x01",',
        '"VixDiskLib_ConnectEx",\n            self._params.ptr,\n            b"\\x00",',
        MOUNT, "the connection asks for write access",
    ),
    Mutant(
        "query-ignores-chunk-cap", "vddk", "ivdfs/vddk/allocation.py",
        "n = min(stop - pos, MAX_CHUNKS_PER_QUERY * chunk)",
        "n = stop - pos",
        HOLES, "a query over more than 512 Ki chunks, which VDDK refuses",
    ),
    Mutant(
        "allocation-runs-region-relative", "vddk", "ivdfs/io/holes.py",
        "allocated.update(range(lo // bs, (hi - 1) // bs + 1))",
        "allocated.update(range((lo - start) // bs, (hi - 1 - start) // bs + 1))",
        HOLES, "issue 16 #3: allocated blocks beyond the first region read as zeros",
    ),
    Mutant(
        "partial-last-chunk-is-a-hole", "vddk", "ivdfs/vddk/allocation.py",
        "runs = [(tail, end - tail)] if end > tail else []",
        "runs: list[tuple[int, int]] = []",
        HOLES, "the tail of a disk past its last whole chunk reads as zeros",
    ),
    Mutant(
        "refused-login-is-transient", "vddk", "ivdfs/vddk/errors.py",
        "        35,  # VIX_E_AUTHENTICATION_FAIL: wrong user or password\n",
        "",
        ERRORS, "a refused login is retried: a reconnect loop that locks the account",
    ),
    Mutant(
        "permanent-ignores-flag-bits", "vddk", "ivdfs/vddk/errors.py",
        "return code_of(err) in _PERMANENT",
        "return err in _PERMANENT",
        ERRORS, "a permanent code with VDDK's flag bits set counts as transient",
    ),
    Mutant(
        "lost-connection-is-permanent", "vddk", "ivdfs/vddk/errors.py",
        "        3,  # VIX_E_INVALID_ARG: our request is wrong\n",
        "        3,  # VIX_E_INVALID_ARG: our request is wrong\n        36,\n",
        ERRORS, "a dropped NFC connection is never reconnected: reads fail for good",
    ),
    Mutant(
        "permanent-read-error-retried", "vddk", "ivdfs/vddk/service.py",
        "if permanent or attempt == READ_ATTEMPTS:",
        "if attempt == READ_ATTEMPTS:",
        ERRORS, "a read failing with a permanent code reconnects (logs in) again and again",
    ),
    Mutant(
        "connection-cap-off-by-one", "vddk", "ivdfs/vddk/budget.py",
        "if self.connections + n <= self.limits.max_connections:",
        "if self.connections <= self.limits.max_connections:",
        SERVICE, "one NFC connection more than --max-connections",
    ),
    Mutant(
        "busy-disk-closed-before-its-turn", "vddk", "ivdfs/vddk/budget.py",
        "if s.opened_at + lim.min_open <= now:",
        "if True:",
        (TURNS, *SERVICE), "issue 28: under the cap a busy disk gives up its connection at "
        "once: an open (and an NFC session, a login) per few reads",
    ),
    Mutant(
        "access-ends-with-its-connection", "vddk", "ivdfs/vddk/service.py",
        "end = self.limits.legacy or self._access_until(ivd_id) <= self._clock()",
        "end = True",
        (TURNS, *SERVICE), "issue 28: a PrepareForAccess/EndAccess pair (vCenter tasks on "
        "every attached VM) for each connection the cap takes away",
    ),
    Mutant(
        "release-does-not-wake-idle-close", "vddk", "ivdfs/vddk/service.py",
        "        slot.users -= 1\n        slot.last_used = self._clock()\n        self._notify()\n",
        "        slot.users -= 1\n        slot.last_used = self._clock()\n",
        SERVICE, "a disk nobody reads stays open (and Prepared) long past --idle-timeout",
    ),
    # --- credentials -------------------------------------------------------------------------
    Mutant(
        "group-readable-password-file", "credentials", "ivdfs/config.py",
        "if stat.S_IMODE(st.st_mode) & 0o077:",
        "if stat.S_IMODE(st.st_mode) & 0o007:",
        PASSWORD, "issue 16 #4: a 0640/0660 password file is accepted",
    ),
    Mutant(
        "password-left-in-environment", "credentials", "ivdfs/cli.py",
        'value = os.environ.pop("IVDFS_PASSWORD", None)',
        'value = os.environ.get("IVDFS_PASSWORD")',
        ENVIRON, "issue 16 #5: children (ntfs-3g, losetup, mount) inherit IVDFS_PASSWORD",
    ),
    Mutant(
        "password-kept-with-password-file", "credentials", "ivdfs/cli.py",
        '    value = os.environ.pop("IVDFS_PASSWORD", None)\n'
        "    if v.password_file is not None:\n"
        "        return Secret(read_password_file(v.password_file.expanduser()))\n",
        "    if v.password_file is not None:\n"
        "        return Secret(read_password_file(v.password_file.expanduser()))\n"
        '    value = os.environ.pop("IVDFS_PASSWORD", None)\n',
        ENVIRON, "with --password-file, a stray IVDFS_PASSWORD stays for the children",
    ),
    Mutant(
        "secret-repr-shows-value", "credentials", "ivdfs/config.py",
        "return \"Secret('***')\"",
        'return f"Secret({self._value!r})"',
        PASSWORD, "a logged config or traceback shows the password",
    ),
    Mutant(
        "fuse-driver-reads-the-whole-disk", "volumes", "ivdfs/volumes/fuse.py",
        "    if c.number == WHOLE_DISK:\n        return request.disk_path\n",
        "    if c.number == WHOLE_DISK or c.fs == \"ntfs\":\n        return request.disk_path\n",
        ("tests/t4_volumes_modes.py::test_matrix[fuse]",),
        "issue 27: ntfs-3g is handed disk.raw instead of the partition: the volume is missing",
    ),
    Mutant(
        "recovery-leaves-appliances", "volumes", "ivdfs/commands/recover.py",
        "            os.kill(pid, signal.SIGKILL)\n            report.ok(f\"stopped appliance",
        "            report.ok(f\"stopped appliance",
        ("tests/t4_volumes_modes.py::test_guestfs_lifetime_and_recovery",),
        "issue 27: qemu of a killed mount keeps running, holding the dead mount's disk.raw",
    ),
    Mutant(
        "ldm-partition-probed-as-a-filesystem", "volumes", "ivdfs/tree/snapshots.py",
        "        if ldm:\n",
        "        if False:\n",
        ("tests/t4_volumes_guestvol.py::test_kernel_mode_leaves_them_alone",),
        "issue 27: the host mounts a dynamic disk's first volume as if the partition held it",
    ),
    Mutant(
        "volume-key-file-taken-by-any-mode", "volumes", "ivdfs/volumes/setup.py",
        '    if settings.key_file is not None and mode != "guestfs":\n',
        "    if False:\n",
        ("tests/t4_volumes_guestvol.py::test_key_file_refused",),
        "issue 27: --volume-key-file with --volumes kernel is silently ignored",
    ),
    Mutant(
        "md-named-by-its-number", "volumes", "ivdfs/volumes/guestfs_helper.py",
        '            out[md] = f"md-{name}"\n',
        "            pass\n",
        ("tests/t4_volumes_guestvol.py::test_guestfs_md_luks_and_ldm",),
        "issue 27: volumes/md127, a name mdadm picks per boot, instead of the array's own",
    ),
    # --- vCenter: outages and lost replies (issues 25 #6, 28) ---------------------------------
    Mutant(
        "task-start-re-sent", "vcenter", "ivdfs/inventory/session.py",
        "                if not resend:\n",
        "                if False:\n",
        ("tests/t4_outage.py::test_a_lost_reply_to_a_snapshot_task_is_found_not_sent_again",),
        "a snapshot create whose reply was lost is sent again: two snapshots, one deleted",
    ),
    Mutant(
        "stale-listing-waits-for-vcenter", "vcenter", "ivdfs/tree/listing.py",
        "            if self._send is not None:\n",
        "            if False:\n",
        ("tests/t4_outage.py::test_a_frozen_vcenter_stalls_nothing_the_mount_knows",),
        "issue 28: with vCenter stalled, ls and stat of what the mount knows hang",
    ),
    # --- lifetime and the connection cap (issue 25 #1) ---------------------------------------
    Mutant(
        "probe-lingers-the-idle-timeout", "lifetime", "ivdfs/vddk/slots.py",
        "return idle_timeout if self.held else min(PROBE_LINGER, idle_timeout)",
        "return idle_timeout",
        LIFETIME, "a disk opened only to list its partitions keeps its NFC session (and login) "
        "for the whole --idle-timeout: a listing of many snapshots holds the cap for a minute",
    ),
    Mutant(
        "probe-keeps-access-the-idle-timeout", "lifetime", "ivdfs/vddk/slots.py",
        "return idle_timeout if self.ever_held else min(PROBE_LINGER, idle_timeout)",
        "return idle_timeout",
        LIFETIME, "after a listing every IVD stays prepared (vMotion blocked on its VMs) for "
        "--idle-timeout instead of seconds",
    ),
    Mutant(
        "hold-does-not-mark-held", "lifetime", "ivdfs/vddk/service.py",
        "slot.held = slot.ever_held = True",
        "slot.ever_held = True",
        LIFETIME, "a file opened after its disk was probed counts as a probe: closing the file "
        "closes the disk after seconds, not --idle-timeout, and the next read reopens it",
    ),
    Mutant(
        "release-keeps-the-old-time", "lifetime", "ivdfs/vddk/service.py",
        "        slot.users -= 1\n        slot.last_used = self._clock()\n",
        "        slot.users -= 1\n",
        LIFETIME, "a disk read long ago and just closed by its last reader is closed at once, "
        "not --idle-timeout after the close",
    ),
    Mutant(
        "idle-close-of-a-held-disk", "lifetime", "ivdfs/vddk/service.py",
        "if not slot.closable or slot.in_use:\n",
        "if not slot.closable:\n",
        LIFETIME, "a disk with a file open on it is closed after --idle-timeout without reads, "
        "and reopened (a login, a PrepareForAccess) at the next read",
    ),
    Mutant(
        "reaper-forgets-the-next-due", "lifetime", "ivdfs/vddk/service.py",
        "                    due = min(due, slot.last_used + linger)\n",
        "                    pass\n",
        LIFETIME, "an idle disk nothing else wakes the service for stays open for an hour",
    ),
    Mutant(
        "opened-ivd-not-reaped", "lifetime", "ivdfs/vddk/service.py",
        "                self.ledger.prepared.add(target.ivd_id)\n",
        "                pass\n",
        LIFETIME, "an IVD whose disk was closed by the cap stays prepared (vMotion off) until "
        "the unmount",
    ),
    Mutant(
        "access-ignores-holders", "lifetime", "ivdfs/vddk/slots.py",
        "return self.disk is not None or self.opening is not None or bool(self.users)",
        "return self.disk is not None or self.opening is not None",
        LIFETIME, "an IVD with a file open whose disk gave up its connection to the cap gets "
        "EndAccess, and PrepareForAccess again at its next turn: tasks on every VM per turn",
    ),
    Mutant(
        "access-ends-with-the-first-snapshot", "lifetime", "ivdfs/vddk/ledger.py",
        "until = max(until, s.last_used",
        "until = min(until, s.last_used",
        LIFETIME, "an IVD is ended as soon as any of its snapshots idles out, though another "
        "snapshot of it is in use: EndAccess and PrepareForAccess again and again",
    ),
    Mutant(
        "eviction-takes-the-most-recent", "lifetime", "ivdfs/vddk/budget.py",
        "return min(group, key=lambda s: s.last_used), due",
        "return max(group, key=lambda s: s.last_used), due",
        LIFETIME, "under the cap the disk used last is closed for another, not the least "
        "recently used one: the working set is what gets evicted",
    ),
    Mutant(
        "eviction-prefers-held-disks", "lifetime", "ivdfs/vddk/budget.py",
        "for group in (unheld, unused):",
        "for group in (unused, unheld):",
        LIFETIME, "a disk with a file open is closed for another while a disk nobody holds "
        "stays open",
    ),
    Mutant(
        "gap-between-reads-counts-as-unused", "lifetime", "ivdfs/vddk/budget.py",
        "elif not s.active and s.last_used + lim.in_use_gap <= now:",
        "elif not s.active:",
        LIFETIME, "a disk being read sequentially is closed between two of its reads for a "
        "waiting disk: an open (a login) every few reads",
    ),
    Mutant(
        "turn-goes-to-the-newest", "lifetime", "ivdfs/vddk/budget.py",
        "return min(in_use, key=lambda s: s.opened_at), due",
        "return max(in_use, key=lambda s: s.opened_at), due",
        LIFETIME, "under contention the disk that just got a connection loses it again while "
        "the one open longest keeps it forever: busy disks starve",
    ),
    Mutant(
        "victim-not-drained", "lifetime", "ivdfs/vddk/budget.py",
        "victim.draining = True  # its reads in flight end, then it closes\n",
        "pass  # its reads in flight end, then it closes\n",
        LIFETIME, "a busy disk chosen to make room keeps admitting reads, so it never drains and "
        "the disk waiting for its connection waits as long as anyone reads it",
    ),
    Mutant(
        "queue-jumping", "lifetime", "ivdfs/vddk/budget.py",
        "if self._queue[0] is ticket:",
        "if ticket in self._queue:",
        LIFETIME, "disks waiting for a connection are served in random order, not first come "
        "first served: one may wait indefinitely",
    ),
    Mutant(
        "failure-retry-does-not-grow", "lifetime", "ivdfs/vddk/failures.py",
        "delay = first if previous is None else min(2 * previous.delay, OPEN_RETRY_MAX)",
        "delay = first",
        LIFETIME, "a disk that cannot be opened is tried again every 0.1 s for as long as "
        "anyone asks: a storm of vCenter logins",
    ),
    Mutant(
        "refused-login-retried-soon", "lifetime", "ivdfs/vddk/failures.py",
        "        if code in ACCOUNT_CODES:\n            delay = OPEN_RETRY_MAX\n",
        "",
        LIFETIME, "a refused login is tried again after a second, then two...: failed logins "
        "that lock the service account",
    ),
    Mutant(
        "refused-login-per-disk", "lifetime", "ivdfs/vddk/failures.py",
        "            self._account = slot.failure\n",
        "            pass\n",
        LIFETIME, "after a refused login every other disk tries its own login with the same "
        "bad password: an account lockout",
    ),
    Mutant(
        "failed-block-not-remembered", "lifetime", "ivdfs/vddk/failures.py",
        "        slot.failed_blocks[start_sector] = "
        "(self._clock() + REMEMBER_FAILED_BLOCK, str(error))\n",
        "        pass\n",
        LIFETIME, "a block that failed every attempt is tried again (four attempts, reopens) by "
        "each reader that asks: a scan over a bad region hammers the host",
    ),
    Mutant(
        "failed-block-expiry-inverted", "lifetime", "ivdfs/vddk/failures.py",
        "if self._clock() < failed[0]:",
        "if self._clock() > failed[0]:",
        LIFETIME, "a failed block is read again at once, and once its memory has lapsed it "
        "fails for good without being tried",
    ),
    # --- recovery and the holdings journal (issue 25 #1) --------------------------------------
    Mutant(
        "prepared-not-journaled", "recovery", "ivdfs/vddk/ledger.py",
        "                self._holdings.prepared(target.ivd_id, target.datastore_moref)\n"
        "            self.stats.prepares += 1\n",
        "                pass\n            self.stats.prepares += 1\n",
        RECOVERY, "a killed mount's PrepareForAccess is not in its journal: vMotion stays "
        "blocked on the IVD's VMs and `ivdfs umount` does not end it",
    ),
    Mutant(
        "failed-prepare-not-journaled", "recovery", "ivdfs/vddk/ledger.py",
        "                self._holdings.prepared(target.ivd_id, target.datastore_moref)\n"
        "            self.stats.prepares += 1\n            try:\n"
        "                access.prepare()\n",
        "                pass\n            self.stats.prepares += 1\n            try:\n"
        "                access.prepare()\n                if self._holdings is not None:\n"
        "                    self._holdings.prepared(target.ivd_id, target.datastore_moref)\n",
        RECOVERY, "a Prepare that failed (or a kill during it) is not journaled: `ivdfs umount` "
        "of the killed mount skips the EndAccess VMware requires after every Prepare",
    ),
    Mutant(
        "ended-journaled-before-endaccess", "recovery", "ivdfs/vddk/ledger.py",
        "        self.stats.end_accesses += 1\n        try:\n            state.access.end()\n",
        "        self.stats.end_accesses += 1\n        if self._holdings is not None:\n"
        "            self._holdings.ended(target.ivd_id)\n        try:\n"
        "            state.access.end()\n",
        RECOVERY, "the journal forgets a prepared IVD before its EndAccess: a mount killed "
        "during that call leaves vMotion blocked with nothing to undo it",
    ),
    Mutant(
        "ended-not-journaled", "recovery", "ivdfs/journal.py",
        '        self.drop("prepared", {"ivd": ivd_id})\n',
        "        pass\n",
        RECOVERY, "an IVD's EndAccess is not struck from the journal: a clean unmount leaves a "
        "journal behind and exits non-zero, and `ivdfs umount` ends the access a second time",
    ),
    Mutant(
        "journal-drop-matches-any-field", "recovery", "ivdfs/journal.py",
        "d[kind] = [e for e in d[kind] if not all(e.get(k) == v for k, v in match.items())]",
        "d[kind] = [e for e in d[kind] if not any(e.get(k) == v for k, v in match.items())]",
        RECOVERY, "dropping one snapshot's entry drops every entry of its IVD: a temporary "
        "snapshot or a VixMntapi mount of another snapshot is forgotten, and a kill leaves it",
    ),
    Mutant(
        "journal-forgets-appliances-at-exit", "recovery", "ivdfs/journal.py",
        'HOLDINGS = ("snapshots", "prepared", "run_dirs", "vixmntapi", "appliances")',
        'HOLDINGS = ("snapshots", "prepared", "run_dirs", "vixmntapi")',
        RECOVERY, "a mount that exits with a libguestfs appliance still running removes its "
        "journal: nothing finds that qemu again",
    ),
    Mutant(
        "dead-mount-with-a-reused-pid-alive", "recovery", "ivdfs/journal.py",
        'return process_start(self.pid) == self.doc.get("pid_start")',
        "return process_start(self.pid) is not None",
        RECOVERY, "a dead mount whose pid the system gave to another process counts as alive: "
        "`ivdfs umount` signals that stranger and undoes nothing",
    ),
    Mutant(
        "appliance-pid-without-start-time", "recovery", "ivdfs/commands/recover.py",
        "if pid and start and journal.process_start(int(pid)) == start:",
        "if pid and journal.process_start(int(pid)) is not None:",
        RECOVERY, "recovery SIGKILLs whatever process now has a dead appliance's pid",
    ),
    Mutant(
        "recovery-keeps-journal-despite-failures", "recovery", "ivdfs/commands/recover.py",
        "    if report.failures:\n        return report.code\n",
        "",
        RECOVERY, "a recovery that could not undo everything removes the journal anyway: what "
        "is left (a snapshot, a prepared IVD) is never undone",
    ),
    Mutant(
        "recovery-stops-no-volume-driver", "recovery", "ivdfs/commands/recover.py",
        "            os.kill(pid, signal.SIGKILL)  # a FUSE driver reading a dead mount never "
        "finishes\n",
        "",
        RECOVERY, "ntfs-3g and fusefat of a killed mount keep running, holding its disk.raw",
    ),
    Mutant(
        "recovery-leaves-loops-on-vixmntapi", "recovery", "ivdfs/commands/recover.py",
        "        found.loops += loop_devices_under(path)\n",
        "        pass\n",
        RECOVERY, "loop devices on VixMntapi's disk mounts stay attached after recovery: the "
        "FUSE mount cannot be unmounted",
    ),
    Mutant(
        "recovery-looks-before-the-task-ends", "recovery", "ivdfs/commands/recover.py",
        '            vs.wait_task_ended(s["task"], what, CREATE_TASK_WAIT)\n',
        "",
        RECOVERY, "recovery looks for an interrupted --snapshot-now snapshot before its task "
        "has made it: the snapshot is left on the datastore",
    ),
    Mutant(
        "recovery-deletes-any-new-snapshot", "recovery", "ivdfs/commands/recover.py",
        'matches = [x.id for x in existing if x.description == s["description"]]',
        "matches = [x.id for x in existing]",
        RECOVERY, "recovery deletes the IVD's first snapshot, whoever made it, instead of the "
        "one its interrupted creation made",
    ),
    Mutant(
        "vixmntapi-not-journaled-before-open", "recovery", "ivdfs/volumes/vixmntapi.py",
        '            self.journal.add(JOURNAL_KIND, {**record.key, "name": ivd.id, "fuse": []})\n',
        "            pass\n",
        RECOVERY, "a mount killed during OpenDisks leaves VixMntapi's FUSE mount and server, "
        "which recovery cannot find",
    ),
    Mutant(
        "vixmntapi-mounts-not-journaled", "recovery", "ivdfs/volumes/vixmntapi.py",
        "                self.journal.update(JOURNAL_KIND, record.key, fuse=record.fuse)\n",
        "                pass\n",
        RECOVERY, "VixMntapi's disk mounts are not journaled once made: after a kill, recovery "
        "finds them only if VixMntapi's .info files are still there",
    ),
    Mutant(
        "appliance-not-journaled", "recovery", "ivdfs/volumes/guestfs.py",
        '            self._holdings.add("appliances", {\n',
        '            (lambda *a: None)("appliances", {\n',
        GUESTFS_RECOVERY, "a killed mount's libguestfs appliance (qemu) keeps running",
    ),
    # --- changes/ (issue 25 #1) ----------------------------------------------------------------
    Mutant(
        "touching-changes-not-joined", "changes", "ivdfs/inventory/changes.py",
        "if out and start <= out[-1][0] + out[-1][1]:",
        "if out and start < out[-1][0] + out[-1][1]:",
        CHANGES, "an area split by a page of vCenter's answer shows as two extents "
        "(the .json's extent count is wrong)",
    ),
    Mutant(
        "contained-change-shrinks-its-area", "changes", "ivdfs/inventory/changes.py",
        "out[-1][1] = max(out[-1][1], start + length - out[-1][0])",
        "out[-1][1] = start + length - out[-1][0]",
        CHANGES, "a changed area inside a larger one cuts the larger one short: changed bytes "
        "read as zeros in the .raw",
    ),
    Mutant(
        "read-inside-an-extent-skips-it", "changes", "ivdfs/tree/nodes.py",
        "i = max(0, bisect.bisect_right(self.extents, (offset, 0)) - 1)",
        "i = bisect.bisect_right(self.extents, (offset, 0))",
        CHANGES, "a read of changes/<older>.raw that starts inside a changed extent returns "
        "zeros for it",
    ),
    Mutant(
        "changes-keep-only-the-last-page", "changes", "ivdfs/inventory/vsphere.py",
        "found += [(int(a.start), int(a.length)) for a in info.changedArea or []]",
        "found = [(int(a.start), int(a.length)) for a in info.changedArea or []]",
        CHANGES, "only the last piece of vCenter's answer is kept: changes in the first part "
        "of a large disk are missing",
    ),
    Mutant(
        "changes-of-the-older-snapshot", "changes", "ivdfs/inventory/vsphere.py",
        "return self.changed_areas(ivd, newer_id, change_id)",
        "return self.changed_areas(ivd, older_id, change_id)",
        CHANGES, "the changes are asked of the older snapshot since itself: always none",
    ),
    Mutant(
        "newer-snapshots-listed-as-older", "changes", "ivdfs/tree/changes.py",
        "and creation_order(c.disk.snapshot) < newer",
        "and creation_order(c.disk.snapshot) != newer",
        CHANGES, "changes/ lists snapshots taken after this one, which vCenter refuses to "
        "compare",
    ),
    Mutant(
        "refusal-reads-as-no-changes", "changes", "ivdfs/tree/changes.py",
        "            raise BackendError(f\"{pair.where()}: {pair.refusal}\", quiet=quiet)\n",
        "            return\n",
        CHANGES, "with tracking off, changes/<older>.raw reads as all zeros: 'nothing changed'",
    ),
    Mutant(
        "failure-kept-as-refusal", "changes", "ivdfs/tree/changes.py",
        "            except NotSupported as e:\n",
        "            except BackendError as e:\n",
        CHANGES, "a vCenter that was unreachable once makes the pair fail for the life of the "
        "mount",
    ),
    Mutant(
        "deleted-older-snapshot-stays", "changes", "ivdfs/tree/changes.py",
        "            del d.pairs[old_id]\n",
        "            continue\n",
        CHANGES, "changes/ keeps the files of an older snapshot that was deleted",
    ),
    # --- LVM (issue 25 #1) ---------------------------------------------------------------------
    Mutant(
        "stripes-row-and-column-swapped", "lvm", "ivdfs/formats/lvm_map.py",
        "row, stripe = divmod(chunk, n)",
        "stripe, row = divmod(chunk, n)",
        LVM, "a striped LV's chunks are read from the wrong PV and place: its filesystem is "
        "garbage",
    ),
    Mutant(
        "pe-start-in-sectors", "lvm", "ivdfs/formats/lvm_map.py",
        "slots[key] = _PvSlot(uuid, pe_start * SECTOR_SIZE, pe_count,",
        "slots[key] = _PvSlot(uuid, pe_start, pe_count,",
        LVM, "every LV starts at pe_start bytes, not sectors, into its PV: wrong bytes",
    ),
    Mutant(
        "stripe-size-in-sectors", "lvm", "ivdfs/formats/lvm_map.py",
        "        chunk = chunk_sectors * SECTOR_SIZE\n",
        "        chunk = chunk_sectors\n",
        LVM, "a striped LV's chunk size taken as bytes: its bytes are interleaved wrongly",
    ),
    Mutant(
        "wrapped-metadata-read-from-the-header", "lvm", "ivdfs/formats/lvm_disk.py",
        "parts.append(win.read(start + _MDA_HEADER_SIZE, length - first))",
        "parts.append(win.read(start, length - first))",
        LVM, "metadata that wraps around its area fails its CRC: the VG's LVs are not listed",
    ),
    Mutant(
        "oldest-metadata-wins", "lvm", "ivdfs/formats/lvm_map.py",
        "if c.vg_id not in best or c.seqno > best[c.vg_id].seqno:",
        "if c.vg_id not in best or c.seqno < best[c.vg_id].seqno:",
        LVM, "with two metadata copies, the older one describes the LVs: a resized or new LV "
        "reads wrong or is missing",
    ),
    Mutant(
        "hidden-lvs-listed", "lvm", "ivdfs/formats/lvm_map.py",
        'if not isinstance(status, list) or "VISIBLE" not in status:',
        "if not isinstance(status, list):",
        LVM, "the internal parts of raid, thin or mirror LVs appear as lv-*.raw files",
    ),
    Mutant(
        "lv-may-reach-past-its-pv", "lvm", "ivdfs/formats/lvm_map.py",
        "if offset + per_stripe > slot.window.length:",
        "if offset > slot.window.length:",
        LVM, "an LV whose metadata reaches past its PV's partition reads the next partition",
    ),
    Mutant(
        "dm-names-collide", "lvm", "ivdfs/formats/lvm_map.py",
        "return f\"{self.vg.replace('-', '--')}-{self.name.replace('-', '--')}\"",
        "return f\"{self.vg}-{self.name}\"",
        LVM, "VG a-b LV c and VG a LV b-c get the same lv-*.raw name",
    ),
    # --- guest volumes: mount options (issue 25 #1) --------------------------------------------
    Mutant(
        "kernel-ext4-replays-its-journal", "volumes", "ivdfs/volumes/kernel.py",
        '"ext4": ("ro,noload",),',
        '"ext4": ("ro",),',
        KERNEL_VOLUMES, "an ext4 snapshot of a running VM (its journal needs replay) is not "
        "mounted, or its journal is replayed",
    ),
    Mutant(
        "xfs-clones-refused", "volumes", "ivdfs/volumes/kernel.py",
        '"xfs": ("ro,norecovery,nouuid",),',
        '"xfs": ("ro,norecovery",),',
        KERNEL_VOLUMES, "a second snapshot of an XFS volume is refused (duplicate UUID)",
    ),
    Mutant(
        "loop-device-runs-past-the-partition", "volumes", "ivdfs/volumes/kernel.py",
        '                 "--sizelimit", str(c.length), str(source)],\n',
        "                 str(source)],\n",
        KERNEL_VOLUMES, "a partition's loop device runs on to the end of the disk: its "
        "filesystem can read its neighbours' bytes",
    ),
    Mutant(
        "fuse2fs-replays-the-journal", "volumes", "ivdfs/volumes/fuse.py",
        '"ext4": ("fuse2fs", "ro,norecovery"),',
        '"ext4": ("fuse2fs", "ro"),',
        FUSE_VOLUMES, "an ext4 snapshot of a running VM is refused by fuse2fs (journal needs "
        "recovery)",
    ),
    Mutant(
        "guestfs-ext4-replays-its-journal", "volumes", "ivdfs/volumes/guestfs.py",
        '    "ext4": "ro,noload",\n',
        '    "ext4": "ro",\n',
        GUESTFS_VOLUMES, "an ext4 snapshot of a running VM is not mounted in the appliance",
    ),
    Mutant(
        "vixmntapi-opens-for-writing", "volumes", "ivdfs/vddk/mntapi.py",
        "                1,\n                _cdefs.VIXDISKLIB_FLAG_OPEN_READ_ONLY,\n",
        "                1,\n                0,\n",
        VIXMNTAPI, "VixMntapi opens the snapshot's disk for writing",
    ),
    Mutant(
        "vixmntapi-mounts-read-write", "volumes", "ivdfs/vddk/mntapi.py",
        'self._mnt.call("VixMntapi_MountVolume", vh, b"\\x01", context=self._ctx)',
        'self._mnt.call("VixMntapi_MountVolume", vh, b"\\x00", context=self._ctx)',
        VIXMNTAPI, "VixMntapi mounts the guest's volumes read-write",
    ),
    # --- forensics (issue 25 #1) ---------------------------------------------------------------
    Mutant(
        "read-at-the-hashed-end-held-back", "forensics", "ivdfs/forensics/hashing.py",
        "        if offset <= self.pos:\n",
        "        if offset < self.pos:\n",
        FORENSICS, "a reader reading a file in order gets no evidence hash",
    ),
    Mutant(
        "longer-read-at-same-offset-dropped", "forensics", "ivdfs/forensics/hashing.py",
        "if held is None or len(held) < len(view):",
        "if held is None:",
        FORENSICS, "a short read followed by a longer one at the same offset leaves a gap: no "
        "hash for a file read in full",
    ),
    Mutant(
        "hash-pieces-last-first", "forensics", "ivdfs/forensics/hashing.py",
        "                view = self._items.popleft()\n",
        "                view = self._items.pop()\n",
        FORENSICS, "queued pieces are hashed newest first: a wrong evidence hash",
    ),
    Mutant(
        "audit-chain-not-advanced", "forensics", "ivdfs/forensics/writer.py",
        "self.lines, self._prev = self.lines + 1, digest",
        "self.lines += 1",
        FORENSICS, "every audit line points at the journal's start: verify calls it damaged",
    ),
    Mutant(
        "adjacent-ranges-not-merged", "forensics", "ivdfs/forensics/access.py",
        "i = bisect.bisect_left(self._ends, start)",
        "i = bisect.bisect_right(self._ends, start)",
        FORENSICS, "a sequential reader's ranges are recorded one per read, not as one range",
    ),
    Mutant(
        "failed-journal-write-ignored", "forensics", "ivdfs/forensics/writer.py",
        "        except Exception as e:  # OSError, or a bug: either way no line may go unwritten\n"
        "            self.failed = e\n",
        "        except Exception as e:  # OSError, or a bug: either way no line may go unwritten\n"
        "            pass\n",
        FORENSICS, "after a failed journal write reads go on: bytes served that no record shows",
    ),
    Mutant(
        "audit-log-follows-symlinks", "forensics", "ivdfs/forensics/writer.py",
        "flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC",
        "flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC",
        FORENSICS, "a symlink planted at --audit-log redirects the journal to any file",
    ),
    Mutant(
        "files-open-at-unmount-not-closed", "forensics", "ivdfs/forensics/writer.py",
        '            self.closed(access, reason="unmount")\n',
        "            pass\n",
        FORENSICS, "files still open at unmount get no close record: their last ranges are "
        "missing from the journal",
    ),
    Mutant(
        "caller-pid-is-the-thread", "forensics", "ivdfs/forensics/access.py",
        'elif key == "Tgid" and value.strip().isdigit():',
        'elif key == "Pid" and value.strip().isdigit():',
        FORENSICS, "the journal names a reader's thread id as its process",
    ),
    Mutant(
        "hash-of-a-partition-from-the-disk-start", "forensics", "ivdfs/commands/hash.py",
        "start, end = found[partition].start, found[partition].start + found[partition].length",
        "start, end = 0, found[partition].length",
        FORENSICS, "`ivdfs hash --partition N` hashes the disk's first bytes, not the partition",
    ),
    Mutant(
        "hash-tail-past-the-last-chunk-is-zeros", "forensics", "ivdfs/vddk/allocation.py",
        "    runs = [(tail, end - tail)] if end > tail else []\n",
        "    runs: list[tuple[int, int]] = []\n",
        FORENSICS, "`ivdfs hash` of a disk not a whole number of chunks hashes its tail as "
        "zeros: a wrong evidence hash",
    ),
    # --- the vCenter session (issue 25 #1) -----------------------------------------------------
    Mutant(
        "every-thread-logs-in-again", "vcenter", "ivdfs/inventory/session.py",
        "            if self._generation != generation:\n                return  # another",
        "            if False:\n                return  # another",
        SESSION, "after a session expires, every waiting thread logs in again: a burst of "
        "logins on vCenter",
    ),
    Mutant(
        "relogin-does-not-count", "vcenter", "ivdfs/inventory/session.py",
        "            self._generation += 1\n",
        "",
        SESSION, "threads that failed together each log in again",
    ),
    Mutant(
        "failed-relogin-tried-by-each", "vcenter", "ivdfs/inventory/session.py",
        "            if failed is not None and failed[0] >= started:\n",
        "            if False:\n",
        SESSION, "with vCenter silent, each waiting call tries its own login and waits its own "
        "deadline in turn: a listing stalls for minutes",
    ),
    Mutant(
        "no-relogin", "vcenter", "ivdfs/inventory/session.py",
        "        for attempt in (1, 2):\n",
        "        for attempt in (2,):\n",
        SESSION, "an expired session is never renewed: every vCenter call fails until remount",
    ),
    Mutant(
        "calls-without-deadline", "vcenter", "ivdfs/inventory/session.py",
        "                httpConnectionTimeout=s.timeout,\n            )\n",
        "            )\n",
        SESSION, "a stalled vCenter holds every call (and the lookups waiting on them) forever",
    ),
    Mutant(
        "version-discovery-without-deadline", "vcenter", "ivdfs/inventory/session.py",
        "conn = http.client.HTTPSConnection(s.host, s.port, timeout=s.timeout, context=self._ctx)",
        "conn = http.client.HTTPSConnection(s.host, s.port, context=self._ctx)",
        SESSION, "logging in again to a stalled vCenter hangs forever, holding the login lock",
    ),
    Mutant(
        "certificate-not-checked-at-relogin", "vcenter", "ivdfs/inventory/session.py",
        "if probe_certificate(self.server, self._ctx) != self.thumbprint:",
        "if False:",
        SESSION, "a vCenter whose certificate changed since mounting is logged in to again, "
        "while VDDK keeps the old thumbprint",
    ),
    # --- direct datastore access (issue 24) ----------------------------------------------------
    Mutant(
        "direct-read-unchecked", "direct", "ivdfs/vddk/opener.py",
        "        disk.after_read = self.reads.confirmer(target, plan)\n",
        "",
        ("tests/t4_direct.py::test_a_link_changed_under_a_reader_fails_the_read_and_never_mixes_bytes",),
        "issue 24: a chain consolidated under a reader serves bytes from after the change",
    ),
    Mutant(
        "direct-check-confirms-early-reads", "direct", "ivdfs/datastore/identity.py",
        "                if self._confirmed_from >= read_ended_ns:\n",
        "                if self._confirmed_from >= 0:\n",
        ("tests/t2_chain_identity.py",),
        "issue 24: a check that began before a read ended confirms it: a change goes unseen",
    ),
    Mutant(
        "direct-size-not-compared", "direct", "ivdfs/datastore/identity.py",
        'for what in ("dev", "ino", "size", "mtime_ns", "ctime_ns"):',
        'for what in ("dev", "ino"):',
        ("tests/t2_chain_identity.py",
         "tests/t4_direct.py::test_a_link_changed_under_a_reader_fails_the_read_and_never_mixes_bytes",),
        "issue 24: a link written in place under a reader goes unseen",
    ),
    Mutant(
        "direct-falls-back-with-transport-file", "direct", "ivdfs/datastore/reads.py",
        "        if self.only:\n            self.stats.refused += 1\n",
        "        if False:\n            self.stats.refused += 1\n",
        ("tests/t4_direct.py::test_snapshots_not_under_dir_fall_back_to_the_network_or_fail_with_file_transport",),
        "issue 24: --transport file reads over the network anyway",
    ),
    Mutant(
        "direct-prepares-access", "direct", "ivdfs/vddk/opener.py",
        "        return self._direct(target) is None and self.network.needs_access(target)\n",
        "        return self.network.needs_access(target)\n",
        ("tests/t4_direct.py::test_every_snapshot_reads_byte_exact_directly_and_nothing_is_written",),
        "issue 24: direct reads still call PrepareForAccess, blocking vMotion for nothing",
    ),
)
# fmt: on
