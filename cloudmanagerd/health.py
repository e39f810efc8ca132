"""The daemon's health in one place: what is wrong, and whether a restart is the only cure.

Each check takes its inputs as arguments (times, counts, flags) and returns findings, so that
every rule is tested without a daemon. `assess()` sorts them into

- problems: status lines (state "degraded", `status --check`, systemd's STATUS=) for what the
  daemon waits out or repairs by itself: a full disk, a catalog that cannot be written now;
- fatal: what it cannot repair (a damaged catalog, descriptors exhausted, a wedged thread).
  The daemon stops feeding systemd's watchdog, so that systemd restarts it; a damaged catalog
  also stops the daemon at once (exit 1), since a restart would only refuse to start.

Every finding also has a level for `status --check` (the Nagios plugin convention): "critical"
when data is at risk or nothing comes in any more (a fatal finding is always critical), else
"warning". The daemon decides the level, so that no client parses the lines.

The daemon gathers the inputs (`Daemon.health()`); the edges that read the system are here too.
"""

from __future__ import annotations

import errno
import os
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .status import human_duration, human_size

FD_WARN = 0.90  # a problem line from here on: a leak shows long before it bites
FD_FATAL = 0.98  # and past this, the next accept() or open() fails: restart


WARNING, CRITICAL = "warning", "critical"
LEVELS = ("ok", WARNING, CRITICAL)  # worst last: the exit codes 0, 1, 2 of `status --check`


@dataclass(frozen=True)
class Finding:
    line: str
    fatal: bool = False
    critical: bool = False

    @property
    def level(self) -> str:
        return CRITICAL if self.fatal or self.critical else WARNING


@dataclass(frozen=True)
class Health:
    problems: list[str] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.fatal

    def lines(self) -> list[str]:
        """Every finding, the fatal ones first: the status problems."""
        return self.fatal + self.problems

    def ordered(self) -> list[Finding]:
        """The findings in the order of `lines()`."""
        return [f for f in self.findings if f.fatal] + [f for f in self.findings if not f.fatal]


def assess(*groups: Iterable[Finding | None]) -> Health:
    problems: list[str] = []
    fatal: list[str] = []
    findings: list[Finding] = []
    for group in groups:
        for f in group:
            if f is not None:
                (fatal if f.fatal else problems).append(f.line)
                findings.append(f)
    return Health(problems, fatal, findings)


def worst(findings: Iterable[Finding]) -> str:
    """"ok", "warning" or "critical": the level of the worst finding."""
    return max((f.level for f in findings), key=LEVELS.index, default="ok")


# -- the checks -------------------------------------------------------------------------------

def loops(now: float, stale_after: float, ingest_alive: bool, ingest_progress: float, scheduler_running: bool,
          pump_progress: float) -> list[Finding]:
    """The ingest thread and the scheduler must turn (times are monotonic). Waiting for the catalog, a
    remote or room in the cache still turns them (they wait with timeouts), so only a wedged stage
    is fatal: a restart would not end a long outage, and would run into systemd's start limit."""
    found = []
    if not ingest_alive:
        found.append(Finding("the ingest thread has died (see the log); restarting", True))
    elif now - ingest_progress > stale_after:
        found.append(Finding(f"the ingest thread is stuck (no progress for {now - ingest_progress:.0f}s); "
                             "restarting", True))
    if not scheduler_running:
        found.append(Finding("the scheduler has stopped; restarting", True))
    elif now - pump_progress > stale_after:
        found.append(Finding(f"the upload scheduler is stuck (no pump for {now - pump_progress:.0f}s); "
                             "restarting", True))
    return found


def catalog(path: str, corrupt: str | None, hint: str, write_error: str | None, disk_full: bool,
            free: int | None, folder: str | None = None, unreachable: str | None = None) -> list[Finding]:
    """A damaged catalog is fatal; one that cannot be written now (a full disk) or a catalog server
    that cannot be reached is waited out: a restart would not bring the server back."""
    if corrupt:
        return [Finding(f"catalog {path} is damaged ({corrupt}): {hint}", True)]
    # nothing is taken in while the catalog cannot be written or reached: critical (ingest stalled),
    # but not fatal (a restart would not bring the server back)
    if unreachable:
        return [Finding(f"catalog unreachable: {path} ({unreachable}); ingest and uploads wait, files stay "
                        "in the inbox", critical=True)]
    folder = folder or os.path.dirname(path) or "."
    if disk_full:
        room = f" has {_size(free)} free" if free is not None else " is full"
        return [Finding(f"catalog disk full: {folder}{room}; ingest and uploads wait until there is room "
                        "(free some space there)", critical=True)]
    if write_error:
        return [Finding(f"catalog {path} cannot be written ({write_error}); ingest and uploads wait",
                        critical=True)]
    return []


def cache_disk(path: str, hit_disk_limit: bool, free: int | None, disk_limit: int | None, capacity: int,
               used: int) -> Finding | None:
    """The cache's filesystem holds less than cache.capacity allows, and the cache has met that limit:
    files are evicted earlier than the capacity says (and wait if nothing can go)."""
    if not hit_disk_limit or disk_limit is None or disk_limit >= capacity:
        return None
    return Finding(f"cache disk full: {path} has {_size(free)} free, less than cache.capacity "
                   f"({_size(capacity)}) needs; the cache is held at {_size(used)}, evicting early "
                   "(free space there or lower cache.capacity)")


def at_risk(count: int, oldest_age: float | None, grace: float, cap: int = 1000) -> Finding | None:
    """Files below min_redundancy for longer than upload.grace: their only copies may be lost."""
    if not count or oldest_age is None:
        return None
    many = f"more than {cap}" if count > cap else str(count)
    return Finding(f"{many} file(s) below min_redundancy for more than {human_duration(grace)} (the oldest "
                   f"for {human_duration(oldest_age)}): see the remotes' errors, `cloudmanagerctl ls --state "
                   "pending`", critical=True)


def scrub_behind(lag: float | None, used: int, rate: float) -> Finding | None:
    """The background scrub (cache.scrub, bytes per second) should check every cache object once
    per used/rate seconds; one not checked for twice that (and an hour) means it falls behind."""
    if lag is None or rate <= 0:
        return None
    expected = used / rate
    if lag <= 2 * expected + 3600:
        return None
    return Finding(f"scrub behind: a cache object was last checked {human_duration(lag)} ago, while a pass "
                   f"over {_size(used)} at cache.scrub {_size(rate * 3600)}/h takes {human_duration(expected)} "
                   "(raise cache.scrub, or the daemon is too busy to scrub)")


def given_up(failed: int) -> Finding | None:
    """Upload pairs given up (upload.retry.max_attempts, or an error retrying cannot fix)."""
    if not failed:
        return None
    return Finding(f"{failed} upload(s) given up (`cloudmanagerctl ls --state failed`; `cloudmanagerctl retry "
                   "--all` tries them again)")


def over_capacity(path: str, used: int, capacity: int) -> Finding | None:
    """The cache holds more than cache.capacity (lowered by a reload, or two faces that took room at
    once) and eviction could not bring it back: what is left may not go yet."""
    if used <= capacity:
        return None
    return Finding(f"cache over capacity: {path} holds {_size(used)} of {_size(capacity)}; the rest cannot be "
                   "evicted yet (pinned, or waiting for min_redundancy copies)", critical=True)


def descriptors(open_count: int, soft_limit: int) -> Finding | None:
    """Open descriptors against RLIMIT_NOFILE's soft limit."""
    if soft_limit <= 0 or soft_limit == resource.RLIM_INFINITY:
        return None
    ratio = open_count / soft_limit
    if ratio >= FD_FATAL:
        return Finding(f"file descriptors exhausted: {open_count} of {soft_limit} open (a leak: see the log); "
                       "restarting", True)
    if ratio >= FD_WARN:
        return Finding(f"file descriptors nearly exhausted: {open_count} of {soft_limit} open "
                       "(a leak, or raise LimitNOFILE)")
    return None


def disk_reserve(total: int) -> int:
    """Room kept free on a filesystem the daemon writes: 2% of it, at most 64 MiB."""
    return min(64 << 20, total // 50)


def catalog_disk_full(free: int | None, total: int | None, write_error_code_full: bool) -> bool:
    """SQLite said so (SQLITE_FULL since the last good commit), or less than the reserve is left."""
    if write_error_code_full:
        return True
    return free is not None and total is not None and free < disk_reserve(total)


# -- the edges that read the system -------------------------------------------------------------

T = TypeVar("T")


class Recent(Generic[T]):
    """A reading of the system kept for up to `max_age` seconds. Each read is a system call, and each
    system call lets a busy thread take the GIL for up to the switch interval: `status` takes the
    reading from memory (`get`), while the daemon's run loop takes it anew every second (`refresh`),
    so that what status shows is never older than `max_age`."""

    def __init__(self, read: Callable[[], T], max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.read = read
        self.max_age = max_age
        self.clock = clock
        self._taken: tuple[float, T] | None = None

    def get(self) -> T:
        taken = self._taken  # one reference: another thread may replace it meanwhile
        if taken is None or self.clock() - taken[0] > self.max_age:
            return self.refresh()
        return taken[1]

    def refresh(self) -> T:
        when = self.clock()
        value = self.read()
        self._taken = (when, value)
        return value


def fs_space(path_or_fd: str | int) -> tuple[int, int]:
    """(free bytes an unprivileged writer may use, total bytes) of a filesystem."""
    st = os.statvfs(path_or_fd) if isinstance(path_or_fd, str) else os.fstatvfs(path_or_fd)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):  # no descriptor left even to count them
            return descriptor_limit()
        raise


def descriptor_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _size(n: int | None) -> str:
    return "?" if n is None else human_size(n)

