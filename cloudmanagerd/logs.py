"""Logging: to the journal with structured fields under systemd, to stderr otherwise.

Two filters: `FieldsFilter` lifts `hash=`, `remote=` and `attempt=` out of a message into
journal fields (HASH=, REMOTE=, ATTEMPT=), so `journalctl HASH=...` finds a file's story;
`RepeatFilter` lets an identical message through once per window and then says how often
it was repeated, so a dead remote cannot flood the journal.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
import time
from collections.abc import Callable

FIELDS = {"HASH": re.compile(r"\bhash=([0-9a-f]{64})"), "REMOTE": re.compile(r"\bremote=([^\s,;]+)"),
          "ATTEMPT": re.compile(r"\battempt=(\d+)")}


class FieldsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for field, pattern in FIELDS.items():
            match = pattern.search(message)
            if match:
                setattr(record, field, match.group(1))
        return True


class RepeatFilter(logging.Filter):
    """Identical warnings and errors pass once per `window` seconds, then with a repeat count."""

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic, remember: int = 512) -> None:
        super().__init__()
        self.window = window
        self.clock = clock
        self.remember = remember
        self._seen: collections.OrderedDict[tuple[int, str], list[float]] = collections.OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.levelno, record.getMessage())
        now = self.clock()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            return False
        if entry is not None and entry[1]:
            record.msg = f"{record.getMessage()} (repeated {int(entry[1])} more times in the last {self.window:.0f}s)"
            record.args = None
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        return True


def setup_logging(level: str) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM"):
        try:
            from systemd.journal import JournalHandler
        except ImportError:
            pass
        else:
            handler = JournalHandler(SYSLOG_IDENTIFIER="cloudmanagerd")
            handler.setFormatter(logging.Formatter("%(message)s"))
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter())
    handler.addFilter(FieldsFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("boto3").setLevel(logging.WARNING)
