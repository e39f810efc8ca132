"""Operations that several faces share: the control socket maps JSON onto them, the Python API calls them.

Each takes the parts it works on as arguments and `now` as a parameter; none starts a thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .catalog import Catalog
from .exchange import MAX_TEXT, dump, parse

log = logging.getLogger(__name__)

# An exported entry that no `data_load` confirmed is offered again after an hour (the original's rule).
EXPORT_RETRY = 3600.0
_MIN_ENTRY = 100  # no exchange entry is shorter: bounds how many rows an export with a limit reads


def export(catalog: Catalog, min_copies: int, limit: int | None, now: float) -> tuple[str | None, int]:
    """(JSON text of the files due for export, at most `limit` bytes, how many); marks them exported.
    `(None, 0)` when nothing is due or not even one entry fits."""
    # a limit past what any catalog holds is no limit (SQLite's LIMIT takes 64-bit integers only)
    rows = None if limit is None or limit >= _MIN_ENTRY << 62 else limit // _MIN_ENTRY + 1
    entries = list(catalog.export_queue(min_copies, now, EXPORT_RETRY, limit=rows))
    text, count = dump(entries, limit)
    if text is not None:
        catalog.mark_exported([e.filehash for e in entries[:count]], now)
    return text, count


def import_(catalog: Catalog, text: str | bytes, local_remotes: Iterable[str], source: str | None, now: float,
            max_bytes: int | None = MAX_TEXT) -> dict[str, int]:
    """Import an exchange text, all or nothing: ExchangeError or ImportConflict name what is wrong."""
    entries = parse(text, max_bytes)
    if not entries:
        return {"files": 0, "new": 0, "copies": 0}
    counts = catalog.import_entries(entries, local_remotes, source, now)
    log.info("imported %d file(s), %d new, %d copies on this node's remotes%s", counts["files"], counts["new"],
             counts["copies"], f", source={source}" if source else "")
    return counts
