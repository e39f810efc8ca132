"""The core of one node: catalog, cache, remotes, eviction, fetch-back, uploads, scrub and removal,
built from constructor arguments only. It runs no background thread of its own: transfers run in the
caller's thread (the API's `cloud_sync`) or in the uploader's pool when the daemon pumps (an S3
remote's batches then use that remote's pool, closed with it); a fetch's helper threads are joined
before it returns.

Three faces stand on it: the daemon (which adds the inbox watcher, the ingest thread, the scheduler,
the control server and sd_notify), the control socket (ops.py maps JSON onto it) and the Python API
(api.py). Events that cross stages go through the one `Events` given here (events.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import fsutil
from .cache import Cache
from .catalog import DB_ERRORS, Catalog
from .config import RemoteConfig, UploadConfig
from .errors import StartupError
from .events import Events
from .eviction import Evictor
from .fetch import Fetcher
from .remotes import RemoteError, build_remote
from .removal import Remover
from .scrub import Scrubber
from .uploads import Uploader

log = logging.getLogger(__name__)


def build_remotes(configs: Sequence[RemoteConfig]) -> dict[str, Any]:
    """Every configured remote's client; a remote that cannot even be built (a missing secret
    file, an unknown type) is a start-up error naming it."""
    built: dict[str, Any] = {}
    for rc in configs:
        try:
            built[rc.name] = build_remote(rc)
        except RemoteError as exc:
            for remote in built.values():
                remote.close()
            raise StartupError(f"remotes.{rc.name}: {exc}") from None
    return built


class Node:
    """One node's parts, wired once, here. A context manager; `close()` releases everything."""

    def __init__(self, *, catalog_url: str, node: str, cache_path: str, capacity: int,
                 remotes: Sequence[RemoteConfig], policy: UploadConfig, lease: float, events: Events,
                 claim_owner: str | None = None, chain_pumps: bool = False,
                 now: Callable[[], float] = time.time) -> None:
        self.name = node
        self.events = events
        self.policy = policy
        self._stack = contextlib.ExitStack()
        try:
            self.catalog = Catalog.open(catalog_url, node)
            self._stack.callback(self.catalog.close)
            self.cache = Cache(cache_path, capacity)
            self._stack.callback(self.cache.close)
            self.remotes: dict[str, Any] = build_remotes(remotes)
            self._stack.callback(lambda: [r.close() for r in self.remotes.values()])
        except BaseException:
            self._stack.close()
            raise
        self.evictor = Evictor(self.cache, self.catalog, lambda: self.policy.min_redundancy)
        self.fetcher = Fetcher(self.cache, self.catalog, self.remotes, self.evictor, now=now)
        self.scrubber = Scrubber(self.cache, self.catalog, self.remotes, self.fetcher, now=now)
        self.remover = Remover(self.cache, self.catalog, self.remotes, self.evictor)
        self.uploader = Uploader(self.catalog, self.cache, self.remotes, [rc.name for rc in remotes], policy, lease,
                                 now=now, ensure_cached=self.fetcher.ensure_cached, claim_owner=claim_owner,
                                 bad_object=self.scrubber.replace_bad_object, events=events,
                                 chain_pumps=chain_pumps)
        self._stack.callback(self.uploader.close)

    def close(self) -> None:
        """Stop transfers in flight (their claims go back to the queue), then close the remotes,
        the cache's descriptors and the catalog, in reverse order of building."""
        self._stack.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what a reload may change --------------------------------------------------------

    def reconfigure(self, policy: UploadConfig, capacity: int, remotes: Sequence[RemoteConfig],
                    built: Mapping[str, Any]) -> None:
        """Apply a new upload policy, capacity and remote list (`built`: clients for the remotes
        that are new or changed). Removed or replaced clients are closed."""
        self.policy = policy
        self.cache.set_capacity(capacity)
        names = [rc.name for rc in remotes]
        for name in set(self.remotes) - set(names):
            self.remotes.pop(name).close()
        for name, remote in built.items():
            previous = self.remotes.get(name)
            self.remotes[name] = remote  # the mapping every part shares: they see the new client at once
            self.uploader.forget_health(name)
            if previous is not None:
                previous.close()
        self.uploader.reconfigure(policy, names)
        # a lowered capacity takes effect now, not when the next file arrives; what cannot go yet
        # (pinned, below min_redundancy) is a status problem (health.over_capacity). A failure here
        # must not fail the reload: the daemon's status job trims again every few seconds.
        try:
            self.evictor.trim()
        except (*DB_ERRORS, OSError) as exc:
            log.warning("cache.capacity lowered, but evicting now failed (tried again shortly): %s", exc)

    def api_owner(self, pid: int) -> str:
        """The claim owner of a Python API script on this node (its pid in it)."""
        return f"{self.name}/api/{pid}"

    def release_dead_claims(self) -> int:
        """Queue again the transfers that a killed API script on this node had claimed: the daemon's
        reclaim job and each new CloudManager call it, so that a dead script's pairs never stay
        "active" with nothing sending them."""
        prefix, released = self.api_owner(0)[:-1], 0
        for owner in self.catalog.claim_owners(prefix):
            pid = owner[len(prefix):]
            if pid.isdigit() and int(pid) != os.getpid() and not fsutil.pid_alive(int(pid)):
                n = self.catalog.release_claims(time.time(), owner)
                log.info("%d upload(s) claimed by a stopped script (pid %s) are queued again", n, pid)
                released += n
        if released:
            self.events.emit("work-queued")
        return released

    def refresh_cache_account(self) -> None:
        """The catalog is the account of what the cache holds: another face (the API in a script, or
        the daemon) may add and evict on the same node, and this process's running total follows; a
        cache the two took past its capacity at once is brought back within it."""
        self.evictor.trim()
