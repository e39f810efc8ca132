"""The composition root: build every part from the config, start in order, stop in reverse."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from . import __version__, health, jobs
from .catalog import DB_ERRORS, Catalog
from .catalog.migrate import copy_catalog
from .config import Config, ConfigError, catalog_sqlite_path, load_config, load_or_report
from .control import ControlServer, node_commands
from .errors import CloudManagerError, StartupError, explain_oserror
from .events import Events
from .inbox import SYSCTL_HINTS, InboxRoot, InboxWatcher, PendingQueue, scan, stat_in
from .ingest import Ingestor, IngestWorker
from .logs import FILE_SAFE, fields, setup_logging
from .metrics import Metrics
from .node import Node, build_remotes
from .notify import Notifier
from .preflight import inbox_link_problem, preflight, promise_warnings
from .rejects import Rejector
from .remotes import build_remote
from .snapshots import Snapshotter
from .status import build_status, human_size, summary_line
from .urls import safe_url, scrub

log = logging.getLogger("cloudmanagerd")

DEFAULT_CONFIG = "/etc/cloudmanagerd/config.yaml"
SAFE_WINDOW = 60.0  # seconds: longer than a recorded copy ever waits for its "uploaded" handler
STOP_SNAPSHOT_BUDGET = 45.0  # seconds the stop's catalog snapshot may spend uploading


class Daemon:
    """Every part of a running cloudmanagerd, wired together."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = time.time()
        self.state = "starting"
        self.notifier = Notifier()
        self._stack = contextlib.ExitStack()
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self._reload_lock = threading.Lock()
        self._safe_lock = threading.Lock()
        self._said_safe: dict[str, float] = {}  # hash -> when it was said safe, for SAFE_WINDOW
        self.reload_error: str | None = None
        self.log_level_override: str | None = None
        self._inbox_problems: list[str] = []  # from the periodic inbox check
        # a missing inbox is waited out (a restart would only refuse to start); an observer that
        # could not be restarted is not: health() makes it fatal, so that systemd restarts us
        self._watcher_broken = False
        self._job_errors: dict[str, str] = {}
        self._at_risk: tuple[int, float | None] = (0, None)  # from the at-risk job: (files, oldest added)
        self._last_checked: float | None = None  # from the at-risk job: the scrub's next object, last good
        self._last_counts: dict[str, Any] | None = None  # status's figures while the catalog is unreachable
        self._last_cluster: dict[str, Any] | None = None  # ...and the cluster's
        # this process's claim on the node name in the catalog (random per start): a second process
        # under the same name, on a clone of this machine, is told apart by it
        self.instance = secrets.token_hex(8)
        self._registered_node = False
        self.name_lost: str | None = None  # set when another process took the node name over
        self._at_risk_cache: tuple[Any, float, tuple[int, int]] | None = None
        # what status reads from the system (the catalog disk's space, descriptors open): each read is a
        # system call that lets a busy thread take the GIL, so status takes the run loop's last reading
        self._catalog_space = health.Recent(self._read_catalog_space, SYSTEM_FRESH)
        self._descriptors = health.Recent(health.open_descriptors, SYSTEM_FRESH)

    # -- build and start ------------------------------------------------------------------

    def start(self) -> None:
        c = self.config
        os.makedirs(c.state, exist_ok=True)
        self._lock_state()
        self.events = Events()
        self.node = Node(catalog_url=c.catalog, node=c.node, cache_path=c.cache.path, capacity=c.cache.capacity,
                         remotes=c.remotes, policy=c.upload, lease=c.cluster.lease, events=self.events,
                         chain_pumps=True)
        self._stack.callback(self.node.close)
        # the daemon's names for the core's parts (the control commands and health checks read them)
        node = self.node
        self.catalog, self.cache, self.remotes = node.catalog, node.cache, node.remotes
        self.evictor, self.fetcher, self.scrubber = node.evictor, node.fetcher, node.scrubber
        self.remover, self.uploader = node.remover, node.uploader
        # a PostgreSQL catalog is backed up with PostgreSQL's own tools (README), not snapshotted
        self.snapshotter = (Snapshotter(self.catalog, self.remotes, c.node, c.state)
                            if catalog_sqlite_path(c.catalog) else None)
        self.events.on("work-queued", self.wake_pump)
        self.events.on("copy-made", self._copy_made)
        self.events.on("uploaded", self._uploaded)
        self.events.on("room-freed", self._room_freed)
        self.events.on("registered", self._registered)
        # before anything acts on this node's rows (ingests, cache, claims): they may be a live twin's
        try:
            self._register_node()
            self._check_remote_places(c)
        except DB_ERRORS as exc:  # the catalog took the schema but refuses this write (a full disk)
            raise StartupError(self.catalog.explain(exc)) from None
        self.rejector = Rejector(c.ingest.rejected)
        self._stack.callback(self.rejector.close)
        try:
            self.inbox = InboxRoot(c.inbox)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # made a link after preflight looked
                raise StartupError(inbox_link_problem(c.inbox) or f"inbox: {c.inbox} is a symbolic link") from None
            raise StartupError(explain_oserror(exc, f"inbox {c.inbox}")) from None
        self._stack.callback(self.inbox.close)

        self.ingestor = Ingestor(self.inbox, self.cache, self.catalog, self.rejector,
                                 self.uploader.targets, c.ingest.ignore, reserve=self.evictor.reserve)
        self.ingestor.reconcile()
        self.evictor.reconcile()
        self.cache.set_used(self.catalog.cache_bytes())
        released = self.catalog.release_claims(time.time()) + self.node.release_dead_claims()
        if released:
            log.info("%d upload(s) interrupted by the last stop are queued again", released)

        self.queue = PendingQueue(c.ingest.settle, lambda rel: stat_in(self.inbox, rel))
        self.worker = IngestWorker(self.ingestor, self.queue, self.request_scan,
                                   lambda hashes, dropped: self.events.emit("registered", hashes, dropped),
                                   first=self.ingestor.adopt_orphans)
        self.metrics = Metrics(status=self.status, figures=self.catalog.metrics_figures,
                               pending_age=lambda: max(self.queue.oldest_age(), self.worker.oldest_waiting_age()),
                               remote_names=lambda: [rc.name for rc in self.config.remotes],
                               listen=c.metrics.listen, textfile=c.metrics.textfile)
        self.events.on("registered", self.metrics.registered)
        self.events.on("uploaded", self.metrics.uploaded)
        self.watcher = InboxWatcher(c.inbox, self.queue, self.request_scan, c.ingest.observer, self._lost_events)
        self.scheduler = BackgroundScheduler(timezone=datetime.timezone.utc,
                                             job_defaults={"coalesce": True, "max_instances": 1,
                                                           "misfire_grace_time": None})
        jobs.schedule(self.scheduler, jobs.TABLE, {
            "pump": self.uploader.pump, "rescan": self._rescan, "inbox-check": self._check_inbox,
            "probe": self.uploader.probe_unhealthy, "stalls": self.uploader.check_stalls,
            "status": self._refresh_status, "scrub": self._scrub, "heal": self.uploader.heal,
            "resume-removals": self.remover.resume, "reclaim": self._reclaim,
            "leftovers": self.scrubber.clean_leftovers, "at-risk": self._check_safety,
            "metrics": self.metrics.write_textfile,
            "catalog-backup": self._snapshot, "catalog-snapshots": self._list_snapshots,
            "heartbeat": self._heartbeat}, c, self._guarded)
        self.control = ControlServer(c.control.socket, c.control.mode, c.control.group, self._commands(),
                                     on_client_done=self.catalog.release_connection)

        self.metrics.start()  # before the other threads: a port in use stops the start here, naming it
        self._stack.callback(self.metrics.stop)
        self.watcher.start()
        self.worker.start()
        self.scheduler.start()
        self.request_scan(b"")
        # every stage runs: the first status a client can ask for says so (set after the socket's start,
        # a quick first answer said "starting")
        self.state = "running"
        self.control.start()
        self.notifier.ready()
        self._refresh_status()
        log.info("cloudmanagerd %s running: inbox=%s cache=%s node=%s remotes=%s", __version__, c.inbox,
                 c.cache.path, c.node, ",".join(rc.name for rc in c.remotes) or "none")

    def _snapshot(self) -> None:
        if self.snapshotter is not None and self.config.catalog_backup.interval > 0:
            self.snapshotter.step()

    def _list_snapshots(self) -> None:
        if self.snapshotter is not None:
            self.snapshotter.refresh()

    def _register_node(self) -> None:
        """Take the node name in the catalog, or refuse to start when a live process holds it.

        A holder that ran from this state folder in this boot is gone (we hold the folder's lock): a
        crashed daemon restarts at once. Any other holder is watched: one that renews its heartbeat
        is alive (refused within a heartbeat interval); one that does not has died or was cut off,
        and its name is taken once its lease runs out (after a reboot, or on another machine)."""
        c = self.config
        seat, first = local_seat(c.state), None
        while True:
            now = time.time()
            holder = self.catalog.register_node(self.instance, seat, os.getpid(), socket.gethostname(), now,
                                                c.cluster.lease)
            if holder is None:
                self._registered_node = True
                return
            if first is None:
                first = holder
                log.warning("node %s: pid %s on host %s held this name %.0f s ago; waiting up to cluster.lease "
                            "(%g s) to see whether it still runs", c.node, holder["pid"], holder["host"],
                            max(0.0, now + self.catalog.clock_offset - holder["heartbeat"]), c.cluster.lease)
            elif (holder["heartbeat"], holder["instance"]) != (first["heartbeat"], first["instance"]):
                raise StartupError(
                    f"node {c.node} is already running on catalog {redact_url(c.catalog)}, last heartbeat "
                    f"{max(0.0, now + self.catalog.clock_offset - holder['heartbeat']):.0f} s ago (pid {holder['pid']} on host "
                    f"{holder['host']}); set `node:` in the config to a unique name (cloned machines share "
                    "hostnames), or stop that process")
            if self.stop_requested.wait(0.2):
                raise StartupError(f"node {c.node}: stopped while waiting for the name's lease")

    def _check_remote_places(self, config: Config) -> None:
        """A remote's name must mean the same place on every node: a copy recorded on remote "nas" is
        looked for on this node's "nas". A first-seen name is recorded; a different place is refused."""
        wrong = self.catalog.check_remote_places({rc.name: rc.place for rc in config.remotes}, (), time.time(),
                                                 exclusive_places(config))
        if wrong:
            raise StartupError("; ".join(remote_place_problem(config, *w) for w in wrong))

    def _heartbeat(self) -> None:
        if self.name_lost or not self._registered_node:
            return
        if not self.catalog.heartbeat(self.instance, time.time()):
            self.name_lost = (f"node {self.config.node}: another process took this node name over in catalog "
                              f"{redact_url(self.config.catalog)} (this one was silent longer than cluster.lease, "
                              f"{self.config.cluster.lease:g} s); stopping, as two processes must not act as one "
                              "node: give each machine its own `node:` name")

    def _reclaim(self) -> None:
        self.uploader.reclaim()
        self.node.release_dead_claims()  # a script using the API on this node that was killed

    def _lock_state(self) -> None:
        self._stack.callback(os.close, lock_state(self.config.state))

    # -- running ---------------------------------------------------------------------------

    def _guarded(self, job: Any) -> Any:
        """A scheduler job whose catalog errors are one log line (when the error changes), not a
        traceback every second: a full disk or a damaged file is reported by the health check."""
        def run() -> None:
            try:
                job()
            except DB_ERRORS as exc:
                name = getattr(job, "__name__", "job")
                if self._job_errors.get(name) != str(exc):
                    self._job_errors[name] = str(exc)
                    log.error("%s: catalog: %s", name, exc)
            else:
                self._job_errors.pop(getattr(job, "__name__", "job"), None)
        return run

    def request_scan(self, rel: bytes) -> None:
        """Scan a folder of the inbox in the scheduler's pool; found files settle before ingest."""
        self.scheduler.add_job(self._scan, args=[rel], next_run_time=_now())

    def _scan(self, rel: bytes) -> None:
        count = scan(self.inbox, rel, self.ingestor.ignored, self.queue.put_settle)
        if rel == b"" and count:
            log.info("inbox scan found %d file(s)", count)

    def _rescan(self) -> None:
        self.worker.offer_waiting()
        self._scan(b"")

    def _check_inbox(self) -> None:
        """Repair what can be repaired: an inbox folder replaced by a new one is reopened, a dead
        watcher restarted, then the inbox rescanned. What cannot is a status problem."""
        reopened, problem = self.inbox.check()
        if problem:
            if problem not in self._inbox_problems:
                log.error("%s", problem)
            self._inbox_problems = [problem]
            self._watcher_broken = False
            return
        if reopened:
            log.warning("inbox %s is a new folder (deleted and recreated?): watching it and rescanning",
                        self.config.inbox)
            problems = self.watcher.restart("the inbox folder was replaced")
            if problems:
                self.request_scan(b"")
        else:
            problems = self.watcher.check()
        if self._inbox_problems and not problems:
            log.info("inbox %s is watched again", self.config.inbox)
        self._inbox_problems = problems
        self._watcher_broken = bool(problems)
        # files deleted from the inbox while they wait leave the pending count within seconds
        self.queue.prune_gone()
        self.worker.prune_gone(self.queue.stat_rel)

    def _lost_events(self, reason: str) -> None:
        log.warning("%s; rescanning the inbox now", SYSCTL_HINTS.get(reason, reason))
        self.request_scan(b"")

    def _registered(self, hashes: list[str], dropped: list[float]) -> None:
        self.wake_pump()

    def _copy_made(self, h: str) -> None:
        """A new copy may let a cached file go: files waiting for room get another chance."""
        self._room_freed()

    def _uploaded(self, h: str, remote: str, size: int, seconds: float, times: Sequence[float]) -> None:
        """A file that becomes safe is said so once, with its MESSAGE_ID (FILE_SAFE), for alerting and
        audit. `times`: when each good copy of the file was last proven, read by the commit that
        recorded this copy (no read of its own: it cost as much as the recording), so the commit that
        brought the file to min_redundancy is the one that sees it (commits that record copies of one
        file are serialized: SQLite's write lock, PostgreSQL's lock on the file's row). The first
        handler that finds min_redundancy good copies says it, unless min_redundancy of them are older
        than SAFE_WINDOW (the file was safe before: a late extra copy); a later one finds the file in
        `_said_safe`. A file made safe again after a bad copy
        (min_redundancy recent-enough copies) is said again."""
        min_redundancy = self.config.upload.min_redundancy
        now = time.time()
        with self._safe_lock:
            while self._said_safe and next(iter(self._said_safe.values())) < now - SAFE_WINDOW:
                del self._said_safe[next(iter(self._said_safe))]
            if h in self._said_safe or len(times) < min_redundancy \
                    or sum(t < now - SAFE_WINDOW for t in times) >= min_redundancy:
                return
            self._said_safe[h] = now
            log.info("hash=%s is safe: %d good copies (upload.min_redundancy)", h, len(times),
                     extra=fields(h, remote, message_id=FILE_SAFE))

    def _room_freed(self) -> None:
        if self.worker.waiting:
            self.worker.offer_waiting("cache-full")

    def _scrub(self) -> None:
        budget = int(self.config.cache.scrub * jobs.SCRUB_INTERVAL)
        report = self.scrubber.step(budget, int(self.config.scrub.remote_read * jobs.SCRUB_INTERVAL))
        self.metrics.scrubbed(report)
        if report["cache"]["missing"] or report["cache"]["corrupt"] or report["remotes"]["bad"]:
            c, r = report["cache"], report["remotes"]
            # a sentence, not the report's dict (issue 15): what was found, and that it is being mended
            log.warning("scrub: %d cache object(s) missing, %d corrupt, %d bad remote copies (%s check); "
                        "fetching or uploading them again", c["missing"], c["corrupt"], r["bad"], r["depth"])
            self.wake_pump()

    def wake_pump(self) -> None:
        with contextlib.suppress(Exception):
            self.scheduler.modify_job("pump", next_run_time=_now())

    def _read_catalog_space(self) -> tuple[int | None, int | None]:
        """(free, total) bytes of a file catalog's filesystem; (None, None) for a server's (its own) or
        when the filesystem cannot tell."""
        folder = self.catalog.health().folder
        if folder is not None:
            with contextlib.suppress(OSError):
                return health.fs_space(folder)
        return None, None

    def health(self, fresh: bool = True) -> health.Health:
        """Every health check, in one verdict: problem lines, and what only a restart can cure.
        `fresh=False` (status) takes the system's readings from the last second (SYSTEM_FRESH)."""
        cat = self.catalog.health()
        (catalog_free, catalog_total), open_fds = (
            (self._catalog_space.refresh(), self._descriptors.refresh()) if fresh
            else (self._catalog_space.get(), self._descriptors.get()))
        cache_free = disk_limit = None
        if self.cache.hit_disk_limit:  # only then is the cache's disk a finding: read it only then
            with contextlib.suppress(OSError):
                cache_free = health.fs_space(self.cache.root_fd)[0]
            disk_limit = self.cache.disk_limit()
        stale = max(3.0, 2 * (self.notifier.watchdog_interval or 15.0))
        return health.assess(
            health.loops(time.monotonic(), stale, self.worker.is_alive(), self.worker.last_progress,
                         self.scheduler.running, self.uploader.last_progress),
            health.catalog(cat.where, cat.damage, cat.hint, cat.write_error,
                           health.catalog_disk_full(catalog_free, catalog_total, cat.disk_full), catalog_free,
                           cat.folder, cat.unreachable),
            [health.cache_disk(self.config.cache.path, self.cache.hit_disk_limit, cache_free,
                               disk_limit, self.cache.capacity, self.cache.used)],
            [health.descriptors(open_fds, health.descriptor_limit())],
            # the inbox's own findings (InboxRoot.check(), InboxWatcher.check(): alive, watching the
            # folder the config names), from the last periodic check
            # (critical for `status --check` either way: nothing dropped is taken in)
            [health.Finding(line, self._watcher_broken, critical=True) for line in self._inbox_problems],
        )

    def _check_safety(self) -> None:
        """The findings that take a scan (at-risk files) or need not be fresher (the scrub's lag)."""
        c = self.config
        self._at_risk = self.catalog.at_risk(c.upload.min_redundancy, time.time() - c.upload.grace)
        self._last_checked = self.catalog.least_recently_checked()

    def findings(self, counts: dict[str, Any], cluster: dict[str, Any]) -> list[health.Finding]:
        """Every status problem with its level (health.py): the line an operator reads, and what
        `status --check` exits with. `counts` and `cluster` are the catalog's figures of this status."""
        c = self.config
        now = time.time()
        at_risk, oldest = self._at_risk
        system = self.health(fresh=False).ordered()
        return ([health.Finding(self.reload_error)] if self.reload_error else []) + system + [
            *(health.Finding(line) for line in self.worker.problems()),
            *(health.Finding(line) for line in self.uploader.problems()),
            # a damaged object that is a file's only copy: its right bytes are nowhere
            *(health.Finding(line, critical=True) for line in self.scrubber.problems()),
            # a remote the uploads found broken is one line already, whatever else fails on it
            *(health.Finding(line) for line in (
                self.snapshotter.problems(skip=self.uploader.unhealthy)
                + self.snapshotter.behind(c.catalog_backup.interval, skip=self.uploader.unhealthy)
                if self.snapshotter is not None else [])),
            # files below min_redundancy cached only on nodes not running: nobody can fetch or copy them
            *(health.Finding(line) for line in cluster_problems(cluster)),
            *filter(None, [
                health.over_capacity(c.cache.path, counts["cache_bytes"], self.cache.capacity),
                health.at_risk(at_risk, None if oldest is None else now - oldest, c.upload.grace),
                health.given_up(counts["uploads"]["failed"]),
                health.scrub_behind(None if self._last_checked is None else now - self._last_checked,
                                    counts["cache_bytes"], c.cache.scrub)]),
        ]

    def cluster(self) -> dict[str, Any]:
        """The nodes sharing this catalog, counted by state, and the files at risk: below min_redundancy
        and cached only on nodes that are not running (nobody can fetch them, nor upload them)."""
        nodes = self.catalog.node_states(time.time(), self.config.cluster.lease)
        states = [state for _, state in nodes]
        absent = [node for node, state in nodes if state != "up"]
        files, size = self._cached_only_on(absent)
        return {"nodes": len(states), **{state: states.count(state) for state in ("up", "down", "stopped")},
                "at_risk": files, "at_risk_bytes": size,
                "at_risk_nodes": absent if files else []}

    def _cached_only_on(self, absent: list[str]) -> tuple[int, int]:
        """The at-risk count reads every file below min_redundancy (0.5-0.7 s with 200,000 of them):
        taken again when the absent nodes or min_redundancy change, else at most every AT_RISK_EVERY."""
        key = (tuple(absent), self.config.upload.min_redundancy)
        now = time.monotonic()
        cached = self._at_risk_cache
        if cached is None or cached[0] != key or now - cached[1] > AT_RISK_EVERY:
            cached = self._at_risk_cache = (key, now, self.catalog.cached_only_on(absent, key[1]))
        return cached[2]

    def status(self) -> dict[str, Any]:
        c = self.config
        try:
            counts = self._last_counts = self.catalog.counts(c.upload.min_redundancy, c.upload.redundancy)
            cluster = self._last_cluster = self.cluster()
        except DB_ERRORS:
            # a catalog server that is away: the last figures, and the problem line that says so
            if self._last_counts is None or self._last_cluster is None or not self.catalog.health().unreachable:
                raise
            counts, cluster = self._last_counts, self._last_cluster
        stats = counts["remotes"]
        remotes = [{"name": rc.name, "type": rc.type, "healthy": rc.name not in self.uploader.unhealthy,
                    "copies": stats.get(rc.name, {}).get("copies", 0),
                    "errors": stats.get(rc.name, {}).get("errors", 0),
                    "last_error": stats.get(rc.name, {}).get("last_error"),
                    "catalog_snapshot": self._snapshot_status(rc.name)} for rc in c.remotes]
        return build_status(state=self.state, node=c.node, started=self.started, findings=self.findings(counts, cluster),
                            inbox_path=c.inbox, inbox_pending=len(self.queue) + len(self.worker.waiting),
                            rejected=self.rejector.count, cache_path=c.cache.path, capacity=self.cache.capacity,
                            counts=counts, active=self.uploader.active_count(), remotes=remotes,
                            cluster=cluster)

    def _snapshot_status(self, remote: str) -> dict[str, Any] | None:
        """The newest catalog snapshot on a remote (None: no snapshots there, or none at all)."""
        if self.snapshotter is None:
            return None
        return self.snapshotter.status(remote, time.time())

    def _refresh_status(self) -> None:
        # a script using the Python API on this node adds and evicts too: follow the catalog's account
        with contextlib.suppress(*DB_ERRORS):
            self.node.refresh_cache_account()
        cat = self.catalog.health()
        if cat.write_error or cat.unreachable:
            # a failed write is reported until a write succeeds: try one (the node's heartbeat),
            # so that the line goes once there is room again, even while nothing else writes
            with contextlib.suppress(*DB_ERRORS):
                self._heartbeat()
        try:
            self.notifier.status(summary_line(self.status()))
        except Exception as exc:  # the catalog may be busy or gone; say so rather than die
            self.notifier.status(f"status unavailable: {exc}")

    def healthy(self) -> bool:
        """For systemd's watchdog: nothing that only a restart can cure (see health.py)."""
        return self.health().healthy

    def run(self) -> int:
        interval = self.notifier.watchdog_interval
        reported: list[str] = []
        while not self.stop_requested.wait(min(interval or 1.0, 1.0)):
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            if self.name_lost:
                log.error("%s", self.name_lost)
                self.state = "failed"
                self.notifier.status(self.name_lost)
                return 1
            cat = self.catalog.health()
            damage = cat.damage
            if damage:
                # never run on a damaged catalog: every ingest and `ls` would fail for ever, and a
                # restart would only refuse to start; stop, and say how to recover
                line = f"catalog {cat.where} is damaged ({damage}): {cat.hint}"
                log.error("stopping: %s", line)
                self.state = "failed"
                self.notifier.status(line)
                return 1
            verdict = self.health()
            if verdict.fatal != reported:
                for line in verdict.fatal:
                    log.error("unhealthy, no more watchdog pings: %s", line)
                reported = verdict.fatal
            if interval and verdict.healthy:
                self.notifier.watchdog()
        return 0

    def reload(self) -> list[str]:
        """Re-read the config and apply it; returns the errors (the running config is then kept).

        A failed reload stays among the status problems until a reload succeeds, so that
        `systemctl status` keeps showing it, not only for the moment it happened.
        """
        with self._reload_lock:
            self.notifier.reloading()
            self.state = "reloading"
            errors: list[str] = []
            try:
                self.apply(load_config(self.config.source or DEFAULT_CONFIG))
            except ConfigError as exc:
                errors = exc.errors
            except CloudManagerError as exc:
                errors = [str(exc)]
            for line in errors:
                log.error("reload failed, keeping the running config: %s", line)
            self.reload_error = f"reload failed: {errors[0]}" if errors else None
            self.state = "running"
            self.notifier.ready()
            self._refresh_status()
            return errors

    def apply(self, new: Config) -> None:
        """Apply what can change while running; keep (and name) what needs a restart."""
        old = self.config
        self._check_remote_places(new)  # before anything changes: a refused place keeps the running config
        remotes_new = {rc.name: rc for rc in new.remotes}
        remotes_old = {rc.name: rc for rc in old.remotes}
        built = {name: build_remote(rc) for name, rc in remotes_new.items() if remotes_old.get(name) != rc}
        needs_restart = [key for key in RESTART_KEYS if _dotted(old, key) != _dotted(new, key)]
        if needs_restart:
            log.warning("reload: %s changed; restart cloudmanagerd to apply %s", ", ".join(needs_restart),
                        "it" if len(needs_restart) == 1 else "them")
        kept = {key.split(".")[0]: getattr(old, key.split(".")[0]) for key in ("inbox", "state", "catalog",
                                                                                  "node", "control", "metrics")}
        upload = dataclasses.replace(new.upload, concurrency=old.upload.concurrency)
        ingest = dataclasses.replace(new.ingest, observer=old.ingest.observer, rejected=old.ingest.rejected)
        cache = dataclasses.replace(new.cache, path=old.cache.path)
        cluster = old.cluster
        log_config = dataclasses.replace(new.log, format=old.log.format)
        self.config = dataclasses.replace(new, upload=upload, ingest=ingest, cache=cache, cluster=cluster,
                                          log=log_config, **kept)

        logging.getLogger().setLevel((self.log_level_override or new.log.level).upper())
        self.node.reconfigure(upload, new.cache.capacity, new.remotes, built)
        self.metrics.forget_remotes(rc.name for rc in new.remotes)
        self.ingestor.set_ignore(new.ingest.ignore)
        self.queue.set_settle(new.ingest.settle)
        if new.ingest.rescan != old.ingest.rescan:
            self.scheduler.reschedule_job("rescan", trigger="interval", seconds=new.ingest.rescan)
        if new.upload.grace != old.upload.grace:
            self.scheduler.reschedule_job("at-risk", trigger="interval", seconds=jobs.at_risk_interval(new))
        if new.catalog_backup.interval != old.catalog_backup.interval:
            self.scheduler.reschedule_job("catalog-backup", trigger="interval",
                                          seconds=new.catalog_backup.interval or 3600.0)
        self.scheduler.modify_job("heal", next_run_time=_now())
        # a reload often follows a fix outside the config (a mount, permissions): probe the sick
        # remotes now, so that their waiting uploads go at once
        self.scheduler.modify_job("probe", next_run_time=_now())
        log.info("reloaded %s: capacity=%d redundancy=%d min_redundancy=%d remotes=%s", new.source,
                 new.cache.capacity, upload.redundancy, upload.min_redundancy,
                 ",".join(self.uploader.order) or "none")
        self.worker.offer_waiting()
        self.wake_pump()

    # -- stop ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop in reverse order: no new requests, no new files, finish the file in hand, then close."""
        clean = self.state in ("running", "reloading")  # not a failed start, not a damaged catalog
        self.state = "stopping"
        self.notifier.stopping()
        log.info("stopping")
        for part in ("control", "watcher", "worker"):
            if hasattr(self, part):
                getattr(self, part).stop()
        if hasattr(self, "watcher"):
            self.watcher.join(10)
        if hasattr(self, "worker"):
            self.worker.join(60)
        if hasattr(self, "scrubber"):
            self.scrubber.stop()  # a deep read of a large copy (scrub, verify) would hold the stop
        if hasattr(self, "scheduler") and self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if hasattr(self, "uploader"):
            try:
                self.uploader.close()
            except DB_ERRORS as exc:  # a damaged or full catalog: the next start releases the claims
                log.warning("could not release the uploads in flight: %s", exc)
        if clean and getattr(self, "snapshotter", None) is not None and self.config.catalog_backup.interval > 0:
            try:
                # the catalog as it is at the end, on the remotes; within STOP_SNAPSHOT_BUDGET so that
                # the stop ends before systemd's TimeoutStopSec (90 s) kills it
                self.snapshotter.step(budget=STOP_SNAPSHOT_BUDGET)
            except DB_ERRORS as exc:
                log.warning("no catalog snapshot at stop: %s", exc)
        if hasattr(self, "control"):
            self.control.join(5)
        if self._registered_node and not self.name_lost:
            try:  # the name is free at once, and `nodes` says "stopped", not "down"
                self.catalog.node_stopped(self.instance, time.time())
            except DB_ERRORS as exc:
                log.warning("could not mark node %s stopped in the catalog: %s", self.config.node, exc)
        self._stack.close()
        log.info("stopped")

    # -- control commands ------------------------------------------------------------------

    def _commands(self) -> dict[str, Any]:
        return {**node_commands(self.node),
                "status": lambda req, fds, progress: self.status(),
                "metrics": lambda req, fds, progress: {"text": self.metrics.text()},
                "reload": self._cmd_reload,
                "nodes": lambda req, fds, progress: self.nodes()}

    def nodes(self) -> list[dict[str, Any]]:
        """`nodes`: every node sharing the catalog, with the age of its last heartbeat."""
        now = time.time()
        # heartbeats are on the catalog server's clock
        return [{**n, "age": round(max(0.0, now + self.catalog.clock_offset - n["heartbeat"]), 3), "this": n["node"] == self.config.node}
                for n in self.catalog.nodes(now, self.config.cluster.lease)]

    def _cmd_reload(self, req: dict[str, Any], fds: list[int], progress: Any) -> dict[str, Any]:
        errors = self.reload()
        if errors:
            raise CloudManagerError(f"reload failed, the running config is kept: {'; '.join(errors)}")
        return {"reloaded": True}


AT_RISK_EVERY = 30.0  # seconds between two counts of the files at risk while the same nodes are absent
SYSTEM_FRESH = 2.0  # seconds: how old status's readings of the system (disk space, descriptors) may be

# Keys a running daemon cannot change: they name the folders, database and socket it holds open.
RESTART_KEYS = ("inbox", "cache.path", "state", "catalog", "node", "control.socket", "control.mode",
                "control.group", "ingest.observer", "ingest.rejected", "upload.concurrency", "cluster.lease",
                "metrics.listen", "metrics.textfile", "log.format")


def lock_state(state: str) -> int:
    """Hold the state folder's lock (one daemon, or one migrate-catalog, per state folder): its descriptor."""
    fd = os.open(os.path.join(state, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StartupError(f"state {state}: another cloudmanagerd is already running "
                               "with this state folder (stop it first)") from None
        raise
    return fd


def local_seat(state: str) -> str:
    """Where this process runs: this boot of this machine (the kernel's boot id) and this state folder
    (a random id kept in it). Cloned machines share hostnames and even state folders, never a boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:  # not known: then no seat is ever the same as another (a restart waits out the lease)
        boot = secrets.token_hex(16)
    path = os.path.join(state, "state-id")
    try:
        with open(path, encoding="ascii") as f:
            folder = f.read().strip()
    except FileNotFoundError:
        folder = ""
    if not folder:
        folder = secrets.token_hex(8)
        _write_id(path, folder)
    return f"{boot}/{folder}"


def _write_id(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def redact_url(url: str) -> str:
    """A catalog URL fit for a message: a PostgreSQL URL without its user and password."""
    if url.startswith("sqlite:"):
        return url
    return safe_url(url)


def cluster_problems(cluster: dict[str, Any] | None) -> list[str]:
    if not cluster or not cluster["at_risk"]:
        return []
    return [f"{cluster['at_risk']} file(s) ({human_size(cluster['at_risk_bytes'])}) below min_redundancy are "
            f"cached only on node(s) not running: {', '.join(cluster['at_risk_nodes'])} (start them so that "
            "the files get their copies; until then no node can fetch them)"]


def exclusive_places(config: Config) -> list[str]:
    """The remotes whose place no other name may have in the catalog (plowshare's is its host: two
    accounts on one host are two places, as in the config's own check)."""
    return [rc.name for rc in config.remotes if rc.type != "plowshare"]


def remote_place_problem(config: Config, name: str, recorded: str, by: str, mine: str, other: str = "") -> str:
    """One line for a remote whose name means another place in the catalog than in this config, or
    whose place the catalog knows under `other` name."""
    source = config.source or DEFAULT_CONFIG
    if other:
        return (f"remotes.{name}: this config puts it at {mine}, which the catalog knows as remote {other} "
                f"(recorded by node {by}); one place must have one name on every node, or its copies would "
                f"count twice: name it {other} here; if every node renames it, accept the new name with: "
                f"cloudmanagerd accept-remote -c {source} {name}")
    return (f"remotes.{name}: this config puts it at {mine}, but the catalog knows remote {name} as {recorded} "
            f"(recorded by node {by}); one name must mean one place on every node: if it is another place, "
            f"give it another name, else fix its config; if the copies really moved there, accept the change "
            f"with: cloudmanagerd accept-remote -c {source} {name}")


def _dotted(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cloudmanagerd", description="Turn a drop folder into a content-addressed "
                                "store, cached locally and copied to remote hosts.",
                                epilog="cloudmanagerd restore -c FILE [--force]: rebuild a lost node's catalog from "
                                "the newest snapshot on its remotes (see `cloudmanagerd restore --help`).")
    p.add_argument("-c", "--config", default=os.environ.get("CLOUDMANAGERD_CONFIG", DEFAULT_CONFIG),
                   help=f"config file (default {DEFAULT_CONFIG})")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit 0 or 1")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log.level")
    p.add_argument("--version", action="version", version=f"cloudmanagerd {__version__}")
    return p.parse_args(argv)


def accept_remote(argv: list[str]) -> int:
    """`cloudmanagerd accept-remote -c FILE NAME...`: record this config's place for the named remotes in
    the catalog, when their copies really moved there; nodes that still say the old place are then refused.
    Safe while daemons run (one transaction); a running node applies it at its next reload."""
    p = argparse.ArgumentParser(prog="cloudmanagerd accept-remote",
                                description="Accept a remote's new place (from this config) in the catalog.")
    p.add_argument("-c", "--config", default=os.environ.get("CLOUDMANAGERD_CONFIG", DEFAULT_CONFIG))
    p.add_argument("names", nargs="+", metavar="NAME", help="remote names, as in the config")
    args = p.parse_args(argv)
    config = load_or_report(args.config)
    if config is None:
        return 1
    places = {rc.name: rc.place for rc in config.remotes}
    unknown = [name for name in args.names if name not in places]
    if unknown:
        print(f"cloudmanagerd: accept-remote: {args.config} has no remote named {', '.join(unknown)} "
              f"(its remotes: {', '.join(places) or 'none'})", file=sys.stderr)
        return 1
    try:
        catalog = Catalog.open(config.catalog, config.node)
    except CloudManagerError as exc:
        print(f"cloudmanagerd: {exc}", file=sys.stderr)
        return 1
    try:
        before = catalog.remote_places()
        catalog.check_remote_places({name: places[name] for name in args.names}, args.names, time.time(),
                                    exclusive_places(config))
    finally:
        catalog.close()
    for name in args.names:
        was = before.get(name)
        print(f"cloudmanagerd: remote {name} is {places[name]}" +
              (f" (was {was})" if was and was != places[name] else " (unchanged)" if was else " (new)"))
    return 0


def migrate_catalog(argv: list[str]) -> int:
    """`cloudmanagerd migrate-catalog -c FILE --to URL [--replace]`: copy this node's SQLite catalog into
    PostgreSQL (or another empty catalog), all or nothing, with the daemon stopped."""
    p = argparse.ArgumentParser(prog="cloudmanagerd migrate-catalog",
                                description="Copy this node's SQLite catalog into a PostgreSQL catalog "
                                "(stop cloudmanagerd first).")
    p.add_argument("-c", "--config", default=os.environ.get("CLOUDMANAGERD_CONFIG", DEFAULT_CONFIG))
    p.add_argument("--to", required=True, metavar="URL", help="the new catalog: postgresql://user@host/db")
    p.add_argument("--replace", action="store_true", help="empty a target that already holds a catalog first")
    args = p.parse_args(argv)
    config = load_or_report(args.config)
    if config is None:
        return 1
    if not config.catalog.startswith("sqlite:///"):
        print(f"cloudmanagerd: migrate-catalog copies a SQLite catalog; {args.config} uses "
              f"{redact_url(config.catalog)}", file=sys.stderr)
        return 1
    path = config.catalog[len("sqlite:///"):]
    if not os.path.isfile(path):
        print(f"cloudmanagerd: migrate-catalog: catalog {path} does not exist: nothing to migrate (is {args.config} "
              "this node's config?)", file=sys.stderr)
        return 1
    if os.path.realpath(path) == os.path.realpath(args.to.partition(":///")[2]):
        print("cloudmanagerd: migrate-catalog: --to names the catalog itself", file=sys.stderr)
        return 1
    with contextlib.ExitStack() as stack:
        try:
            os.makedirs(config.state, exist_ok=True)
            stack.callback(os.close, lock_state(config.state))  # no daemon may start on it meanwhile
            source = Catalog.open(config.catalog, config.node)
            stack.callback(source.close)
            now = time.time()
            live = [n for n in source.nodes(now, config.cluster.lease) if n["state"] == "up"]
            if live:
                n = live[0]
                raise StartupError(f"node {n['node']} is running on catalog {config.catalog} (pid {n['pid']} on host "
                                   f"{n['host']}, last heartbeat {now - n['heartbeat']:.0f} s ago): stop it first "
                                   "(systemctl stop cloudmanagerd)")
            target = Catalog.open(args.to, config.node)
            stack.callback(target.close)
            counts = copy_catalog(source, target, args.replace, config.cluster.lease)
        except CloudManagerError as exc:
            print(f"cloudmanagerd: migrate-catalog: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"cloudmanagerd: migrate-catalog: {explain_oserror(exc, exc.filename or config.state)}",
                  file=sys.stderr)
            return 1
        except DB_ERRORS as exc:
            print(f"cloudmanagerd: migrate-catalog: catalog: {scrub(str(exc))}; nothing was "
                  "copied", file=sys.stderr)
            return 1
    print(f"cloudmanagerd: copied {', '.join(f'{n} {t}' for t, n in counts.items() if n) or 'an empty catalog'} "
          f"into {redact_url(args.to)}, checked; now set `catalog: {redact_url(args.to)}` in {args.config} and "
          f"start cloudmanagerd (keep {config.catalog[len('sqlite:///'):]} until it runs)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["accept-remote"]:
        return accept_remote(argv[1:])
    if argv[:1] == ["migrate-catalog"]:
        return migrate_catalog(argv[1:])
    if argv[:1] == ["restore"]:  # `cloudmanagerd restore -c FILE [--force]`: a lost node's catalog back
        from .restore import main as restore_main
        return restore_main(argv[1:])
    args = parse_args(argv)
    config = load_or_report(args.config)
    if config is None:
        return 1
    problems, warnings = preflight(config)
    if not problems:  # with an error to fix first, these would bury it
        warnings += promise_warnings(config)
    if args.check_config:
        try:
            for remote in build_remotes(config.remotes).values():
                remote.close()
        except StartupError as exc:
            problems.append(str(exc))
        for line in problems:
            print(f"cloudmanagerd: {line}", file=sys.stderr)
        for line in warnings:
            print(f"cloudmanagerd: warning: {line}", file=sys.stderr)
        if not problems:
            print(f"cloudmanagerd: {args.config}: config OK")
        return 1 if problems else 0
    setup_logging(args.log_level or config.log.level, config.log.format, config.node)
    for line in warnings:
        log.warning("%s", line)
    if problems:
        for line in problems:
            log.error("%s", line)
        return 1

    # A shorter GIL switch interval keeps control-socket replies quick while the ingest and
    # inotify threads are busy (the default 5 ms made status p99 tens of ms under load).
    sys.setswitchinterval(0.001)
    daemon = Daemon(config)
    daemon.log_level_override = args.log_level
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop_requested.set())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop_requested.set())
    signal.signal(signal.SIGHUP, lambda *_: daemon.reload_requested.set())
    signal.signal(signal.SIGIO, signal.SIG_IGN)  # a broken lease probe must not kill us (ingest.py)
    try:
        daemon.start()
        code = daemon.run()
    except CloudManagerError as exc:
        log.error("%s", exc)
        code = 1
    except OSError as exc:
        log.error("%s", explain_oserror(exc, exc.filename or "start-up"))
        code = 1
    finally:
        daemon.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
