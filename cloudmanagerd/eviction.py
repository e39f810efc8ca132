"""Eviction: make room in the cache, least recently used first, never below min_redundancy.

Crash-safe order: the entries are marked "evicting", the objects are unlinked and their
folders fsynced, and only then does the catalog say "not cached". Start-up finishes or
undoes a marked eviction (`reconcile`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence

from .cache import Cache
from .catalog import Catalog

log = logging.getLogger(__name__)


def choose_victims(candidates: Iterable[tuple[str, int]], needed: int) -> list[tuple[str, int]]:
    """The shortest least-recently-used prefix of `candidates` that frees `needed` bytes, or [] if none does."""
    chosen, freed = [], 0
    if needed <= 0:
        return chosen
    for h, size in candidates:
        chosen.append((h, size))
        freed += size
        if freed >= needed:  # stop before reading another row
            return chosen
    return []


class Evictor:
    def __init__(self, cache: Cache, catalog: Catalog, min_copies: Callable[[], int]) -> None:
        self.cache = cache
        self.catalog = catalog
        self.min_copies = min_copies
        self._lock = threading.Lock()

    def reserve(self, size: int) -> bool:
        """Hold `size` bytes for a file coming in, evicting what may go; False when nothing can."""
        with self._lock:
            # another face on this node (a script using the API, or the daemon) adds and evicts too:
            # decide from the catalog's account, not from this process's memory of it
            self.cache.set_used(self.catalog.cache_bytes())
            if self.cache.reserve(size):
                return True
            if size > self.cache.capacity:
                return False
            needed = size - self.cache.free()
            with contextlib.closing(self.catalog.eviction_candidates(self.min_copies())) as candidates:
                victims = choose_victims(candidates, needed)  # reads only as many rows as it needs
            if not victims:
                return False
            self.evict(victims)
            return self.cache.reserve(size)

    def trim(self) -> int:
        """Bring the cache back within its capacity when it went over (two faces that each found room
        for a file at once, a capacity lowered): evict least recently used first; the bytes freed."""
        with self._lock:
            self.cache.set_used(self.catalog.cache_bytes())
            over = -self.cache.free()
            if over <= 0:
                return 0
            with contextlib.closing(self.catalog.eviction_candidates(self.min_copies())) as candidates:
                victims = choose_victims(candidates, over)
            if not victims:
                return 0
            log.warning("the cache is %d bytes over its capacity; evicting", over)
            self.evict(victims)
            return sum(size for _, size in victims)

    def evict(self, victims: Sequence[tuple[str, int]]) -> None:
        self.drop(victims)
        log.info("evicted %d file(s), %d bytes, to make room", len(victims), sum(s for _, s in victims))

    def drop(self, victims: Sequence[tuple[str, int]]) -> None:
        """The one path by which objects leave the cache (eviction, a rotten object replaced, `rm`),
        crash-safe: the entries are marked, the objects unlinked and their folders fsynced, and only
        then does the catalog say "not cached" (start-up finishes a marked drop: `reconcile`)."""
        hashes = [h for h, _ in victims]
        self.catalog.mark_evicting(hashes)
        folders = set()
        for h in hashes:
            self.cache.remove_object(h)
            folders.add(self.cache.subdir_fd(h))
        for fd in folders:
            os.fsync(fd)
        self.catalog.drop_cache_entries(hashes)
        self.cache.dropped(sum(size for _, size in victims))

    def reconcile(self) -> None:
        """Finish evictions a crash interrupted: gone objects leave the catalog, present ones stay cached."""
        marked = self.catalog.evicting()
        if not marked:
            return
        gone = [h for h, _ in marked if not self.cache.has_object(h)]
        kept = [h for h, _ in marked if h not in set(gone)]
        if gone:
            self.catalog.drop_cache_entries(gone)
        if kept:
            self.catalog.unmark_evicting(kept)
        log.info("finished %d interrupted eviction(s), kept %d object(s) still present", len(gone), len(kept))
