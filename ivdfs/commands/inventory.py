"""`ivdfs ls` and `ivdfs snapshot create|delete`: what vCenter holds, as tables or JSON.

Main thread only; every call blocks on vCenter.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ivdfs.commands.common import human_size, progress, progress_count, session, table
from ivdfs.config import ServerConfig
from ivdfs.errors import BackendError, ExitCode, UserError
from ivdfs.inventory.model import Ivd, Snapshot, creation_order
from ivdfs.tree import info
from ivdfs.tree.naming import time_label


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, ensure_ascii=False))


def ls(server: ServerConfig, datastore: str | None, ivd: str | None, as_json: bool) -> int:
    with session(server) as vs:
        if datastore is None:
            rows = [(ds, len(vs.list_ivds(ds))) for ds in vs.datastores()]
            if as_json:
                _print_json([{"name": d.name, "moref": d.moref, "ivds": n} for d, n in rows])
            else:
                print(
                    table(
                        ["DATASTORE", "MOREF", "IVDS"], [[d.name, d.moref, str(n)] for d, n in rows]
                    )
                )
            return ExitCode.OK
        ds = vs.find_datastore(datastore)
        if ivd is None:
            ivds = [(v, vs.snapshots(v)) for v in vs.all_ivds(ds)]
            if as_json:
                _print_json([{**info.ivd_fields(v), "snapshots": len(s)} for v, s in ivds])
                return ExitCode.OK
            headers = ["NAME", "UUID", "CAPACITY", "DATASTORE", "CREATED", "SNAPSHOTS", "ATTACHED"]
            print(
                table(
                    headers,
                    [
                        [
                            v.name,
                            v.id,
                            human_size(v.capacity_bytes),
                            v.datastore.name,
                            time_label(v.create_time),
                            str(len(s)),
                            ",".join(v.consumers) or "-",
                        ]
                        for v, s in ivds
                    ],
                )
            )
            return ExitCode.OK
        target = vs.find_ivd(ivd, ds)
        snaps = sorted(vs.snapshots(target), key=creation_order)
        if as_json:
            _print_json([info.snapshot_fields(s) for s in snaps])
        else:
            rows2 = [[s.id, time_label(s.create_time), s.description] for s in snaps]
            print(table(["SNAPSHOT", "CREATED", "DESCRIPTION"], rows2))
        return ExitCode.OK


def snapshot_create(server: ServerConfig, ivd_text: str, description: str) -> int:
    with session(server) as vs:
        ivd = vs.find_ivd(ivd_text)
        what = f"creating a snapshot of IVD {ivd.name or ivd.id}"
        try:
            with progress(what) as update:
                snap = vs.create_snapshot(ivd, description, update)
        except BackendError as e:
            raise UserError(str(e), ExitCode.VSPHERE) from None
        print(snap.id)  # alone on stdout, for scripts: id=$(ivdfs snapshot create ...)
        if sys.stderr.isatty():
            print(f"created snapshot {snap.id} of IVD {ivd.name} ({ivd.id})", file=sys.stderr)
        return ExitCode.OK


def snapshot_delete(server: ServerConfig, ivd_text: str, snapshot_id: str) -> int:
    with session(server) as vs:
        ivd = vs.find_ivd(ivd_text)
        vs.find_snapshot(ivd, snapshot_id)  # a clear "no such snapshot" before any task
        what = f"deleting snapshot {snapshot_id} of IVD {ivd.name or ivd.id}"
        try:
            with progress(what) as update:
                vs.delete_snapshot(ivd, snapshot_id, update)
        except BackendError as e:
            raise UserError(str(e), ExitCode.VSPHERE) from None
        print(f"deleted snapshot {snapshot_id} of IVD {ivd.name} ({ivd.id})")
        return ExitCode.OK


def ls_all(server: ServerConfig, as_json: bool) -> int:
    """Every datastore's IVDs with their snapshots, in one command."""
    with session(server) as vs:
        stores = vs.datastores()
        rows: list[tuple[Ivd, list[Snapshot]]] = []
        with progress_count("listing IVDs") as step:
            for ds in stores:
                for ivd in vs.all_ivds(ds):
                    rows.append((ivd, sorted(vs.snapshots(ivd), key=creation_order)))
                    step()
        if as_json:
            _print_json(
                [
                    {**info.ivd_fields(v), "snapshots": [info.snapshot_fields(s) for s in snaps]}
                    for v, snaps in rows
                ]
            )
            return ExitCode.OK
        headers = ["DATASTORE", "NAME", "UUID", "CAPACITY", "SNAPSHOT", "CREATED", "DESCRIPTION"]
        table_rows = []
        for v, snaps in rows:
            base = [v.datastore.name, v.name, v.id, human_size(v.capacity_bytes)]
            if not snaps:
                table_rows.append([*base, "-", "", ""])
            for s in snaps:
                table_rows.append([*base, s.id, time_label(s.create_time), s.description])
        print(table(headers, table_rows))
        return ExitCode.OK
