"""One libguestfs appliance for --volumes guestfs; run by the system's python3, not by ivdfs.

Role: Debian's python3-guestfs is built for the system interpreter (/usr/bin/python3), while
ivdfs runs in a virtual environment that may use another one; so ivdfs starts this file as a
helper process with ``/usr/bin/python3 -I`` and talks to it in JSON lines. It imports nothing of
ivdfs, only the standard library and guestfs.

Protocol (stdin: one request line, then commands; stdout: events):
- request ``{"disk", "mountpoint", "memsize_mib", "options": {fs: mount options},
  "refusals": {type: reason}, "key": passphrase or null}``; with ``"disk": null`` (``ivdfs
  check``) the appliance boots on a scratch disk, reports ``launched`` and stops.
- ``{"event": "launched", "qemu_pid", "seconds", "features": {name: bool}}`` once qemu runs
  the appliance; `features`: whether it can assemble md arrays and dynamic disks and open
  encrypted volumes (libguestfs builds the appliance from the host's mdadm, ldmtool and
  cryptsetup, and leaves out what is not installed);
- ``{"event": "ready", "mounted": {name: path}, "refused": {name: reason}}`` once every
  filesystem the appliance found is mounted read-only inside it (or refused with one line) and
  the whole tree is exposed at ``mountpoint`` through libguestfs's ``mount_local`` (FUSE);
- ``{"event": "active"}`` at most once a second while the mount is used (every libguestfs
  call, i.e. every FUSE request that reaches the appliance, is an ENTER event);
- ``{"event": "error", "message"}`` before exiting 1 on a failure that ends the appliance.
Command ``{"op": "stop", "lazy": bool}`` (or the end of stdin: ivdfs died, or the death of qemu,
reported as an ``error`` first) unmounts the local mount (lazily if asked or if the plain unmount
fails because a program still holds it), shuts the appliance down, says ``stopped`` and exits.

The disk is added read-only: libguestfs puts a qcow2 overlay (in $TMPDIR, which ivdfs makes
private to this helper) in front of it, so neither the appliance nor qemu can write it, and our
FUSE mount refuses writes anyway. Filesystems are mounted with the options ivdfs gives (no
journal replay), as the kernel mode does. md arrays and Windows dynamic disks (LDM) are
assembled by the appliance itself when it boots (mdadm, ldmtool); LUKS and BitLocker volumes are
opened read-only with the request's key (``cryptsetup_open``), which is never written anywhere:
libguestfs's call trace, which would show it, is turned off.

Threads: ``mount_local_run`` serves FUSE on a thread of its own (the binding releases the GIL
there); one thread reads commands, one watches qemu; the main thread waits for either and
stops. ``umount_local`` cannot be called from another thread
while that loop holds the handle's lock (it deadlocks), so stopping runs ``fusermount3 -u``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

_out_lock = threading.Lock()
ACTIVITY_INTERVAL = 1.0


def send(msg: dict[str, Any]) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


FEATURES = ("mdadm", "ldm", "luks")  # libguestfs's names of the optional groups we rely on
CRYPT_PREFIX = "ivdfs-crypt-"  # device-mapper name of an opened encrypted volume, + its name
ENCRYPTED = {"crypto_LUKS": "LUKS", "BitLocker": "BitLocker"}  # blkid's type -> what to call it


def volume_name(device: str, md_names: dict[str, str]) -> str | None:
    """The name ivdfs shows in volumes/: the partition number as Linux numbers it, 0 for a
    filesystem on the whole disk, ``<vg>-<lv>`` (hyphens doubled, as /dev/mapper spells it)
    for LVM, ``md-<name>`` for an md array with a name (its set name without the home host,
    as /dev/md/<name>; the number mdadm picks inside the appliance can change between boots),
    for an opened encrypted volume the name of what holds it, the device-mapper name
    otherwise (LDM: ``ldm_vol_<group>_<volume>``). None: not a volume of its own (btrfs
    subvolumes appear inside their filesystem)."""
    if device.startswith("btrfsvol:"):
        return None
    if device in md_names:
        return md_names[device]
    parts = device.split("/")
    if len(parts) == 3 and parts[1] == "dev":
        dev = parts[2]
        if dev.startswith(("sd", "vd", "hd")):
            digits = dev.lstrip("shvd").lstrip("abcdefghijklmnopqrstuvwxyz")
            return digits or "0"
        return dev  # md127 (no name), ...
    if len(parts) == 4 and parts[1] == "dev" and parts[2] == "mapper":
        return parts[3].removeprefix(CRYPT_PREFIX)
    if len(parts) == 4 and parts[1] == "dev":
        vg, lv = parts[2], parts[3]
        return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"
    return device.replace("/", "_").strip("_")


def md_names(h: Any) -> dict[str, str]:
    """md device -> ``md-<name>`` for every array the appliance assembled that has a name."""
    out: dict[str, str] = {}
    for md in h.list_md_devices():
        try:
            name = h.md_detail(md).get("name", "")
        except RuntimeError:
            continue
        name = name.rpartition(":")[2]  # "<homehost>:<name>" in metadata 1.x
        if name and all(c.isalnum() or c in "-_." for c in name):
            out[md] = f"md-{name}"
    return out


def open_encrypted(h: Any, key: str | None, names: dict[str, str]) -> dict[str, str]:
    """Open every LUKS or BitLocker volume with `key` (read-only) as /dev/mapper/<CRYPT_PREFIX
    + its name); returns the name -> one-line reason of those that stay closed. The key never
    appears in a reason."""
    refused: dict[str, str] = {}
    devices = [*h.list_devices(), *h.list_partitions(), *h.list_md_devices(), *h.lvs()]
    opened = False
    for device in sorted(set(devices)):
        try:
            kind = ENCRYPTED.get(h.vfs_type(device))
        except RuntimeError:
            continue
        name = volume_name(device, names)
        if kind is None or name is None:
            continue
        if key is None:
            refused[name] = (
                f"an encrypted ({kind}) volume: give its passphrase with --volume-key-file"
            )
            continue
        try:
            h.cryptsetup_open(device, key, CRYPT_PREFIX + name, readonly=True)
            opened = True
        except RuntimeError as e:
            text = one_line(e).replace(key, "***") if key else one_line(e)
            # cryptsetup's exit status 2: no key slot opens with this passphrase.
            if "status 2" in text:
                refused[name] = f"the --volume-key-file passphrase does not open this {kind} volume"
            else:
                refused[name] = f"cannot open this {kind} volume: {text}"
    if opened:
        # An encrypted volume often holds an LVM physical volume (Debian's "guided, encrypted
        # LVM"): activate what appeared.
        try:
            h.lvm_scan(True)
        except RuntimeError:
            pass
    return refused


def mount_all(h: Any, req: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    options: dict[str, str] = req["options"]
    refusals: dict[str, str] = req["refusals"]
    mounted: dict[str, str] = {}
    names = md_names(h)
    # list_filesystems leaves out encrypted volumes: their reasons, or what opening them shows.
    refused = open_encrypted(h, req.get("key"), names)
    for device, fstype in sorted(h.list_filesystems().items()):
        name = volume_name(device, names)
        if name is None:
            continue
        if fstype in refusals:
            refused[name] = refusals[fstype]
            continue
        if fstype == "unknown" or not fstype:
            refused[name] = "no recognised filesystem"
            continue
        try:
            h.mkmountpoint("/" + name)
            h.mount_options(options.get(fstype, "ro"), device, "/" + name)
        except RuntimeError as e:
            refused[name] = f"mount failed: {one_line(e)}"
            continue
        mounted[name] = os.path.join(req["mountpoint"], name)
    return mounted, refused


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def stop_local(mountpoint: str, lazy: bool) -> None:
    for argv in (["fusermount3", "-u", mountpoint], ["fusermount3", "-u", "-z", mountpoint]):
        if argv[2] != "-z" and lazy:
            continue
        r = subprocess.run(argv, capture_output=True, check=False, stdin=subprocess.DEVNULL)
        if r.returncode == 0:
            return


def main() -> int:
    req = json.loads(sys.stdin.readline())
    import guestfs  # type: ignore[import-not-found]  # the system's python3-guestfs

    h = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
    try:
        h.set_trace(False)  # LIBGUESTFS_TRACE in the environment would print the key
        h.set_memsize(int(req["memsize_mib"]))
        if req.get("disk"):
            h.add_drive_opts(req["disk"], readonly=True, format="raw")
        else:
            h.add_drive_scratch(16 << 20)
        t0 = time.monotonic()
        h.launch()
        qemu = h.get_pid()
        seconds = time.monotonic() - t0
        features = {f: bool(h.feature_available([f])) for f in FEATURES}
        send({"event": "launched", "qemu_pid": qemu, "seconds": seconds, "features": features})
        if not req.get("disk"):
            h.shutdown()
            h.close()
            return 0
        mounted, refused = mount_all(h, req)
        mountpoint = req["mountpoint"]
        h.mount_local(mountpoint, readonly=True)
    except RuntimeError as e:
        send({"event": "error", "message": one_line(e)})
        h.close()  # stops qemu
        return 1

    last = [0.0]

    def active(*_args: Any) -> None:
        now = time.monotonic()
        if now - last[0] >= ACTIVITY_INTERVAL:
            last[0] = now
            send({"event": "active"})

    h.set_event_callback(active, guestfs.EVENT_ENTER)
    served = threading.Event()
    failure: list[str] = []

    def serve() -> None:
        try:
            h.mount_local_run()
        except RuntimeError as e:
            failure.append(one_line(e))
        finally:
            served.set()

    thread = threading.Thread(target=serve, name="mount_local_run", daemon=True)
    thread.start()
    send({"event": "ready", "mounted": mounted, "refused": refused})
    stop = threading.Event()
    # End of stdin: ivdfs is gone, nobody will read these volumes through it any more.
    lazy_box = [True]

    def commands() -> None:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd.get("op") == "stop":
                lazy_box[0] = bool(cmd.get("lazy"))
                break
        stop.set()

    def watch(qemu: int) -> None:
        # mount_local's FUSE loop outlives a dead qemu (every request then fails): stop.
        while not stop.wait(1.0):
            if not alive(qemu):
                failure.append(f"qemu (pid {qemu}) exited")
                stop.set()

    threading.Thread(target=commands, name="commands", daemon=True).start()
    # Not h.get_pid() here: no handle call while mount_local_run holds the handle (its FUSE
    # thread then waits for the GIL that such a call would hold: a deadlock).
    threading.Thread(target=watch, args=(qemu,), name="watch", daemon=True).start()
    stop.wait()
    lazy = lazy_box[0]
    while not served.is_set():
        stop_local(mountpoint, lazy)
        served.wait(1.0)
        lazy = True
    thread.join()
    try:
        h.shutdown()
    except RuntimeError as e:
        failure.append(one_line(e))
    h.close()
    if failure:
        send({"event": "error", "message": "; ".join(failure)})
    send({"event": "stopped"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
