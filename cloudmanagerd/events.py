"""Events that cross pipeline stages, through one small mechanism every part receives when built.

A stage says what happened (`emit`); whoever cares subscribed when the parts were put together
(`on`). No part holds a callback of another: the uploader does not know that a new copy may let
a file waiting in the inbox in, it only says "copy-made".

The events:
- "registered" (hashes, dropped): files entered the catalog; the upload stage queues their copies.
  `dropped`: each file's last change in the inbox (its ctime, wall clock): the ingest latency's start.
- "copy-made" (hash): a remote copy was recorded; room may have appeared in the cache.
- "room-freed" (): a pin was lifted or the capacity raised; files waiting for room may come in.
- "work-queued" (): uploads are due now (new pairs, a remote healthy again, a retry).
- "remote-healthy" (name): a remote that failed works again.
- "uploaded" (hash, remote, size, seconds, proven): a copy was sent and recorded (a batch's pairs each
  carry the batch's time); `proven`: when each good copy of the file was last proven, as the commit that
  recorded this one left them. The metrics' transfer histograms, and the file-safe line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

NAMES = frozenset({"registered", "copy-made", "room-freed", "work-queued", "remote-healthy", "uploaded"})


class Events:
    """Synchronous: `emit` calls each subscriber in the emitting thread, in subscription order. A failing
    subscriber is logged and does not stop the others or the stage that emitted."""

    def __init__(self) -> None:
        self._subscribers: dict[str, list[Callable[..., Any]]] = {name: [] for name in NAMES}
        self._lock = threading.Lock()

    def on(self, name: str, fn: Callable[..., Any]) -> None:
        if name not in NAMES:
            raise ValueError(f"unknown event {name!r}")
        with self._lock:
            self._subscribers[name] = [*self._subscribers[name], fn]

    def emit(self, name: str, *args: Any) -> None:
        for fn in self._subscribers[name]:  # a copy-on-write list: safe against `on` from another thread
            try:
                fn(*args)
            except Exception:
                log.exception("event %s: a subscriber failed", name)
