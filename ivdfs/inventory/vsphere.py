"""vSphere queries about IVDs: datastores, IVDs, snapshots, snapshot tasks, names.

Role: everything ivdfs asks vCenter or a standalone ESXi host, as plain records
(`inventory.model`); no pyVmomi type escapes. A vCenter answers through its
VcenterVStorageObjectManager, a host through its HostVStorageObjectManager (the same calls
under `Host...` wire names; a host has no snapshot details or changed-block queries: asking
for changed areas there is NotSupported, with a message that says so). For many
IVDs at once (`summaries`) the VSLM endpoint answers a whole datastore in a few paged calls;
without it, one RetrieveVStorageObject per IVD runs on the session's pool of threads. Names
that users type resolve to objects here and fail with NotFound or Ambiguous; exit codes and
hints belong to the commands.

Tasks (snapshot create and delete) are started once: their start is never re-sent blindly
after a lost reply, since vCenter may have run it. After one, vCenter is asked what happened
before anything else: the snapshot by its description (unique per request) or id, after any
such task still in vCenter's task list has ended. A create whose snapshot is found is taken as
done; one that left nothing is reported, not sent again (the request may still sit in a
stalled vCenter). A delete is sent again only once vCenter shows the snapshot still there and
no delete running.

Concurrency: every method blocks; any thread (the session's pool makes it safe). Task waits
poll, each poll a separate call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pyVmomi import vim, vmodl, vslm

from ivdfs.config import ServerConfig
from ivdfs.errors import Ambiguous, BackendError, NotFound, NotSupported
from ivdfs.inventory.changes import ChangedAreas, Extent, merge
from ivdfs.inventory.model import Datastore, Ivd, IvdSummary, Snapshot, creation_order
from ivdfs.inventory.session import ReplyLost, Session

log = logging.getLogger(__name__)

TASK_TIMEOUT = 3600.0
# Polls of a task's state start fast (vcsim and small disks finish in milliseconds) and back
# off to this interval, which keeps a long snapshot task from hammering vCenter.
TASK_POLL_MAX = 1.0
# IVDs per VSLM list page.
VSLM_PAGE = 1000

# Called while a task runs with the seconds elapsed so far (for progress on a terminal).
Progress = Callable[[float], None]

# Task kinds as they appear in a task's descriptionId or name ("...createSnapshot").
CREATE_SNAPSHOT = "createsnapshot"
DELETE_SNAPSHOT = "deletesnapshot"


class OutcomeUnknown(BackendError):
    """A task start whose reply was lost and whose effect vCenter does not show (yet)."""


def is_task_of(kind: str, props: dict[str, Any]) -> bool:
    """Whether a task (its info.descriptionId and info.name) is an IVD task of `kind`. A
    virtual machine's snapshot tasks ("VirtualMachine.createSnapshot") are not: real
    vCenter's ids for IVD tasks are not documented, so anything else naming the operation
    counts (waiting for a stranger's task costs time only)."""
    desc = str(props.get("info.descriptionId") or "").lower()
    name = str(props.get("info.name") or "").lower()
    if desc.startswith("virtualmachine."):
        return False
    return kind in desc.replace("_", "") or kind in name.replace("_", "")


HOST_HAS_NO_CBT = (
    "an ESXi host has no changed-block query for IVDs (QueryChangedDiskAreas and snapshot "
    "details are vCenter methods): connect to the vCenter that manages the host"
)


class VSphere:
    """A logged-in session to vCenter or ESXi and the IVD queries over it."""

    def __init__(self, server: ServerConfig, pool: int = 1, use_vslm: bool = True) -> None:
        self.server = server
        self.session = Session(server, pool)
        self._use_vslm = use_vslm

    # --- session -------------------------------------------------------------------------

    def connect(self) -> str:
        """Check TLS, log in; returns the server certificate's SHA-1 thumbprint."""
        return self.session.connect(self._use_vslm)

    def close(self) -> None:
        self.session.close()

    @property
    def thumbprint(self) -> str:
        return self.session.thumbprint

    @property
    def about(self) -> str:
        return self.session.about

    @property
    def is_host(self) -> bool:
        return self.session.is_host

    @property
    def fast_summaries(self) -> bool:
        return self.session.vslm is not None

    @property
    def _vsom(self) -> Any:
        return self.session.content.vStorageObjectManager

    def _ds(self, ds: Datastore) -> Any:
        return vim.Datastore(ds.moref, self.session.si._stub)

    def _call(self, what: str, fn: Callable[[], Any], *, resend: bool = True) -> Any:
        return self.session.call(what, fn, resend=resend)

    # --- queries -------------------------------------------------------------------------

    def datastores(self) -> list[Datastore]:
        def run() -> list[Datastore]:
            content = self.session.content
            view = content.viewManager.CreateContainerView(
                content.rootFolder, [vim.Datastore], True
            )
            try:
                pc = vmodl.query.PropertyCollector
                spec = pc.FilterSpec(
                    objectSet=[
                        pc.ObjectSpec(
                            obj=view,
                            skip=True,
                            selectSet=[
                                pc.TraversalSpec(
                                    name="view",
                                    path="view",
                                    skip=False,
                                    type=vim.view.ContainerView,
                                )
                            ],
                        )
                    ],
                    propSet=[pc.PropertySpec(type=vim.Datastore, pathSet=["name"])],
                )
                result = content.propertyCollector.RetrieveContents([spec])
            finally:
                view.Destroy()
            out = []
            for oc in result:
                props = {p.name: p.val for p in oc.propSet}
                if "name" in props:
                    out.append(Datastore(name=str(props["name"]), moref=str(oc.obj._moId)))
            return sorted(out, key=lambda d: d.name)

        return self._call("listing datastores", run)  # type: ignore[no-any-return]

    def list_ivds(self, datastore: Datastore) -> list[str]:
        def run() -> list[str]:
            ds = self._ds(datastore)
            if self.is_host:
                ids = self._vsom.HostListVStorageObject(datastore=ds) or []
            else:
                ids = self._vsom.ListVStorageObject(datastore=ds) or []
            return sorted(str(i.id) for i in ids)

        return self._call(f"listing IVDs on {datastore.name}", run)  # type: ignore[no-any-return]

    def ivd(self, datastore: Datastore, ivd_id: str) -> Ivd:
        def run() -> Ivd:
            vid, ds = vim.vslm.ID(id=ivd_id), self._ds(datastore)
            if self.is_host:
                obj = self._vsom.HostRetrieveVStorageObject(id=vid, datastore=ds)
            else:
                obj = self._vsom.RetrieveVStorageObject(id=vid, datastore=ds)
            cfg = obj.config
            backing = cfg.backing
            return Ivd(
                id=ivd_id,
                name=str(cfg.name or ""),
                datastore=datastore,
                capacity_bytes=int(cfg.capacityInMB or 0) * 1024 * 1024,
                create_time=cfg.createTime,
                backing_path=str(getattr(backing, "filePath", "") or ""),
                provisioning=str(getattr(backing, "provisioningType", "") or ""),
                # consumerId is 6.7+ and absent from some servers' replies (vcsim 0.24).
                consumers=tuple(
                    str(c.id) for c in (getattr(cfg, "consumerId", None) or []) if c is not None
                ),
            )

        return self._call(f"retrieving IVD {ivd_id}", run)  # type: ignore[no-any-return]

    def snapshots_of(self, datastore: Datastore, ivd_id: str) -> list[Snapshot]:
        def run() -> list[Snapshot]:
            vid, ds = vim.vslm.ID(id=ivd_id), self._ds(datastore)
            if self.is_host:
                info = self._vsom.HostVStorageObjectRetrieveSnapshotInfo(id=vid, datastore=ds)
            else:
                info = self._vsom.RetrieveSnapshotInfo(id=vid, datastore=ds)
            return [
                Snapshot(
                    id=str(s.id.id),
                    ivd_id=ivd_id,
                    create_time=s.createTime,
                    description=str(s.description or ""),
                )
                for s in (info.snapshots or [])
            ]

        return self._call(f"listing snapshots of IVD {ivd_id}", run)  # type: ignore[no-any-return]

    def snapshots(self, ivd: Ivd) -> list[Snapshot]:
        return self.snapshots_of(ivd.datastore, ivd.id)

    def summaries(self, datastore: Datastore) -> list[IvdSummary]:
        """Every IVD of a datastore: a few paged VSLM calls, or one call per IVD on the pool."""
        if self.session.vslm is not None:
            try:
                return self._vslm_summaries(datastore)
            except BackendError as e:
                log.warning("VSLM listing of %s failed, asking per IVD: %s", datastore.name, e)
        ids = self.list_ivds(datastore)
        records = self.session.map(lambda i: self.ivd(datastore, i), ids, skip=NotFound)
        return [IvdSummary(r) for r in records]

    def _vslm_summaries(self, datastore: Datastore) -> list[IvdSummary]:
        q = vslm.vso.VStorageObjectQuerySpec
        by_ds = q(queryField="datastoreMoId", queryOperator="equals", queryValue=[datastore.moref])
        out: list[IvdSummary] = []
        last: str | None = None
        with_snapshots = self.session.vslm_version not in (None, "vslm.version.version14")
        while True:
            query = [by_ds]
            if last is not None:
                query.append(q(queryField="id", queryOperator="greaterThan", queryValue=[last]))

            def list_page(query: list[Any] = query) -> Any:
                return self.session.vslm.VslmListVStorageObjectForSpec(
                    query=query, maxResult=VSLM_PAGE
                )

            page = self._call(f"listing IVDs on {datastore.name} (VSLM)", list_page)
            for r in page.queryResults or []:
                if getattr(r, "error", None) is not None:
                    continue
                ivd = Ivd(
                    id=str(r.id.id),
                    name=str(r.name or ""),
                    datastore=datastore,
                    capacity_bytes=int(r.capacityInMB or 0) * 1024 * 1024,
                    create_time=r.createTime,
                    backing_path=str(getattr(r, "diskPath", "") or ""),
                )
                count = len(getattr(r, "snapshotInfo", None) or []) if with_snapshots else None
                out.append(IvdSummary(ivd, count))
            ids = [str(i.id) for i in (page.id or [])]
            if page.allRecordsReturned or not ids:
                break
            last = ids[-1]
        return sorted(out, key=lambda s: s.ivd.id)

    def attached_vms(self, ivds: list[Ivd]) -> dict[str, tuple[str, ...]] | None:
        """IVD id -> ids of the VMs it is attached to, in one call for all (VSLM, or the
        vCenter's RetrieveVStorageObjectAssociations); a host has neither: what the records
        said (consumerId). None when the server lacks the call (an optional column)."""
        if not ivds or self.is_host:
            return {v.id: v.consumers for v in ivds}
        missing = object()

        def run() -> Any:
            try:
                if self.session.vslm is not None:
                    ids = [vim.vslm.ID(id=v.id) for v in ivds]
                    return self.session.vslm.VslmRetrieveVStorageObjectAssociations(ids=ids)
                specs = [
                    vim.vslm.vcenter.RetrieveVStorageObjSpec(
                        id=vim.vslm.ID(id=v.id), datastore=self._ds(v.datastore)
                    )
                    for v in ivds
                ]
                return self._vsom.RetrieveVStorageObjectAssociations(ids=specs)
            except (vmodl.fault.MethodNotFound, vmodl.fault.NotSupported):
                return missing  # a release without it: the answer is "unknown", not a failure

        found = self._call("listing attached VMs", run)
        if found is missing:
            log.debug("the server cannot list attached VMs; that column stays empty")
            return None
        out = {v.id: v.consumers for v in ivds}
        for a in found or []:
            disks = getattr(a, "vmDiskAssociation", None) or getattr(a, "vmDiskAssociations", [])
            if getattr(a, "fault", None) is None and a.id is not None:
                out[str(a.id.id)] = tuple(sorted({str(d.vmId) for d in disks or []}))
        return out

    def snapshot_counts(self, summaries: list[IvdSummary]) -> list[tuple[Ivd, int]]:
        """Each IVD with its number of snapshots: from the listing when it said, else asked
        on the pool."""

        def count(s: IvdSummary) -> tuple[Ivd, int]:
            if s.snapshot_count is not None:
                return s.ivd, s.snapshot_count
            return s.ivd, len(self.snapshots_of(s.ivd.datastore, s.ivd.id))

        return self.session.map(count, summaries, skip=NotFound)

    # --- what users type: names or UUIDs ---------------------------------------------------

    def find_datastore(self, name: str) -> Datastore:
        stores = self.datastores()
        for ds in stores:
            if ds.name == name or ds.moref == name:
                return ds
        names = ", ".join(d.name for d in stores) or "none"
        raise NotFound(f"no datastore {name!r} (datastores: {names})")

    def all_ivds(self, datastore: Datastore | None = None) -> list[Ivd]:
        """Every IVD (of one datastore), sorted by name, datastore and id."""
        stores = [datastore] if datastore is not None else self.datastores()
        out = [s.ivd for ds in stores for s in self.summaries(ds)]
        return sorted(out, key=lambda v: (v.name, v.datastore.name, v.id))

    def find_ivd(self, text: str, datastore: Datastore | None = None) -> Ivd:
        """The IVD whose UUID is `text`, else the one IVD named `text`."""
        stores = [datastore] if datastore is not None else self.datastores()
        # A UUID costs one listing per datastore; only a name needs every IVD's record.
        for ds in stores:
            if text in self.list_ivds(ds):
                return self.ivd(ds, text)
        matches = [ivd for ds in stores for ivd in self.all_ivds(ds) if ivd.name == text]
        if len(matches) == 1:
            return self.ivd(matches[0].datastore, matches[0].id)
        where = f" on datastore {datastore.name}" if datastore is not None else ""
        if not matches:
            raise NotFound(f"no IVD with UUID or name {text!r}{where}")
        ids = ", ".join(f"{m.id} on {m.datastore.name}" for m in matches)
        raise Ambiguous(f"{len(matches)} IVDs are named {text!r}{where} ({ids}); use the UUID")

    def find_snapshot(self, ivd: Ivd, snapshot_id: str) -> Snapshot:
        snaps = self.snapshots(ivd)
        for snap in snaps:
            if snap.id == snapshot_id:
                return snap
        raise NotFound(
            f"IVD {ivd.name or ivd.id} has no snapshot {snapshot_id!r} "
            f"({len(snaps)} snapshot{'s' if len(snaps) != 1 else ''}: run ivdfs ls "
            f"{ivd.datastore.name} {ivd.id})"
        )

    # --- tasks ---------------------------------------------------------------------------

    def wait_task(
        self,
        task: Any,
        what: str,
        progress: Progress | None = None,
        timeout: float = TASK_TIMEOUT,
    ) -> Any:
        """Wait for `task` to end; return its info.result or raise BackendError.

        Reads only info.state, info.result and info.error through the PropertyCollector:
        pyVmomi's WaitForTask deserialises the whole TaskInfo, which fails when info.entity is
        not a ManagedEntity (the VStorageObjectManager's tasks on vcsim). This works on real
        vCenter too.
        """
        pc = vmodl.query.PropertyCollector
        moid = task._moId
        start = time.monotonic()
        interval = 0.01

        def poll() -> dict[str, Any]:
            # Bound to the current stub each time: a re-login replaces it.
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=vim.Task(moid, self.session.si._stub), skip=False)],
                propSet=[
                    pc.PropertySpec(
                        type=vim.Task, pathSet=["info.state", "info.result", "info.error"]
                    )
                ],
            )
            result = self.session.content.propertyCollector.RetrievePropertiesEx(
                [spec], pc.RetrieveOptions()
            )
            return {p.name: p.val for o in (result.objects if result else []) for p in o.propSet}

        while True:
            props = self._call(what, poll)
            state = props.get("info.state")
            if state == vim.TaskInfo.State.success:
                return props.get("info.result")
            if state == vim.TaskInfo.State.error:
                fault = props.get("info.error")
                if isinstance(fault, vim.fault.NotFound):
                    raise NotFound(f"{what}: {fault.msg or 'not found'}")
                text = getattr(fault, "msg", "") or type(fault).__name__
                raise BackendError(f"{what} failed: {text}")
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                raise BackendError(f"{what}: task {moid} still {state} after {timeout:.0f} s")
            if progress is not None:
                progress(elapsed)
            time.sleep(interval)
            interval = min(interval * 2, TASK_POLL_MAX)

    def wait_task_ended(self, task_id: str, what: str, timeout: float) -> None:
        """Return once the task `task_id` (a moref value) is no longer queued or running:
        ended either way, or unknown to the server (it keeps ended tasks only for a while; a
        restart ends running ones). BackendError when it still runs after `timeout` s."""
        pc = vmodl.query.PropertyCollector
        start = time.monotonic()
        interval = 0.01

        def state() -> Any:
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=vim.Task(task_id, self.session.si._stub))],
                propSet=[pc.PropertySpec(type=vim.Task, pathSet=["info.state"])],
            )
            try:
                result = self.session.content.propertyCollector.RetrievePropertiesEx(
                    [spec], pc.RetrieveOptions()
                )
            except vmodl.fault.ManagedObjectNotFound:
                return None
            props = [p.val for o in (result.objects if result else []) for p in o.propSet]
            return props[0] if props else None

        while True:
            s = self._call(what, state)
            if s not in (vim.TaskInfo.State.queued, vim.TaskInfo.State.running):
                return
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                raise BackendError(f"{what}: task {task_id} still {s} after {timeout:.0f} s")
            time.sleep(interval)
            interval = min(interval * 2, TASK_POLL_MAX)

    def create_snapshot(
        self,
        ivd: Ivd,
        description: str,
        progress: Progress | None = None,
        on_started: Callable[[str], None] | None = None,
    ) -> Snapshot:
        """Snapshot `ivd`. `on_started(task id)` runs once vCenter accepted the task, before it
        is waited for: a journal keeps the id so that recovery can wait for a task its process
        left. After a lost reply the snapshot is found by its description among those that
        were not there before (OutcomeUnknown when there is none)."""
        what = f"snapshot of IVD {ivd.name or ivd.id}"
        before = {s.id for s in self.snapshots(ivd)}

        def start() -> Any:
            vid, ds = vim.vslm.ID(id=ivd.id), self._ds(ivd.datastore)
            if self.is_host:
                return self._vsom.HostVStorageObjectCreateSnapshot_Task(
                    id=vid, datastore=ds, description=description
                )
            return self._vsom.VStorageObjectCreateSnapshot_Task(
                id=vid, datastore=ds, description=description
            )

        try:
            task = self._call(what, start, resend=False)
        except ReplyLost as e:
            return self._created_after_lost_reply(ivd, description, before, what, e, progress)
        if on_started is not None:
            on_started(str(task._moId))
        result = self.wait_task(task, what, progress)
        snap_id = str(result.id)
        for snap in self.snapshots(ivd):
            if snap.id == snap_id:
                return snap
        return Snapshot(id=snap_id, ivd_id=ivd.id, description=description)

    def _created_after_lost_reply(
        self,
        ivd: Ivd,
        description: str,
        before: set[str],
        what: str,
        lost: ReplyLost,
        progress: Progress | None,
    ) -> Snapshot:
        log.warning("%s, so the reply was lost; asking vCenter whether it ran", lost)
        try:
            self._wait_for_tasks(CREATE_SNAPSHOT, what, progress)
            now = self.snapshots(ivd)
        except BackendError as e:
            # Still unknown: the request may yet run (a stalled vCenter keeps it).
            raise OutcomeUnknown(f"{lost}, so the reply was lost, and asking vCenter what "
                                 f"happened failed too: {e}") from None  # fmt: skip
        found = [s for s in now if s.description == description and s.id not in before]
        if not found:
            raise OutcomeUnknown(
                f"{lost}, so the reply was lost, and vCenter shows no new snapshot with the "
                f"description {description!r}; not sent again"
            )
        if len(found) > 1:  # never sent twice: another client used the same description
            log.error("%s: %d new snapshots carry the description %r; taking the newest", what,
                      len(found), description)  # fmt: skip
        snap = max(found, key=creation_order)
        log.info("%s: vCenter made it (snapshot %s) before the reply was lost", what, snap.id)
        return snap

    def delete_snapshot(self, ivd: Ivd, snapshot_id: str, progress: Progress | None = None) -> None:
        what = f"deleting snapshot {snapshot_id} of IVD {ivd.name or ivd.id}"

        def start() -> Any:
            vid, ds = vim.vslm.ID(id=ivd.id), self._ds(ivd.datastore)
            sid = vim.vslm.ID(id=snapshot_id)
            if self.is_host:
                return self._vsom.HostVStorageObjectDeleteSnapshot_Task(
                    id=vid, datastore=ds, snapshotId=sid
                )
            return self._vsom.DeleteSnapshot_Task(id=vid, datastore=ds, snapshotId=sid)

        try:
            task = self._call(what, start, resend=False)
        except ReplyLost as e:
            log.warning("%s, so the reply was lost; asking vCenter whether it ran", e)
            self._wait_for_tasks(DELETE_SNAPSHOT, what, progress)
            if snapshot_id not in {s.id for s in self.snapshots(ivd)}:
                log.info("%s: vCenter did it before the reply was lost", what)
                return
            # Still there and no delete running: it did not run. Deleting is by id, so the
            # second request cannot touch anything else.
            log.info("%s: vCenter did not run it; sending it again", what)
            task = self._call(what, start, resend=False)
        self.wait_task(task, what, progress)

    def _wait_for_tasks(self, kind: str, what: str, progress: Progress | None) -> None:
        """Wait for the tasks of `kind` that vCenter's task list shows queued or running (a
        request whose reply was lost may still be under way). Tasks of other clients may be
        among them: waiting for those costs time, never a wrong answer."""
        pc = vmodl.query.PropertyCollector

        def running() -> list[str]:
            # The session's objects of now: a re-login between attempts replaces them.
            tm = self.session.content.taskManager
            recent = self.session.content.propertyCollector.RetrievePropertiesEx(
                [
                    pc.FilterSpec(
                        objectSet=[pc.ObjectSpec(obj=tm, skip=False)],
                        propSet=[pc.PropertySpec(type=vim.TaskManager, pathSet=["recentTask"])],
                    )
                ],
                pc.RetrieveOptions(),
            )
            tasks = [t for o in (recent.objects if recent else []) for p in o.propSet
                     for t in (p.val or [])]  # fmt: skip
            if not tasks:
                return []
            spec = pc.FilterSpec(
                objectSet=[
                    pc.ObjectSpec(obj=vim.Task(t._moId, self.session.si._stub), skip=False)
                    for t in tasks
                ],
                propSet=[
                    pc.PropertySpec(
                        type=vim.Task, pathSet=["info.descriptionId", "info.name", "info.state"]
                    )
                ],
            )
            result = self.session.content.propertyCollector.RetrievePropertiesEx(
                [spec], pc.RetrieveOptions()
            )
            out = []
            for o in result.objects if result else []:
                props = {p.name: p.val for p in o.propSet}
                if is_task_of(kind, props) and props.get("info.state") in (
                    vim.TaskInfo.State.queued,
                    vim.TaskInfo.State.running,
                ):
                    out.append(str(o.obj._moId))
            return out

        for moid in self._call(f"{what}: the task list", running):
            try:
                self.wait_task(vim.Task(moid, self.session.si._stub), what, progress)
            except (BackendError, NotFound) as e:
                log.info("%s: task %s: %s", what, moid, e)

    # --- changed block tracking (vCenter only) -------------------------------------------

    def snapshot_change_id(self, ivd: Ivd, snapshot_id: str) -> str | None:
        """The snapshot's changedBlockTrackingId (RetrieveSnapshotDetails); None when changed
        block tracking was off when it was taken. NotSupported on an ESXi host."""
        if self.is_host:
            raise NotSupported(HOST_HAS_NO_CBT)

        def run() -> str | None:
            details = self._vsom.RetrieveSnapshotDetails(
                id=vim.vslm.ID(id=ivd.id),
                datastore=self._ds(ivd.datastore),
                snapshotId=vim.vslm.ID(id=snapshot_id),
            )
            return str(getattr(details, "changedBlockTrackingId", None) or "") or None

        what = f"retrieving details of snapshot {snapshot_id} of IVD {ivd.name or ivd.id}"
        return self._call(what, run)  # type: ignore[no-any-return]

    def changed_areas(self, ivd: Ivd, snapshot_id: str, change_id: str) -> ChangedAreas:
        """What changed in snapshot `snapshot_id` since `change_id` ("*": every allocated
        area), over the IVD's whole capacity: QueryChangedDiskAreas answers a piece at a time
        (startOffset, length), so this asks again from where each answer ends.

        NotSupported when the server refuses for a reason asking again will not change
        (tracking off, an unknown or stale change id, an ESXi host); BackendError otherwise."""
        if self.is_host:
            raise NotSupported(HOST_HAS_NO_CBT)
        name = ivd.name or ivd.id
        what = f"changed areas of IVD {name} snapshot {snapshot_id}"
        if ivd.capacity_bytes <= 0:  # nothing to loop over would read as "no changes"
            raise BackendError(f"{what}: vCenter reports no capacity for the IVD")
        found: list[Extent] = []
        offset = 0
        while offset < ivd.capacity_bytes:

            def run(start: int = offset) -> Any:
                try:
                    return self._vsom.QueryChangedDiskAreas(
                        id=vim.vslm.ID(id=ivd.id),
                        datastore=self._ds(ivd.datastore),
                        snapshotId=vim.vslm.ID(id=snapshot_id),
                        startOffset=start,
                        changeId=change_id,
                    )
                except vim.fault.FileNotFound:
                    raise  # a missing disk file says nothing about tracking: a plain failure
                except vim.fault.FileFault as e:
                    # What vCenter answers for a disk whose tracking is not active (reported
                    # for VM disks; assumed the same for IVDs).
                    raise NotSupported(
                        f"changed block tracking is off for IVD {name} or was when snapshot "
                        f"{snapshot_id} was taken (vCenter: {e.msg or type(e).__name__})"
                    ) from None
                except vmodl.fault.InvalidArgument as e:
                    if getattr(e, "invalidProperty", None) == "changeId":
                        raise NotSupported(
                            f"vCenter refuses change id {change_id!r} for snapshot "
                            f"{snapshot_id} of IVD {name}: tracking was reset since the older "
                            "snapshot, or it is not older"
                        ) from None
                    raise
                except (vmodl.fault.NotSupported, vmodl.fault.MethodNotFound) as e:
                    raise NotSupported(
                        f"the server has no changed-areas query for IVDs ({type(e).__name__}; "
                        "it needs vCenter 6.7 or later)"
                    ) from None

            info = self._call(what, run)
            start, length = int(info.startOffset), int(info.length)
            if start != offset or length <= 0:
                raise BackendError(
                    f"{what}: vCenter answered for {length} bytes at {start} when asked at {offset}"
                )
            found += [(int(a.start), int(a.length)) for a in info.changedArea or []]
            offset = start + length
        return ChangedAreas(change_id, ivd.capacity_bytes, merge(found))

    def changes_between(self, ivd: Ivd, older_id: str, newer_id: str) -> ChangedAreas:
        """What changed from snapshot `older_id` to `newer_id`: the older one's change id,
        then the changed areas of the newer one since it. NotSupported (see changed_areas) also
        when the older snapshot has no change id."""
        change_id = self.snapshot_change_id(ivd, older_id)
        if change_id is None:
            raise NotSupported(
                f"snapshot {older_id} of IVD {ivd.name or ivd.id} has no change id: changed "
                "block tracking was off when it was taken (enable it with the IVD's "
                "enableChangedBlockTracking control flag; later snapshots can be compared)"
            )
        return self.changed_areas(ivd, newer_id, change_id)
