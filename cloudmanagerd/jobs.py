"""The daemon's periodic work, as data: which job runs how often and whether it runs at once at start.

The scheduler only pumps what is due; the state lives in the catalog (STYLE: "state lives in the
catalog, not in the scheduler"). Tests run a job one step at a time by calling its function; the
table is what the daemon hands to APScheduler.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .config import Config
from .metrics import TEXTFILE_INTERVAL


SCRUB_INTERVAL = 60.0  # the scrub's byte budget (cache.scrub) is spent per this many seconds


@dataclass(frozen=True)
class Job:
    id: str
    every: Callable[[Config], float] | None  # seconds between runs, from the config; None: once, at start
    at_start: bool = False                    # also run at once when the daemon starts
    guarded: bool = True                      # a catalog error is one log line, not a traceback a second


def at_risk_interval(c: Config) -> float:
    return max(1.0, min(30.0, c.upload.grace / 4))


TABLE: tuple[Job, ...] = (
    Job("pump", lambda c: 1.0, at_start=True),                  # claim due uploads (each ending transfer pumps too)
    Job("rescan", lambda c: c.ingest.rescan),                   # the safety rescan of the whole inbox
    Job("inbox-check", lambda c: 2.0),                          # a recreated inbox, a dead observer
    # remotes marked unhealthy: reachable again? (cheap: only sick ones; a fixed remote waits 10 s at most)
    Job("probe", lambda c: 10.0, guarded=False),
    Job("stalls", lambda c: 1.0, guarded=False),                # transfers that stopped moving
    Job("status", lambda c: 2.0, guarded=False),                # STATUS= for systemd, health
    Job("scrub", lambda c: SCRUB_INTERVAL),                     # a budget of re-hashing per interval
    Job("heal", lambda c: 30.0, at_start=True),                 # files below redundancy with nothing queued
    Job("resume-removals", None, at_start=True),                # `rm`s a stop interrupted
    # claims left "active" by a transfer whose record failed (a full catalog disk) come back while
    # running, not only at the next start (issue 10)
    Job("reclaim", lambda c: max(1.0, min(30.0, c.cluster.lease / 2))),
    Job("leftovers", lambda c: 3600.0, at_start=True),          # temp files of killed uploads on folder remotes
    # files below min_redundancy past upload.grace (`status --check`): a scan skipping files known only
    # from other nodes' exports, so here, not in every status; a fraction of the grace late at most
    Job("at-risk", at_risk_interval, at_start=True),
    Job("metrics", lambda c: TEXTFILE_INTERVAL, at_start=True),  # metrics.textfile rewritten (nothing when off)
    # catalog snapshots to the remotes when the catalog changed (0: off, the job then does nothing)
    Job("catalog-backup", lambda c: c.catalog_backup.interval or 3600.0),
    Job("catalog-snapshots", None, at_start=True),              # the newest snapshot on each remote, for status
)



def schedule(scheduler, table: tuple[Job, ...], handlers: Mapping[str, Callable[[], None]], config: Config,
             guard: Callable[[Callable[[], None]], Callable[[], None]]) -> None:
    """Add every job of `table` to an APScheduler scheduler; `handlers` gives each job's function."""
    now = datetime.datetime.now(datetime.timezone.utc)
    missing = {job.id for job in table} - set(handlers)
    if missing:
        raise ValueError(f"no handler for job(s) {', '.join(sorted(missing))}")
    for job in table:
        fn = guard(handlers[job.id]) if job.guarded else handlers[job.id]
        first = {"next_run_time": now} if job.at_start else {}
        if job.every is None:
            scheduler.add_job(fn, id=job.id, **first)
        else:
            scheduler.add_job(fn, "interval", seconds=job.every(config), id=job.id, **first)
