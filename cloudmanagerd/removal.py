"""`rm`: forget a file for good, from the cache, every remote, then the catalog.

The file is marked "removing" first; a restart finishes a half-done removal (`resume`).
A remote that cannot delete (a file locker without a delete command) forgets the copy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .cache import Cache
from .catalog import Catalog
from .eviction import Evictor
from .errors import CloudManagerError
from .logs import fields
from .remotes.base import Remote, RemoteError

log = logging.getLogger(__name__)


class Remover:
    def __init__(self, cache: Cache, catalog: Catalog, remotes: Mapping[str, Remote], evictor: Evictor) -> None:
        self.evictor = evictor  # the one path by which an object leaves the cache
        self.cache = cache
        self.catalog = catalog
        self.remotes = remotes

    def remove(self, h: str) -> dict[str, object]:
        size = self.catalog.file_size(h)
        if size is None:
            raise CloudManagerError(f"no file with hash {h}")
        self.catalog.begin_remove(h)
        if self.catalog.cached_here([h]):
            self.evictor.drop([(h, size)])
        failed = []
        for name, url in self.catalog.all_copies(h):
            remote = self.remotes.get(name)
            try:
                if remote is not None:
                    remote.delete(h, url)
            except RemoteError as exc:
                failed.append(f"{name}: {exc}")
                continue
            self.catalog.forget_copy(h, name)
        if failed:
            raise CloudManagerError(f"rm {h[:12]}: removed here, but not yet from {'; '.join(failed)} "
                                    "(it is retried at the next start or rm)")
        self.catalog.finish_remove(h)
        log.info("removed hash=%s from the cache, every remote and the catalog", h, extra=fields(h))
        return {"hash": h, "removed": True}

    def resume(self) -> None:
        for h in self.catalog.removing():
            try:
                self.remove(h)
            except CloudManagerError as exc:
                log.warning("%s", exc)
