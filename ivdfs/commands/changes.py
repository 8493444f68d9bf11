"""`ivdfs changes IVD OLDER NEWER`: what changed between two snapshots, as a table or JSON.

The JSON is byte for byte what a mount shows as <NEWER>/changes/<OLDER>.json. When the server
cannot answer (tracking off, a refused change id, an ESXi host), one line says why and the exit
code is 12; with --json the document carries the same reason in "error".

Main thread only; every call blocks on vCenter.
"""

from __future__ import annotations

import sys

from ivdfs.commands.common import human_size, session, table
from ivdfs.config import ServerConfig
from ivdfs.errors import ExitCode, NotSupported, UsageError
from ivdfs.inventory.changes import ChangedAreas, changes_json
from ivdfs.inventory.model import creation_order


def changes(
    server: ServerConfig, ivd_text: str, older_id: str, newer_id: str, as_json: bool
) -> int:
    with session(server) as vs:
        ivd = vs.find_ivd(ivd_text)
        older = vs.find_snapshot(ivd, older_id)
        newer = vs.find_snapshot(ivd, newer_id)
        if creation_order(older) >= creation_order(newer):
            raise UsageError(f"snapshot {older_id} is not older than {newer_id}: give OLDER first")
        try:
            areas = vs.changes_between(ivd, older.id, newer.id)
        except NotSupported as e:
            if as_json:
                sys.stdout.write(changes_json(ivd, older.id, newer.id, None, str(e)).decode())
            raise
        if as_json:
            sys.stdout.write(changes_json(ivd, older.id, newer.id, areas).decode())
        else:
            print(_table(areas))
        return ExitCode.OK


def _table(areas: ChangedAreas) -> str:
    rows = [[str(s), str(n), str(s + n)] for s, n in areas.extents]
    total = areas.changed_bytes
    share = 100.0 * total / areas.covered if areas.covered else 0.0
    summary = (
        f"{len(areas.extents)} extent{'s' if len(areas.extents) != 1 else ''}, "
        f"{human_size(total)} ({total} bytes, {share:.2f} %) changed of "
        f'{human_size(areas.covered)}; change id "{areas.change_id}"'
    )
    if not rows:
        return summary
    return table(["OFFSET", "LENGTH", "END"], rows) + "\n" + summary
