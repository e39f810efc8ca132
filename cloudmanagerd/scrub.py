"""Verify and scrub: find rotten or missing copies, in the cache and on the remotes, and replace them.

`verify_cache` re-hashes every cache object; `verify_remotes` checks every recorded copy,
quickly (it exists with the right size) or deeply (read back and hashed); `step` does a bounded
amount of both, so that the scheduler runs it with byte budgets: `cache.scrub` for the cache,
`scrub.remote_read` for copies read back from the remotes, the one proven longest ago first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .cache import Cache
from .catalog import Catalog
from .errors import CloudManagerError
from .fetch import Fetcher, ProgressFn
from .hashing import HASH_CHUNK, sha256_fd
from .logs import FILE_AT_RISK, fields
from .remotes.base import MISSING, Cancelled, Remote, RemoteError, Transfer

log = logging.getLogger(__name__)

REMOTE_CHECKS_PER_STEP = 20
# the scrub's remote budget carries over this many ticks at most (a day of one-minute ticks)
REMOTE_CARRY_STEPS = 1440
# a remote the scrub could not read is left alone this long (seconds), so that its copies, the oldest
# proofs while it is down, do not hold back the other remotes' turn
UNREACHABLE_PAUSE = 600.0
# A folder remote's temp file younger than this may be another node's upload still running.
LEFTOVER_AGE = 3600.0
QUICK, DEEP = "quick", "deep"


def read_back(remote: Remote, h: str, url: str, transfer: Transfer | None = None) -> tuple[str, int]:
    """(sha256, size) of a remote copy, read through the backend's own `get` (the one reader fetch
    uses) into a pipe and hashed as it flows: memory stays at a pipe's worth, and no disk is used.
    RemoteError as `get` raises it (Cancelled once `transfer` is cancelled)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    digest = hashlib.sha256()
    count = 0

    def drain() -> None:  # always reads to the end: the writer never blocks on a full pipe
        nonlocal count
        while data := os.read(r, HASH_CHUNK):
            digest.update(data)
            count += len(data)

    reader = threading.Thread(target=drain, name="scrub-hash", daemon=True)
    reader.start()
    try:
        remote.get(h, url, w, transfer)
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    return digest.hexdigest(), count


class Scrubber:
    def __init__(self, cache: Cache, catalog: Catalog, remotes: Mapping[str, Remote], fetcher: Fetcher,
                 now: Callable[[], float] = time.time) -> None:
        self.cache = cache
        self.catalog = catalog
        self.remotes = remotes
        self.fetcher = fetcher
        self.now = now
        self.remote_credit = 0.0  # bytes the background scrub may still read from remotes (see step)
        self._paused: dict[str, float] = {}  # remote -> monotonic time until which the scrub skips it
        # (hash, remote) -> the same, for a copy that could not be read while its remote answers (an
        # archived S3 object): the one proven longest ago, it would come first at every tick
        self._unreadable: dict[tuple[str, str], float] = {}
        # deep reads in progress, cancelled by stop(): a daemon stopping never waits for a large copy
        self._reads: set[Transfer] = set()
        self._reads_lock = threading.Lock()
        self.stopped = False

    def stop(self) -> None:
        """No more remote checks: reads in progress are cancelled, loops end at their next copy."""
        self.stopped = True
        with self._reads_lock:
            for transfer in self._reads:
                transfer.cancel("the daemon is stopping")

    def _read_back(self, remote: Remote, h: str, url: str, size: int) -> tuple[str, int]:
        transfer = Transfer(size)
        with self._reads_lock:
            if self.stopped:
                raise Cancelled("the daemon is stopping")
            self._reads.add(transfer)
        try:
            return read_back(remote, h, url, transfer)
        finally:
            with self._reads_lock:
                self._reads.discard(transfer)

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

    def check_copy(self, h: str, remote_name: str, url: str, size: int, report: dict[str, Any],
                   depth: str = QUICK) -> int:
        """Check one copy, quickly (exists, size) or deeply (read back and hashed); a bad one goes
        through the one bad-copy path (`Fetcher.bad_copy`). Returns the bytes read from the remote."""
        remote = self.remotes.get(remote_name)
        if remote is None:
            return 0
        mine = report.setdefault("per_remote", {}).setdefault(
            remote_name, {"depth": depth, "checked": 0, "bad": 0, "unreachable": 0})
        for counts in (report, mine):
            counts["checked"] += 1
        read = 0
        try:
            found = remote.exists(h, url)
            if depth == DEEP and found is not None and (found < 0 or found == size):
                digest, read = self._read_back(remote, h, url, size)
                if digest != h or read != size:
                    why = f"holds other bytes (sha256 {digest[:12]}, {read} bytes)"
                    self._bad(h, remote_name, why, report, mine)
                    return read
        except RemoteError as exc:
            if exc.kind == MISSING:
                found = None
            else:
                for counts in (report, mine):
                    counts["unreachable"] += 1
                log.warning("cannot check the copy of hash=%s on remote=%s: %s", h, remote_name, exc,
                            extra=fields(h, remote_name))
                return read
        if found is None or (found >= 0 and found != size):
            self._bad(h, remote_name, "is missing" if found is None else f"has {found} bytes instead of {size}",
                      report, mine)
            return read
        if depth == DEEP:
            self.catalog.mark_copy_proven(h, remote_name, self.now())
        else:
            self.catalog.mark_copy_verified(h, remote_name, self.now())
        return read

    def _bad(self, h: str, remote_name: str, why: str, report: dict[str, Any], mine: dict[str, Any]) -> None:
        for counts in (report, mine):
            counts["bad"] += 1
        self.fetcher.bad_copy(h, remote_name, f"copy of {h[:12]} {why}")

    def _answers(self, name: str) -> bool:
        remote = self.remotes.get(name)
        try:
            if remote is not None:
                remote.probe()
        except RemoteError:
            return False
        return remote is not None

    def verify_remotes(self, progress: ProgressFn | None = None, deep: bool = False) -> dict[str, Any]:
        """Every good copy checked; the report says the depth, in all and per remote."""
        depth = DEEP if deep else QUICK
        report: dict[str, Any] = {"depth": depth, "checked": 0, "bad": 0, "unreachable": 0, "bytes_read": 0,
                                  "per_remote": {}}
        copies = self.catalog.copies_to_check(limit=-1)
        for i, (h, remote, url, size) in enumerate(copies, 1):
            if self.stopped:
                break
            report["bytes_read"] += self.check_copy(h, remote, url, size, report, depth)
            if progress:
                progress(i, len(copies))
        return report

    # -- the budgeted background scrub -----------------------------------------------------

    def step(self, byte_budget: int, remote_budget: int = 0) -> dict[str, Any]:
        """One scheduler tick: up to `byte_budget` bytes of cache objects re-hashed, and remote copies
        read back for `remote_budget` bytes (the one proven longest ago first). An unspent remote budget
        carries over up to a day's worth, and a copy larger than what is left is still read, the excess
        paid back by the next ticks: every copy gets its turn and the rate holds on average. Without a
        remote budget, REMOTE_CHECKS_PER_STEP copies get a quick check instead (none when both budgets are 0)."""
        report = {"checked": 0, "missing": 0, "corrupt": 0, "refetched": 0, "lost": 0}
        spent = 0
        for h, size in self.catalog.scrub_candidates(limit=1000) if byte_budget > 0 else ():
            if spent and spent + size > byte_budget:
                break
            self.check_object(h, size, report)
            spent += size
        if remote_budget <= 0 and byte_budget <= 0:
            return {"cache": report, "remotes": {"depth": QUICK, "checked": 0, "bad": 0, "unreachable": 0},
                    "bytes": 0}
        if remote_budget <= 0:
            remote_report: dict[str, Any] = {"depth": QUICK, "checked": 0, "bad": 0, "unreachable": 0}
            for h, remote, url, size in self.catalog.copies_to_check(REMOTE_CHECKS_PER_STEP):
                self.check_copy(h, remote, url, size, remote_report)
            return {"cache": report, "remotes": remote_report, "bytes": spent}
        remote_report = {"depth": DEEP, "checked": 0, "bad": 0, "unreachable": 0, "bytes_read": 0}
        self.remote_credit = min(self.remote_credit + remote_budget, remote_budget * REMOTE_CARRY_STEPS)
        if self.remote_credit > 0:
            clock = time.monotonic()
            self._paused = {r: until for r, until in self._paused.items() if until > clock}
            self._unreadable = {k: until for k, until in self._unreadable.items() if until > clock}
            for h, remote, url, size in self.catalog.copies_to_prove(REMOTE_CHECKS_PER_STEP + len(self._unreadable),
                                                                     sorted(self._paused)):
                if self.remote_credit <= 0 or self.stopped:
                    break
                if remote in self._paused or (h, remote) in self._unreadable:
                    continue
                unreachable = remote_report["unreachable"]
                read = self.check_copy(h, remote, url, size, remote_report, DEEP)
                if remote_report["unreachable"] > unreachable:
                    if self._answers(remote):
                        self._unreadable[(h, remote)] = clock + UNREACHABLE_PAUSE
                    else:
                        self._paused[remote] = clock + UNREACHABLE_PAUSE
                # a copy that could not be read costs its size all the same
                self.remote_credit -= max(read, size, 1)
                remote_report["bytes_read"] += read
        return {"cache": report, "remotes": remote_report, "bytes": spent}
