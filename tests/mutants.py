"""The mutants of scripts/mutate: one realistic bug each, and the tests that must catch it.

A mutant replaces `old` by `new` in one file; `old` must occur exactly once there (a mutant
whose text moved or changed is reported as stale, never applied somewhere else). `tests` are
pytest node ids, fastest and most likely killers first: the run stops at the first failure.
`why` says what the bug would do to a user, in a few words.

Areas: read path, cache, partitions, vddk, credentials, volumes, vcenter. Not collected by pytest
(no t<N>_ prefix); imported by scripts/mutate only.
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
        "            _cdefs.VIXDISKLIB_FLAG_OPEN_READ_ONLY,\n            handle,",
        "            0,\n            handle,",
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
        "if now - s.opened_at >= lim.min_open:",
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
)
# fmt: on
