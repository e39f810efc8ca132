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
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from . import __version__, health, jobs
from .catalog import DB_ERRORS, Catalog
from .catalog.migrate import copy_catalog
from .config import Config, ConfigError, load_config
from .control import ControlServer, node_commands
from .errors import CloudManagerError, StartupError, explain_oserror
from .events import Events
from .inbox import SYSCTL_HINTS, InboxRoot, InboxWatcher, PendingQueue, scan, stat_in
from .ingest import Ingestor, IngestWorker
from .logs import setup_logging
from .node import Node, build_remotes
from .notify import Notifier
from .preflight import inbox_link_problem, preflight
from .rejects import Rejector
from .remotes import build_remote
from .status import build_status, human_size, summary_line

log = logging.getLogger("cloudmanagerd")

DEFAULT_CONFIG = "/etc/cloudmanagerd/config.yaml"


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
        self.reload_error: str | None = None
        self.log_level_override: str | None = None
        self._inbox_problems: list[str] = []  # from the periodic inbox check
        # a missing inbox is waited out (a restart would only refuse to start); an observer that
        # could not be restarted is not: health() makes it fatal, so that systemd restarts us
        self._watcher_broken = False
        self._job_errors: dict[str, str] = {}
        self._last_counts: dict[str, Any] | None = None  # status's figures while the catalog is unreachable
        self._last_cluster: dict[str, Any] | None = None  # ...and the cluster's
        # this process's claim on the node name in the catalog (random per start): a second process
        # under the same name, on a clone of this machine, is told apart by it
        self.instance = secrets.token_hex(8)
        self._registered_node = False
        self.name_lost: str | None = None  # set when another process took the node name over
        self._at_risk_cache: tuple[Any, float, tuple[int, int]] | None = None

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
        self.events.on("work-queued", self.wake_pump)
        self.events.on("copy-made", self._copy_made)
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
                                   lambda hashes: self.events.emit("registered", hashes),
                                   first=self.ingestor.adopt_orphans)
        self.watcher = InboxWatcher(c.inbox, self.queue, self.request_scan, c.ingest.observer, self._lost_events)
        self.scheduler = BackgroundScheduler(timezone=datetime.timezone.utc,
                                             job_defaults={"coalesce": True, "max_instances": 1,
                                                           "misfire_grace_time": None})
        jobs.schedule(self.scheduler, jobs.TABLE, {
            "pump": self.uploader.pump, "rescan": self._rescan, "inbox-check": self._check_inbox,
            "probe": self.uploader.probe_unhealthy, "stalls": self.uploader.check_stalls,
            "status": self._refresh_status, "scrub": self._scrub, "heal": self.uploader.heal,
            "resume-removals": self.remover.resume, "reclaim": self._reclaim,
            "leftovers": self.scrubber.clean_leftovers, "heartbeat": self._heartbeat}, c, self._guarded)
        self.control = ControlServer(c.control.socket, c.control.mode, c.control.group, self._commands(),
                                     on_client_done=self.catalog.release_connection)

        self.watcher.start()
        self.worker.start()
        self.scheduler.start()
        self.request_scan(b"")
        self.control.start()
        self.state = "running"
        self.notifier.ready()
        self._refresh_status()
        log.info("cloudmanagerd %s running: inbox=%s cache=%s node=%s remotes=%s", __version__, c.inbox,
                 c.cache.path, c.node, ",".join(rc.name for rc in c.remotes) or "none")

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
                            max(0.0, now - holder["heartbeat"]), c.cluster.lease)
            elif (holder["heartbeat"], holder["instance"]) != (first["heartbeat"], first["instance"]):
                raise StartupError(
                    f"node {c.node} is already running on catalog {redact_url(c.catalog)}, last heartbeat "
                    f"{max(0.0, now - holder['heartbeat']):.0f} s ago (pid {holder['pid']} on host "
                    f"{holder['host']}); set `node:` in the config to a unique name (cloned machines share "
                    "hostnames), or stop that process")
            if self.stop_requested.wait(0.2):
                raise StartupError(f"node {c.node}: stopped while waiting for the name's lease")

    def _check_remote_places(self, config: Config) -> None:
        """A remote's name must mean the same place on every node: a copy recorded on remote "nas" is
        looked for on this node's "nas". A first-seen name is recorded; a different place is refused."""
        wrong = self.catalog.check_remote_places({rc.name: rc.place for rc in config.remotes}, (), time.time())
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

    def _lost_events(self, reason: str) -> None:
        log.warning("%s; rescanning the inbox now", SYSCTL_HINTS.get(reason, reason))
        self.request_scan(b"")

    def _registered(self, hashes: list[str]) -> None:
        self.wake_pump()

    def _copy_made(self, h: str) -> None:
        """A new copy may let a cached file go: files waiting for room get another chance."""
        self._room_freed()

    def _room_freed(self) -> None:
        if self.worker.waiting:
            self.worker.offer_waiting("cache-full")

    def _scrub(self) -> None:
        budget = int(self.config.cache.scrub * jobs.SCRUB_INTERVAL)
        if budget <= 0:
            return
        report = self.scrubber.step(budget)
        if report["cache"]["missing"] or report["cache"]["corrupt"] or report["remotes"]["bad"]:
            log.warning("scrub: %s", report)
            self.wake_pump()

    def wake_pump(self) -> None:
        with contextlib.suppress(Exception):
            self.scheduler.modify_job("pump", next_run_time=_now())

    def health(self) -> health.Health:
        """Every health check, in one verdict: problem lines, and what only a restart can cure."""
        cat = self.catalog.health()
        catalog_free = catalog_total = cache_free = None
        if cat.folder is not None:  # a file catalog: its disk is watched too (a server's is its own)
            with contextlib.suppress(OSError):
                catalog_free, catalog_total = health.fs_space(cat.folder)
        with contextlib.suppress(OSError):
            cache_free = health.fs_space(self.cache.root_fd)[0]
        stale = max(3.0, 2 * (self.notifier.watchdog_interval or 15.0))
        return health.assess(
            health.loops(time.monotonic(), stale, self.worker.is_alive(), self.worker.last_progress,
                         self.scheduler.running, self.uploader.last_progress),
            health.catalog(cat.where, cat.damage, cat.hint, cat.write_error,
                           health.catalog_disk_full(catalog_free, catalog_total, cat.disk_full), catalog_free,
                           cat.folder, cat.unreachable),
            [health.cache_disk(self.config.cache.path, self.cache.hit_disk_limit, cache_free,
                               self.cache.disk_limit(), self.cache.capacity, self.cache.used)],
            [health.descriptors(health.open_descriptors(), health.descriptor_limit())],
            # the inbox's own findings (InboxRoot.check(), InboxWatcher.check(): alive, watching the
            # folder the config names), from the last periodic check
            [health.Finding(line, self._watcher_broken) for line in self._inbox_problems],
        )

    def problems(self, cluster: dict[str, Any] | None = None) -> list[str]:
        reload_error = [self.reload_error] if self.reload_error else []
        cluster = self._last_cluster if cluster is None else cluster  # status() passes fresh figures
        return (reload_error + self.health().lines() + self.worker.problems()
                + self.uploader.problems() + self.scrubber.problems() + cluster_problems(cluster))

    def cluster(self) -> dict[str, Any]:
        """The nodes sharing this catalog, counted by state, and the files at risk: below min_redundancy
        and cached only on nodes that are not running (nobody can fetch them, nor upload them)."""
        nodes = self.catalog.nodes(time.time(), self.config.cluster.lease)
        absent = [n["node"] for n in nodes if n["state"] != "up"]
        files, size = self._at_risk(absent)
        return {"nodes": len(nodes), **{state: sum(n["state"] == state for n in nodes)
                                        for state in ("up", "down", "stopped")},
                "at_risk": files, "at_risk_bytes": size,
                "at_risk_nodes": absent if files else []}

    def _at_risk(self, absent: list[str]) -> tuple[int, int]:
        """The at-risk count reads every file below min_redundancy (0.5-0.7 s with 200,000 of them):
        taken again when the absent nodes or min_redundancy change, else at most every AT_RISK_EVERY."""
        key = (tuple(absent), self.config.upload.min_redundancy)
        now = time.monotonic()
        cached = self._at_risk_cache
        if cached is None or cached[0] != key or now - cached[1] > AT_RISK_EVERY:
            cached = self._at_risk_cache = (key, now, self.catalog.at_risk(absent, key[1]))
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
                    "last_error": stats.get(rc.name, {}).get("last_error")} for rc in c.remotes]
        return build_status(state=self.state, node=c.node, started=self.started, problems=self.problems(cluster),
                            inbox_path=c.inbox, inbox_pending=len(self.queue) + len(self.worker.waiting),
                            rejected=self.rejector.count, cache_path=c.cache.path, capacity=self.cache.capacity,
                            counts=counts, active=self.uploader.active_count(), remotes=remotes,
                            cluster=cluster)

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
                                                                                  "node", "control")}
        upload = dataclasses.replace(new.upload, concurrency=old.upload.concurrency)
        ingest = dataclasses.replace(new.ingest, observer=old.ingest.observer, rejected=old.ingest.rejected)
        cache = dataclasses.replace(new.cache, path=old.cache.path)
        cluster = old.cluster
        self.config = dataclasses.replace(new, upload=upload, ingest=ingest, cache=cache, cluster=cluster, **kept)

        logging.getLogger().setLevel((self.log_level_override or new.log.level).upper())
        self.node.reconfigure(upload, new.cache.capacity, new.remotes, built)
        self.ingestor.set_ignore(new.ingest.ignore)
        self.queue.set_settle(new.ingest.settle)
        if new.ingest.rescan != old.ingest.rescan:
            self.scheduler.reschedule_job("rescan", trigger="interval", seconds=new.ingest.rescan)
        self.scheduler.modify_job("heal", next_run_time=_now())
        log.info("reloaded %s: capacity=%d redundancy=%d min_redundancy=%d remotes=%s", new.source,
                 new.cache.capacity, upload.redundancy, upload.min_redundancy,
                 ",".join(self.uploader.order) or "none")
        self.worker.offer_waiting()
        self.wake_pump()

    # -- stop ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop in reverse order: no new requests, no new files, finish the file in hand, then close."""
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
        if hasattr(self, "scheduler") and self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if hasattr(self, "uploader"):
            try:
                self.uploader.close()
            except DB_ERRORS as exc:  # a damaged or full catalog: the next start releases the claims
                log.warning("could not release the uploads in flight: %s", exc)
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
                "reload": self._cmd_reload,
                "nodes": lambda req, fds, progress: self.nodes()}

    def nodes(self) -> list[dict[str, Any]]:
        """`nodes`: every node sharing the catalog, with the age of its last heartbeat."""
        now = time.time()
        return [{**n, "age": round(max(0.0, now - n["heartbeat"]), 3), "this": n["node"] == self.config.node}
                for n in self.catalog.nodes(now, self.config.cluster.lease)]

    def _cmd_reload(self, req: dict[str, Any], fds: list[int], progress: Any) -> dict[str, Any]:
        errors = self.reload()
        if errors:
            raise CloudManagerError(f"reload failed, the running config is kept: {'; '.join(errors)}")
        return {"reloaded": True}


AT_RISK_EVERY = 30.0  # seconds between two counts of the files at risk while the same nodes are absent

# Keys a running daemon cannot change: they name the folders, database and socket it holds open.
RESTART_KEYS = ("inbox", "cache.path", "state", "catalog", "node", "control.socket", "control.mode",
                "control.group", "ingest.observer", "ingest.rejected", "upload.concurrency", "cluster.lease")


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
    from .catalog.postgres import safe_url  # only a PostgreSQL catalog needs psycopg's pool
    return safe_url(url)


def cluster_problems(cluster: dict[str, Any] | None) -> list[str]:
    if not cluster or not cluster["at_risk"]:
        return []
    return [f"{cluster['at_risk']} file(s) ({human_size(cluster['at_risk_bytes'])}) below min_redundancy are "
            f"cached only on node(s) not running: {', '.join(cluster['at_risk_nodes'])} (start them so that "
            "the files get their copies; until then no node can fetch them)"]


def remote_place_problem(config: Config, name: str, recorded: str, by: str, mine: str) -> str:
    """One line for a remote whose name means another place in the catalog than in this config."""
    source = config.source or DEFAULT_CONFIG
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
                                "store, cached locally and copied to remote hosts.")
    p.add_argument("-c", "--config", default=os.environ.get("CLOUDMANAGERD_CONFIG", DEFAULT_CONFIG),
                   help=f"config file (default {DEFAULT_CONFIG})")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit 0 or 1")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log.level")
    p.add_argument("--version", action="version", version=f"cloudmanagerd {__version__}")
    return p.parse_args(argv)


def _load_or_say(path: str) -> Config | None:
    """The config, or None once its errors are printed, one line each."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"cloudmanagerd: {line}", file=sys.stderr)
        return None


def accept_remote(argv: list[str]) -> int:
    """`cloudmanagerd accept-remote -c FILE NAME...`: record this config's place for the named remotes in
    the catalog, when their copies really moved there; nodes that still say the old place are then refused.
    Safe while daemons run (one transaction); a running node applies it at its next reload."""
    p = argparse.ArgumentParser(prog="cloudmanagerd accept-remote",
                                description="Accept a remote's new place (from this config) in the catalog.")
    p.add_argument("-c", "--config", default=os.environ.get("CLOUDMANAGERD_CONFIG", DEFAULT_CONFIG))
    p.add_argument("names", nargs="+", metavar="NAME", help="remote names, as in the config")
    args = p.parse_args(argv)
    config = _load_or_say(args.config)
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
        catalog.check_remote_places({name: places[name] for name in args.names}, args.names, time.time())
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
    config = _load_or_say(args.config)
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
            print(f"cloudmanagerd: migrate-catalog: catalog: {str(exc).strip().splitlines()[0]}; nothing was "
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
    args = parse_args(argv)
    config = _load_or_say(args.config)
    if config is None:
        return 1
    problems, warnings = preflight(config)
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
    setup_logging(args.log_level or config.log.level)
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
