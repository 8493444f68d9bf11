"""`ivdfs ls` and `ivdfs snapshot create|delete`: what vCenter holds, as tables or JSON.

Main thread only; every call blocks on vCenter.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ivdfs.commands.common import human_size, progress, progress_count, session, table
from ivdfs.config import ServerConfig
from ivdfs.errors import ExitCode, NotFound
from ivdfs.inventory.model import Ivd, IvdSummary, Snapshot, creation_order
from ivdfs.tree import info
from ivdfs.tree.naming import time_label


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, ensure_ascii=False))


def ls(
    server: ServerConfig, datastore: str | None, ivd: str | None, as_json: bool, pool: int
) -> int:
    with session(server, pool) as vs:
        if datastore is None:
            stores = vs.datastores()
            rows = list(zip(stores, vs.session.map(lambda d: len(vs.list_ivds(d)), stores),
                            strict=True))  # fmt: skip
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
            with progress_count(f"listing IVDs of {ds.name}") as step:
                summaries = vs.summaries(ds)
                counts = vs.snapshot_counts(summaries)
                step(len(counts))
            ivds = sorted(counts, key=lambda c: (c[0].name, c[0].datastore.name, c[0].id))
            attached = vs.attached_vms([v for v, _ in ivds])
            if as_json:
                _print_json(
                    [
                        {**info.ivd_fields(v),
                         "attached_vms": list(attached[v.id]) if attached is not None else None,
                         "snapshots": n}
                        for v, n in ivds
                    ]
                )  # fmt: skip
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
                            str(n),
                            "" if attached is None else ",".join(attached[v.id]) or "-",
                        ]
                        for v, n in ivds
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
        with progress(what) as update:
            snap = vs.create_snapshot(ivd, description, update)
        print(snap.id)  # alone on stdout, for scripts: id=$(ivdfs snapshot create ...)
        if sys.stderr.isatty():
            print(f"created snapshot {snap.id} of IVD {ivd.name} ({ivd.id})", file=sys.stderr)
        return ExitCode.OK


def snapshot_delete(server: ServerConfig, ivd_text: str, snapshot_id: str) -> int:
    with session(server) as vs:
        ivd = vs.find_ivd(ivd_text)
        vs.find_snapshot(ivd, snapshot_id)  # a clear "no such snapshot" before any task
        what = f"deleting snapshot {snapshot_id} of IVD {ivd.name or ivd.id}"
        with progress(what) as update:
            vs.delete_snapshot(ivd, snapshot_id, update)
        print(f"deleted snapshot {snapshot_id} of IVD {ivd.name} ({ivd.id})")
        return ExitCode.OK


def ls_all(server: ServerConfig, as_json: bool, pool: int) -> int:
    """Every datastore's IVDs with their snapshots, in one command: one listing per
    datastore, then the snapshots of every IVD that has any, on the session's pool."""
    with session(server, pool) as vs:
        rows: list[tuple[Ivd, list[Snapshot]]] = []
        with progress_count("listing IVDs") as step:
            for ds in vs.datastores():
                summaries = vs.summaries(ds)

                def with_snapshots(s: IvdSummary) -> tuple[Ivd, list[Snapshot]]:
                    if s.snapshot_count == 0:
                        found: list[Snapshot] = []
                    else:
                        found = vs.snapshots_of(s.ivd.datastore, s.ivd.id)
                    step(1)
                    return s.ivd, sorted(found, key=creation_order)

                rows += vs.session.map(with_snapshots, summaries, skip=NotFound)
        rows.sort(key=lambda r: (r[0].datastore.name, r[0].name, r[0].id))
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
