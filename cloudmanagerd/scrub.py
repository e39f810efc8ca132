"""Verify and scrub: find rotten or missing copies, in the cache and on the remotes, and replace them.

`verify_cache` re-hashes every cache object; `verify_remotes` checks that every recorded
copy still exists with the right size; `step` does a bounded amount of both, so that the
scheduler can run it with a byte budget per hour (`cache.scrub`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from .cache import Cache
from .catalog import Catalog
from .errors import CloudManagerError
from .fetch import Fetcher, ProgressFn
from .hashing import sha256_fd
from .logs import FILE_AT_RISK, fields
from .remotes.base import Remote, RemoteError

log = logging.getLogger(__name__)

REMOTE_CHECKS_PER_STEP = 20
# A folder remote's temp file younger than this may be another node's upload still running.
LEFTOVER_AGE = 3600.0


class Scrubber:
    def __init__(self, cache: Cache, catalog: Catalog, remotes: Mapping[str, Remote], fetcher: Fetcher,
                 now: Callable[[], float] = time.time) -> None:
        self.cache = cache
        self.catalog = catalog
        self.remotes = remotes
        self.fetcher = fetcher
        self.now = now

    # -- the cache -------------------------------------------------------------------------

    def check_object(self, h: str, size: int, report: dict[str, int]) -> None:
        seen = None
        try:
            fd = self.cache.open_object(h)
        except FileNotFoundError:
            problem = "missing"
        else:
            try:
                st = os.fstat(fd)
                seen = (st.st_dev, st.st_ino)
                problem = None if st.st_size == size and sha256_fd(fd) == h else "corrupt"
            finally:
                os.close(fd)
        report["checked"] += 1
        if problem is None:
            self.fetcher.damaged.pop(h, None)
            self.catalog.mark_cache_verified(h, self.now())
            return
        report[problem] += 1
        if h in self.fetcher.damaged:  # known, kept, reported: check it again later, quietly
            self.catalog.mark_cache_verified(h, self.now())
            return
        outcome = self._replace(h, size, seen, f"is {problem}")
        # a kept damaged object counts as lost: the file's right bytes are nowhere
        report["lost" if outcome == "kept" else outcome] += 1

    def replace_bad_object(self, h: str, size: int, why: str, seen: tuple[int, int] | None) -> str:
        """For an upload that hashed what it sent and found other bytes: the object it read (`seen`)
        goes through the one replacement path (`Fetcher.replace`); "refetched", "lost" or "kept"."""
        return self._replace(h, size, seen, why)

    def _replace(self, h: str, size: int, seen: tuple[int, int] | None, why: str) -> str:
        try:
            return self.fetcher.replace(h, size, seen, why)
        except CloudManagerError as exc:
            log.error("hash=%s could not be restored: %s", h, exc, extra=fields(h, message_id=FILE_AT_RISK))
            return "lost"

    def problems(self) -> list[str]:
        damaged = sorted(self.fetcher.damaged)
        if not damaged:
            return []
        shown = ", ".join(h[:12] for h in damaged[:3]) + (" ..." if len(damaged) > 3 else "")
        return [f"damaged cache object, the only copy, kept and not uploaded (see the log): {shown}"]

    def clean_leftovers(self, now: float | None = None, min_age: float = LEFTOVER_AGE) -> int:
        """Remove what killed uploads left on the remotes that can tell (temp files of folder remotes)."""
        now = self.now() if now is None else now
        removed = 0
        for name, remote in list(self.remotes.items()):
            clean = getattr(remote, "clean_leftovers", None)
            if clean is None:
                continue
            try:
                n = clean(now, min_age)
            except RemoteError as exc:
                log.warning("remote %s: cannot clean up leftovers of killed uploads: %s", name, exc,
                            extra=fields(remote=name))
                continue
            if n:
                log.info("remote %s: removed %d temp file(s) left by killed uploads", name, n,
                         extra=fields(remote=name))
            removed += n
        return removed

    def verify_cache(self, progress: ProgressFn | None = None) -> dict[str, int]:
        report = {"checked": 0, "missing": 0, "corrupt": 0, "refetched": 0, "lost": 0}
        total = self.catalog.cache_usage()[1]
        after = ""
        while batch := self.catalog.cached_entries(after):
            for h, size in batch:
                self.check_object(h, size, report)
                if progress:
                    progress(report["checked"], total)
            after = batch[-1][0]
        return report

    # -- the remotes -------------------------------------------------------------------------

    def check_copy(self, h: str, remote_name: str, url: str, size: int, report: dict[str, int]) -> None:
        remote = self.remotes.get(remote_name)
        if remote is None:
            return
        report["checked"] += 1
        try:
            found = remote.exists(h, url)
        except RemoteError as exc:
            report["unreachable"] += 1
            log.warning("cannot check the copy of hash=%s on remote=%s: %s", h, remote_name, exc,
                        extra=fields(h, remote_name))
            return
        if found is None or (found >= 0 and found != size):
            why = "missing" if found is None else f"has {found} bytes instead of {size}"
            report["bad"] += 1
            self.fetcher.bad_copy(h, remote_name, f"copy of {h[:12]} is {why}")
            return
        self.catalog.mark_copy_verified(h, remote_name, self.now())

    def verify_remotes(self, progress: ProgressFn | None = None) -> dict[str, int]:
        report = {"checked": 0, "bad": 0, "unreachable": 0}
        copies = self.catalog.copies_to_check(limit=-1)
        for i, (h, remote, url, size) in enumerate(copies, 1):
            self.check_copy(h, remote, url, size, report)
            if progress:
                progress(i, len(copies))
        return report

    # -- the budgeted background scrub -----------------------------------------------------

    def step(self, byte_budget: int) -> dict[str, Any]:
        report = {"checked": 0, "missing": 0, "corrupt": 0, "refetched": 0, "lost": 0}
        spent = 0
        for h, size in self.catalog.scrub_candidates(limit=1000):
            if spent and spent + size > byte_budget:
                break
            self.check_object(h, size, report)
            spent += size
        remote_report = {"checked": 0, "bad": 0, "unreachable": 0}
        for h, remote, url, size in self.catalog.copies_to_check(REMOTE_CHECKS_PER_STEP):
            self.check_copy(h, remote, url, size, remote_report)
        return {"cache": report, "remotes": remote_report, "bytes": spent}
