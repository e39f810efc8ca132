"""The daemon's health in one place: what is wrong, and whether a restart is the only cure.

Each check takes its inputs as arguments (times, counts, flags) and returns findings, so that
every rule is tested without a daemon. `assess()` sorts them into

- problems: status lines (state "degraded", `status --check`, systemd's STATUS=) for what the
  daemon waits out or repairs by itself: a full disk, a catalog that cannot be written now;
- fatal: what it cannot repair (a damaged catalog, descriptors exhausted, a wedged thread).
  The daemon stops feeding systemd's watchdog, so that systemd restarts it; a damaged catalog
  also stops the daemon at once (exit 1), since a restart would only refuse to start.

The daemon gathers the inputs (`Daemon.health()`); the edges that read the system are here too.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass, field

from .status import human_size

FD_WARN = 0.90  # a problem line from here on: a leak shows long before it bites
FD_FATAL = 0.98  # and past this, the next accept() or open() fails: restart


@dataclass(frozen=True)
class Finding:
    line: str
    fatal: bool = False


@dataclass(frozen=True)
class Health:
    problems: list[str] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.fatal

    def lines(self) -> list[str]:
        """Every finding, the fatal ones first: the status problems."""
        return self.fatal + self.problems


def assess(*groups: Iterable[Finding | None]) -> Health:
    problems: list[str] = []
    fatal: list[str] = []
    for group in groups:
        for f in group:
            if f is not None:
                (fatal if f.fatal else problems).append(f.line)
    return Health(problems, fatal)


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
    if unreachable:
        return [Finding(f"catalog unreachable: {path} ({unreachable}); ingest and uploads wait, files stay "
                        "in the inbox")]
    folder = folder or os.path.dirname(path) or "."
    if disk_full:
        room = f" has {_size(free)} free" if free is not None else " is full"
        return [Finding(f"catalog disk full: {folder}{room}; ingest and uploads wait until there is room "
                        "(free some space there)")]
    if write_error:
        return [Finding(f"catalog {path} cannot be written ({write_error}); ingest and uploads wait")]
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
