"""Uploads: the per-(file, remote) state machine, backoff, and the pump the scheduler runs.

The state lives in the catalog (attempts, next attempt time, last error, claim); the
scheduler only calls `pump()`, which claims what is due and hands it to a thread pool.
A restart therefore resumes the queue exactly where it was.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .cache import Cache
from .catalog import DB_ERRORS, Catalog, UploadClaim
from .config import UploadConfig
from .errors import CloudManagerError
from .events import Events
from .fetch import TrailingHasher
from .logs import COPY_BAD, FILE_AT_RISK, REMOTE_BACK, REMOTE_DOWN, fields
from .remotes.base import FILE, REMOTE, Cancelled, Remote, RemoteError, SourceMismatch, Transfer

log = logging.getLogger(__name__)

INLINE_CHECK = 1 << 20  # objects up to this size are hashed in one read after they are sent
# A remote with `put_many` gets the small objects due for it in batches of up to BATCH_FILES
# objects of up to BATCH_MAX_SIZE bytes each, made durable together and recorded in one commit.
BATCH_FILES = 64
BATCH_MAX_SIZE = 1 << 20


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Full jitter: uniform between 0 and the exponential bound, so that retries spread out."""
    # the exponent is capped: with max_attempts 0 a pair may fail thousands of times, and
    # 2 ** 1024 no longer converts to a float (OverflowError would wedge the pair as active)
    bound = min(maximum, initial * 2.0 ** min(max(attempt - 1, 0), 1000))
    return rng.uniform(0, bound)


def next_attempt(kind: str, attempts_after: int, policy: UploadConfig, now: float,
                 rng: random.Random) -> float | None:
    """When to try a failed pair again; None gives it up (only `retry` revives it)."""
    if kind == FILE:
        return None
    if policy.retry.max_attempts and attempts_after >= policy.retry.max_attempts:
        return None
    return now + backoff_delay(attempts_after, policy.retry.initial, policy.retry.max, rng)


def choose_targets(order: Sequence[str], unhealthy: Collection[str], redundancy: int, good: Collection[str],
                   pairs: Mapping[str, str]) -> list[str]:
    """The one target policy: which remotes to queue for a file so that its good copies and live
    attempts reach `redundancy`, the first healthy ones in config order.

    A pair that keeps failing ("retrying") keeps retrying but does not count, so the next healthy
    remote is queued beside it: a dead remote never holds redundancy back. A file with nothing yet
    (new) and too few healthy remotes is queued on sick ones too: they retry until fixed.
    """
    in_play = len(set(good)) + sum(1 for r, s in pairs.items() if s in ("queued", "active") and r not in good)
    chosen: list[str] = []
    for remote in order:
        if in_play >= redundancy:
            return chosen
        if remote in pairs or remote in good or remote in unhealthy:
            continue
        chosen.append(remote)
        in_play += 1
    if not pairs and not good:
        for remote in order:
            if in_play >= redundancy:
                break
            if remote not in chosen:
                chosen.append(remote)
                in_play += 1
    return chosen


def stall_verdict(transfer: Transfer, reports_progress: bool, stall: float, min_rate: float,
                  now: float) -> str | None:
    """Why a transfer must be cancelled now, or None to let it run.

    With progress reports: no byte for `stall` seconds, or an average below `min_rate` once
    `stall` has passed. Without them (a subprocess that cannot tell), the whole transfer may
    take `stall` plus the time `min_rate` allows for its size.
    """
    elapsed = now - transfer.started
    if reports_progress:
        if now - transfer.last_change > stall:
            return f"stalled: no progress for {now - transfer.last_change:.0f}s (upload.stall)"
        if min_rate and elapsed > stall and transfer.done / elapsed < min_rate:
            return (f"too slow: {transfer.done / elapsed / 1024:.1f} KiB/s on average, below "
                    f"upload.min_rate {min_rate / 1024:.1f} KiB/s")
        return None
    allowed = stall + (transfer.size / min_rate if min_rate else float("inf"))
    if elapsed > allowed:
        return f"took {elapsed:.0f}s, longer than upload.stall plus its size at upload.min_rate"
    return None


class SendCheck:
    """Hashes an upload's source while the backend reads it, so that no copy of other bytes is ever
    recorded (a cache object rotten on disk, or rewritten through a hard link: issue 10).

    It trails the backend's progress, reading from the page cache the bytes the backend has just
    read, on the other core: no second pass afterwards. For a backend that reports no progress, it
    reads alongside from the start. `confirm()` finishes the hash and raises SourceMismatch.
    """

    def __init__(self, h: str, fd: int, size: int, reports_progress: bool) -> None:
        self.h = h
        self.fd = fd
        self.size = size
        # a small object is hashed in one read at the end (from the page cache): a thread each would
        # cost more than the hash
        self._hasher = TrailingHasher(fd) if size > INLINE_CHECK else None
        self._read = 0
        self._verdict: str | None = None
        if not reports_progress:
            self.advance(size)

    def advance(self, done: int) -> None:
        self._read = min(done, self.size)
        if self._hasher is not None:
            self._hasher.advance(self._read)

    @property
    def read_all(self) -> bool:
        return self._read >= self.size

    def confirm(self, data: bytes | None = None) -> None:
        """`data`: the whole object as the backend sent it from memory (a small one): those very bytes are
        hashed, not the source read again."""
        if self._verdict is None:
            if data is not None and self._hasher is None:
                digest = hashlib.sha256(data).hexdigest() if len(data) == self.size else None
            else:
                digest = self._hasher.finish(self.size) if self._hasher is not None else self._hash_inline()
            self._verdict = "ok" if digest == self.h else (
                f"the cache object holds other bytes (sha256 {digest[:12]})" if digest
                else "the cache object is shorter than the file")
        if self._verdict != "ok":
            raise SourceMismatch(self._verdict)

    def _hash_inline(self) -> str | None:
        data = os.pread(self.fd, self.size, 0)
        return hashlib.sha256(data).hexdigest() if len(data) == self.size else None

    def abandon(self) -> None:
        """Stop hashing (the transfer failed before its end): no verdict."""
        if self._verdict is None:
            if self._hasher is not None:
                self._hasher.finish(min(self._hasher.written, self.size))
            self._verdict = "abandoned"


@dataclass
class _Job:
    """One pair being sent: its source open, hashed as it is read."""
    claim: UploadClaim
    fd: int
    seen: tuple[int, int]  # which object was read: a replacement drops only this one
    check: SendCheck
    transfer: Transfer

    def release(self) -> None:
        self.check.abandon()
        os.close(self.fd)


class Uploader:
    """Sends cached files to remotes, `policy.concurrency` transfers at once."""

    def __init__(self, catalog: Catalog, cache: Cache, remotes: MutableMapping[str, Remote], order: Sequence[str],
                 policy: UploadConfig, lease: float, now: Callable[[], float] = time.time,
                 rng: random.Random | None = None, *,
                 ensure_cached: Callable[[str], None] | None = None, claim_owner: str | None = None,
                 bad_object: Callable[[str, int, str, tuple[int, int] | None], Any] = lambda h, size, why, seen: None,
                 events: Events | None = None,
                 chain_pumps: bool = False) -> None:
        self.catalog = catalog
        # replaces a cache object whose bytes do not match its hash (Scrubber.replace_bad_object)
        self.bad_object = bad_object
        self.cache = cache
        self.remotes = remotes  # shared with fetch, scrub and rm; a reload changes it in place
        self.order = list(order)
        self.policy = policy
        self.lease = lease
        self.now = now
        self.rng = rng or random.Random()
        self.unhealthy: dict[str, str] = {}
        # A remote that comes back makes its pairs in backoff due at once, not after their backoff (up
        # to retry.max). Failures that do not mark a remote unhealthy (a server down looks transient)
        # put it in `_backing_off`, and the probe job probes it: failing, it is `_down` until a probe
        # or a copy succeeds, and then woken. A probe that answers at once (the server came back
        # before it looked, or the pair failed for a reason of its own) wakes it once, then not again
        # until a pair that had failed goes through: a pair that fails on a working remote keeps its backoff.
        self._backing_off: set[str] = set()
        self._down: set[str] = set()
        self._woken_unseen: set[str] = set()
        # "work-queued" (pump now: a remote is healthy again, spares queued) and "copy-made" (room may
        # have appeared in the cache) go out through the node's one event mechanism
        self.events = events if events is not None else Events()
        # bring an evicted file back before re-copying it (self-heal)
        self.ensure_cached = ensure_cached
        # whose name its claims carry: the node's (a daemon), or one API process's, so that a daemon's
        # start-up never frees an API's transfers in flight and the API frees those of a killed script
        self.claim_owner = claim_owner
        self.last_progress = time.monotonic()
        self._active: dict[tuple[str, str], Transfer | None] = {}
        self._tasks = 0  # transfers in the pool: one pair each, or one batch of pairs
        self._pump_lock = threading.Lock()
        # the daemon lets each ending transfer claim the next due pair itself; unit tests and the API
        # leave it off and drive one pump (or one round) at a time
        self.chain_pumps = chain_pumps
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=policy.concurrency, thread_name_prefix="upload")
        self._closed = False

    # -- what the rest of the daemon asks ------------------------------------------------

    def reconfigure(self, policy: UploadConfig, order: Sequence[str]) -> None:
        """A reload: the new policy and remote order apply to the next decisions; remotes no longer
        configured lose their health record."""
        self.policy = policy
        self.order = list(order)
        for name in set(self.unhealthy) - set(order):
            self.unhealthy.pop(name, None)

    def forget_health(self, name: str) -> None:
        """A remote was rebuilt from a new config: its old failures say nothing of the new one, and
        its pairs waiting out a backoff are tried now."""
        self.unhealthy.pop(name, None)
        self._healthy_again(name)

    def _healthy_again(self, name: str) -> None:
        """A remote works again: its pairs waiting in backoff become due now ("remote-healthy")."""
        self._backing_off.discard(name)
        self._down.discard(name)
        woken = self.catalog.wake_remote(name, self.now())
        if woken:
            log.info("remote %s works again: %d upload(s) waiting out a backoff are due now", name, woken)
        self.events.emit("remote-healthy", name)
        self.events.emit("work-queued")

    def targets(self) -> list[str]:
        """The remotes a new file goes to (ingest records them with the file, in one transaction)."""
        return choose_targets(self.order, self.unhealthy, self.policy.redundancy, set(), {})

    def top_up(self, h: str) -> list[str]:
        """Queue spare remotes for a file whose copies and live attempts fall short of `redundancy`."""
        return self.catalog.top_up(
            h, lambda good, pairs: choose_targets(self.order, self.unhealthy, self.policy.redundancy, good, pairs),
            self.now())

    def active_count(self) -> int:
        with self._lock:
            return len(self._active)

    def problems(self) -> list[str]:
        return [f"remote {name}: {message}" for name, message in sorted(self.unhealthy.items())]

    # -- the scheduler's job -------------------------------------------------------------

    def pump(self) -> None:
        """Claim what is due, up to the free transfer slots. Called by the scheduler every second
        and by each transfer as it ends, so that a busy queue never waits for the next tick."""
        self.last_progress = time.monotonic()
        if self._closed:
            return
        with self._pump_lock:  # two pumps at once would both count the same free slots
            with self._lock:
                free = self.policy.concurrency - self._tasks
            if free <= 0:
                return
            batchable = [name for name, remote in list(self.remotes.items()) if hasattr(remote, "put_many")]
            for batch in self.catalog.claim_batches(self.now(), free, self.lease, batchable, BATCH_FILES,
                                                    BATCH_MAX_SIZE, owner=self.claim_owner):
                with self._lock:
                    self._tasks += 1
                    for c in batch:
                        self._active[(c.hash, c.remote)] = None
                self._pool.submit(self._transfer, batch)

    def sync_round(self) -> int:
        """Try every pending pair once, now, in the caller's thread (the Python API's `cloud_sync`).

        Backoff is not waited out. A failure may queue a spare remote for the same file (top_up);
        those spares are tried in the same round. Returns how many transfers were attempted."""
        attempted = 0
        claims = self.catalog.claim_due(self.now(), 1 << 30, self.lease, due_by=float("inf"),
                                        owner=self.claim_owner)
        while claims:
            for claim in claims:
                with self._lock:
                    self._tasks += 1
                    self._active[(claim.hash, claim.remote)] = None
                self._transfer([claim])
                attempted += 1
            claims = self.catalog.claim_due(self.now(), 1 << 30, self.lease, states=("queued",),
                                            owner=self.claim_owner)
        return attempted

    def probe_unhealthy(self) -> None:
        """The probe job (every 10 s): remotes marked unhealthy, and those with pairs put in backoff,
        are probed; one that answers after failing is healthy again (`_healthy_again`)."""
        for name in list(self.unhealthy):
            remote = self.remotes.get(name)
            if remote is None:
                self.unhealthy.pop(name, None)
                continue
            try:
                remote.probe()
            except RemoteError as exc:
                self.unhealthy[name] = str(exc)
                continue
            log.info("remote %s is reachable again", name, extra=fields(remote=name, message_id=REMOTE_BACK))
            self.unhealthy.pop(name, None)
            self._healthy_again(name)
        for name in list(self._backing_off - set(self.unhealthy)):
            remote = self.remotes.get(name)
            if remote is None:
                self._backing_off.discard(name)
                self._down.discard(name)
                continue
            try:
                remote.probe()
            except RemoteError as exc:
                if name not in self._down:
                    log.warning("remote %s does not answer its probe (%s): its uploads wait until it does", name, exc)
                self._down.add(name)
                continue
            if name in self._down:
                log.info("remote %s answers again", name)
                self._healthy_again(name)
            elif name not in self._woken_unseen:
                self._woken_unseen.add(name)
                self._healthy_again(name)
            else:
                self._backing_off.discard(name)

    def _transfer(self, claims: list[UploadClaim]) -> None:
        """One task of the pool: one pair, or a batch of pairs to one remote that has `put_many`."""
        unsettled = list(claims)  # the pairs with no record of their outcome yet
        try:
            # An upload's records only save work (a lost "done" sends the copy again, a lost attempt
            # retries sooner), so its commits need no fsync each: see SqliteDatabase.relax_durability.
            self.catalog.relax_durability()
            try:
                if len(claims) == 1:
                    self._send(claims[0])
                else:
                    self._send_batch(claims, unsettled)
                unsettled = []
            except DB_ERRORS:
                raise
            except Exception:
                log.exception("upload of %s to remote=%s failed unexpectedly",
                              f"hash={claims[0].hash}" if len(claims) == 1 else f"{len(claims)} files",
                              claims[0].remote, extra=fields(remote=claims[0].remote))
                for claim in unsettled:
                    self._failed(claim, RemoteError("internal error (see the log)"))
        except DB_ERRORS as exc:
            # The pairs stay claimed in the catalog: `reclaim` queues them again once their lease has
            # expired, and the health check reports the catalog (issue 10: it used to stay "active").
            log.error("upload of hash=%s to remote=%s: the catalog could not record it (%s); it is queued "
                      "again once its lease expires", claims[0].hash, claims[0].remote, exc,
                      extra=fields(claims[0].hash, claims[0].remote))
        finally:
            with self._lock:
                self._tasks -= 1
                for claim in claims:
                    self._active.pop((claim.hash, claim.remote), None)
            self.last_progress = time.monotonic()
            if self.chain_pumps:
                self.pump()
            else:
                self.events.emit("work-queued")

    def _prepare(self, claim: UploadClaim, remote: Remote, pending: bool = False) -> _Job | None:
        """Open the pair's source and its check; None (the failure recorded) when there is no local copy."""
        try:
            fd = self._open_source(claim.hash)
        except (OSError, CloudManagerError) as exc:
            message = exc.strerror if isinstance(exc, OSError) else str(exc)
            self._failed(claim, RemoteError(f"no local copy to send: {message}"))
            return None
        try:
            st = os.fstat(fd)
            check = SendCheck(claim.hash, fd, claim.size, getattr(remote, "reports_progress", True))
        except BaseException:
            os.close(fd)
            raise
        job = _Job(claim, fd, (st.st_dev, st.st_ino), check, Transfer(claim.size, source=check, pending=pending))
        with self._lock:
            self._active[(claim.hash, claim.remote)] = job.transfer
        return job

    def _settle(self, job: _Job, remote: Remote, url: str | None, exc: RemoteError | None) -> bool:
        """Decide a sent pair's outcome before its source is released: True when the copy may be
        recorded; otherwise the failure (or the bad source) is dealt with here."""
        claim = job.claim
        if exc is None:
            try:
                job.check.confirm()
                return True
            except SourceMismatch as mismatch:
                exc = mismatch
        if isinstance(exc, SourceMismatch):
            self._source_mismatch(claim, remote, url, exc, job.seen)
        elif isinstance(exc, Cancelled):
            if not self._closed:  # stopping is no failure: close() releases the claim uncounted
                self._failed(claim, exc)
        else:
            if job.check.read_all:
                # the backend read every byte: a server that refused them may have refused other bytes
                # (S3 checks the SHA-256), so the source's verdict decides whose fault it was
                try:
                    job.check.confirm()
                except SourceMismatch as mismatch:
                    self._source_mismatch(claim, remote, None, mismatch, job.seen)
                    return False
            self._failed(claim, exc)
        return False

    def _send(self, claim: UploadClaim) -> None:
        remote = self.remotes.get(claim.remote)
        if remote is None:
            self._failed(claim, RemoteError(f"remote {claim.remote} is no longer configured", FILE))
            return
        job = self._prepare(claim, remote)
        if job is None:
            return
        url = None
        started = time.monotonic()
        try:
            try:
                url = remote.put(claim.hash, job.fd, claim.size, job.transfer)
                error = None
            except RemoteError as exc:
                error = exc
            if not self._settle(job, remote, url, error):
                return
        finally:
            job.release()
        assert url is not None
        proven = self.catalog.upload_done(claim.hash, claim.remote, url, claim.size, self.policy.redundancy,
                                          self.now())
        self._recorded(claim, started, proven)

    def _send_batch(self, claims: list[UploadClaim], unsettled: list[UploadClaim]) -> None:
        """Pairs to one remote with `put_many`: sent and made durable together, then every copy it made
        recorded in one commit. A pair that fails is dealt with on its own, as in `_send`."""
        remote = self.remotes.get(claims[0].remote)
        if remote is None:
            for claim in claims:
                self._failed(claim, RemoteError(f"remote {claim.remote} is no longer configured", FILE))
                unsettled.remove(claim)
            return
        jobs: list[_Job] = []
        done: list[tuple[_Job, str]] = []
        started = time.monotonic()
        try:
            for claim in claims:
                job = self._prepare(claim, remote, pending=True)
                if job is None:
                    unsettled.remove(claim)
                else:
                    jobs.append(job)
            try:
                results: list[str | RemoteError] = remote.put_many(
                    [(j.claim.hash, j.fd, j.claim.size, j.transfer) for j in jobs])
            except RemoteError as exc:
                results = [exc] * len(jobs)
            for job, result in zip(jobs, results):
                url, error = (None, result) if isinstance(result, RemoteError) else (result, None)
                if self._settle(job, remote, url, error):
                    done.append((job, url))
                else:
                    unsettled.remove(job.claim)
        finally:
            for job in jobs:
                job.release()
        if not done:
            return
        proven = self.catalog.uploads_done([(j.claim.hash, j.claim.remote, url, j.claim.size) for j, url in done],
                                           self.policy.redundancy, self.now())
        for job, _ in done:
            unsettled.remove(job.claim)
            self._recorded(job.claim, started, proven[job.claim.hash])

    def _recorded(self, claim: UploadClaim, started: float, proven: list[float]) -> None:
        self.events.emit("copy-made", claim.hash)
        self.events.emit("uploaded", claim.hash, claim.remote, claim.size, time.monotonic() - started, proven)
        if claim.attempts:
            # a pair that had failed went through: the remote's failures were an outage, so the next
            # ones may be too (woken again). A first attempt's copy says nothing of them: re-arming on
            # it woke a pair failing on its own at every probe while other files went (a retry storm).
            self._woken_unseen.discard(claim.remote)
        if self.unhealthy.pop(claim.remote, None) is not None:
            log.info("remote %s works again", claim.remote, extra=fields(remote=claim.remote, message_id=REMOTE_BACK))
            self._healthy_again(claim.remote)
        elif claim.remote in self._down:
            self._healthy_again(claim.remote)
        log.info("uploaded hash=%s remote=%s size=%d seconds=%.3f", claim.hash, claim.remote, claim.size,
                 time.monotonic() - started, extra=fields(claim.hash, claim.remote))

    def _source_mismatch(self, claim: UploadClaim, remote: Remote, url: str | None, exc: SourceMismatch,
                         seen: tuple[int, int]) -> None:
        """What was sent is not the file: record nothing, take back what the remote holds, and replace
        the cache object (fetched back from a good copy; kept and reported when it is the only one)."""
        log.error("upload of hash=%s to remote=%s stopped: %s; nothing is recorded", claim.hash, claim.remote, exc,
                  extra=fields(claim.hash, claim.remote, message_id=COPY_BAD))
        if url is not None:
            try:
                remote.delete(claim.hash, url)
            except RemoteError as error:
                log.warning("remote %s: could not delete the copy of hash=%s just written with the wrong "
                            "bytes: %s", claim.remote, claim.hash, error, extra=fields(claim.hash, claim.remote))
        now = self.now()
        self.catalog.upload_failed(claim.hash, claim.remote, str(exc),
                                   now + backoff_delay(claim.attempts + 1, self.policy.retry.initial,
                                                       self.policy.retry.max, self.rng),
                                   now, charge=False)
        self.bad_object(claim.hash, claim.size, str(exc), seen)

    def _open_source(self, h: str) -> int:
        try:
            return self.cache.open_object(h)
        except FileNotFoundError:
            if self.ensure_cached is None:
                raise
        self.ensure_cached(h)
        return self.cache.open_object(h)

    def _failed(self, claim: UploadClaim, exc: RemoteError) -> None:
        attempts = claim.attempts + 1
        now = self.now()
        when = next_attempt(exc.kind, attempts, self.policy, now, self.rng)
        if exc.kind == REMOTE:
            if self.unhealthy.get(claim.remote) != str(exc):
                log.error("remote %s: %s", claim.remote, exc, extra=fields(remote=claim.remote, message_id=REMOTE_DOWN))
            self.unhealthy[claim.remote] = str(exc)
        if when is None:
            log.error("gave up uploading hash=%s to remote=%s after %d attempt(s): %s "
                      "(cloudmanagerctl retry %s)", claim.hash, claim.remote, attempts, exc, claim.hash[:12],
                      extra=fields(claim.hash, claim.remote, attempts, FILE_AT_RISK))
        else:
            log.warning("upload of hash=%s to remote=%s failed (attempt=%d, next in %.0fs): %s",
                        claim.hash, claim.remote, attempts, when - now, exc,
                        extra=fields(claim.hash, claim.remote, attempts))
        self.catalog.upload_failed(claim.hash, claim.remote, str(exc), when, now)
        if when is not None:
            self._backing_off.add(claim.remote)
        self.top_up(claim.hash)

    def reclaim(self) -> int:
        """The scheduler's job: renew the leases of pairs in flight, and queue again the pairs this node
        still holds as "active" though nothing sends them (a failed catalog write ended their
        transfer without a record). Returns how many were taken back."""
        with self._pump_lock:  # no pump between its claim's commit and its entry in _active
            with self._lock:
                in_flight = set(self._active)
            released = self.catalog.refresh_claims(self.now(), self.lease, in_flight)
        if released:
            log.warning("took back %d upload(s) left active with no transfer running (their lease expired); "
                        "queued again", released)
            self.events.emit("work-queued")
        return released

    def check_stalls(self) -> None:
        """The scheduler's watch over transfers in flight: a hung remote never freezes the queue."""
        now = time.monotonic()
        with self._lock:
            active = [(key, t) for key, t in self._active.items()
                      if t is not None and not t.cancelled and not t.pending]
        for (h, name), transfer in active:
            remote = self.remotes.get(name)
            reason = stall_verdict(transfer, getattr(remote, "reports_progress", True), self.policy.stall,
                                   self.policy.min_rate, now)
            if reason:
                log.warning("cancelling the upload of hash=%s to remote=%s: %s", h, name, reason, extra=fields(h, name))
                transfer.cancel(reason)

    def heal(self) -> int:
        """Queue new copies for files below redundancy with nothing queued (after a copy went bad,
        a remote was removed, or a reload raised the redundancy)."""
        queued = sum(bool(self.top_up(h)) for h in self.catalog.under_replicated(self.policy.redundancy))
        if queued:
            log.info("queued new copies for %d file(s) below redundancy", queued)
            self.events.emit("work-queued")
        return queued

    def close(self) -> None:
        """Stop transfers in flight (they are retried after the restart) and release their claims.
        Once: the daemon closes the uploader first (to log a failed release), then the node again."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for transfer in self._active.values():
                if transfer is not None:
                    transfer.cancel("the daemon is stopping")
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.catalog.release_claims(self.now(), self.claim_owner)
