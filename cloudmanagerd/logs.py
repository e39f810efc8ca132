"""Logging: to the journal with structured fields under systemd, to stderr otherwise (text, or one
JSON object a line with `log.format: json`).

A message about a file, a remote or an upload passes its fields explicitly, `extra=fields(h, remote,
attempt)`, so `journalctl HASH=...` finds a file's story whatever the message's words; NODE is on
every entry. The events an operator alerts on carry a stable MESSAGE_ID (below: never change them).

`RepeatFilter` limits warnings and errors: a message about a file is limited per kind (its text
before the arguments, its remote and the failure it reports), not per file, so that a dead remote
writes one line a window, not one per file (an ERROR about a file, damage, is written for each file);
any other message per identical text. The next line
after a window says how many were held back. The events with a MESSAGE_ID are never held back.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

# MESSAGE_IDs (journalctl MESSAGE_ID=...): 128-bit ids, fixed for good
FILE_SAFE = "d7c959e2dfa640589475352fcaa27a23"      # a file reached upload.min_redundancy good copies
FILE_AT_RISK = "2d4b0be919544830b6a3d778b145e61a"   # a file not safe that the daemon no longer makes safe alone
REMOTE_DOWN = "c2443e0f632b4b828142e3adc544a80b"    # a remote's transfers fail (once per new error)
REMOTE_BACK = "55487e14b2e64f2e98e2f32f6be1788f"    # a remote that failed works again
COPY_BAD = "6348fd7bb74d4cf4b38167ba772601f0"       # a remote copy is missing or holds other bytes, or an
                                                    # upload read other bytes than the file's

FIELD_NAMES = ("HASH", "REMOTE", "ATTEMPT", "NODE", "MESSAGE_ID")


def fields(h: str | None = None, remote: str | None = None, attempt: int | None = None,
           message_id: str | None = None) -> dict[str, str]:
    """The journal fields of a message, for `extra=`: only those given."""
    out = {}
    if h is not None:
        out["HASH"] = h
    if remote is not None:
        out["REMOTE"] = remote
    if attempt is not None:
        out["ATTEMPT"] = str(attempt)
    if message_id is not None:
        out["MESSAGE_ID"] = message_id
    return out


_second: tuple[int, str, str] = (-1, "", "")  # (a whole second, its date and time, its offset): see timestamp()


def timestamp(created: float) -> str:
    """ISO 8601 in local time with its offset, to the millisecond: unambiguous across hosts and DST.

    The date, time and offset are worked out once a second (astimezone asks the C library for the
    zone each time: a fifth of a per-file line's cost); a line within that second only adds its
    milliseconds. One tuple, replaced whole: threads racing here at worst both work it out."""
    global _second
    whole = int(created // 1)
    micro = round((created - whole) * 1e6)  # as datetime rounds it (then truncated to milliseconds)
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    second = _second
    if second[0] != whole:
        stamp = datetime.datetime.fromtimestamp(whole).astimezone().isoformat()
        second = _second = (whole, stamp[:19], stamp[19:])
    return f"{second[1]}.{micro // 1000:03d}{second[2]}"


class RepeatFilter(logging.Filter):
    """Warnings and errors pass once per `window` seconds for each kind, then with a count."""

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic, remember: int = 512) -> None:
        super().__init__()
        self.window = window
        self.clock = clock
        self.remember = remember
        self._seen: collections.OrderedDict[tuple[Any, ...], list[float]] = collections.OrderedDict()
        # threads log at once and no handler lock is held here (LineHandler formats outside it): one
        # thread's eviction could remove the kind another has just stored and is moving to the end
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        # an event with a MESSAGE_ID is an alert, and its source already says it once (a remote down once
        # per new error, a file at risk once): held back, a remote down again after "back" would read as up
        if record.levelno < logging.WARNING or hasattr(record, "MESSAGE_ID"):
            return True
        # about one file: the same thing for another file is the same kind, but another failure is news
        per_kind = hasattr(record, "HASH")
        if per_kind:
            h = str(getattr(record, "HASH"))
            args = record.args if isinstance(record.args, tuple) else ()
            failures = tuple(str(a).replace(h, "") for a in args if isinstance(a, BaseException))
            # an ERROR about a file (its cache object holds other bytes, it is lost) is news for each file:
            # those are rare and each one names damage an operator must see; warnings (a remote refusing
            # uploads) are the floods this filter is for
            key: tuple[Any, ...] = (record.levelno, record.name, str(record.msg), getattr(record, "REMOTE", None),
                                    failures, h if record.levelno >= logging.ERROR else None)
        else:
            key = (record.levelno, record.getMessage())
        with self._lock:
            return self._count(record, key, per_kind)

    def _count(self, record: logging.LogRecord, key: tuple[Any, ...], per_kind: bool) -> bool:
        now = self.clock()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            return False
        if entry is not None and entry[1]:
            more = (f"{int(entry[1])} more like it for other files" if per_kind
                    else f"repeated {int(entry[1])} more times")
            record.msg = f"{record.getMessage()} ({more} in the last {self.window:.0f}s)"
            record.args = None
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        return True


class LineHandler(logging.StreamHandler):
    """A stream handler that formats a line before it takes the handler's lock, and holds the lock only
    to write it: the upload and ingest threads each write a line per file, and a line formatted
    under the lock made the others wait for it (a tenth of the samples in the logging calls)."""

    def handle(self, record: logging.LogRecord) -> bool:
        if not self.filter(record):
            return False
        try:
            line = self.format(record) + self.terminator
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return True
        with self.lock:  # type: ignore[union-attr]
            try:
                self.stream.write(line)
                self.stream.flush()
            except RecursionError:
                raise
            except Exception:
                self.handleError(record)
        return True


# What a name (a file dropped in the inbox, a remote's error) must not bring into a line as it is: line
# breaks (\n, \r, and those str.splitlines and some viewers break on) would forge a second log line, and
# control characters (ESC) would reach the terminal that shows it. Written as Python would escape them.
_BREAKS = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}
_CONTROLS = {**{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0)) if c != 0x09},
             0x0a: "\\n", 0x0d: "\\r", **_BREAKS}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        if line.isprintable():  # nearly every line
            return line
        # and a name that is not UTF-8 gets its \udcXX escapes here, as in JSON, whatever the stream's errors=
        return line.translate(_CONTROLS).encode("utf-8", "backslashreplace").decode("utf-8")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return timestamp(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (with its offset), level, logger, message, and the fields given."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": timestamp(record.created), "level": record.levelname.lower(),
                               "logger": record.name, "message": record.getMessage()}
        if self.node is not None:
            out["node"] = self.node
        for name in FIELD_NAMES:
            value = getattr(record, name, None)
            if value is not None:
                out[name.lower()] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        line = json.dumps(out, ensure_ascii=False)
        if line.isascii():  # nearly every line: nothing to escape (the round trip below was a tenth of it)
            return line
        # a name that is not UTF-8 (surrogate escapes) becomes a \udcXX escape, still valid JSON; the line
        # breaks JSON leaves as they are (U+2028, NEL) as \uXXXX, or a reader splitting lines cuts the line
        return line.encode("utf-8", "backslashreplace").decode("utf-8").translate(_BREAKS)


_SRCFILE = logging._srcfile  # type: ignore[attr-defined]


def record_details(on: bool) -> None:
    """Whether each record looks up its caller's file, line and function, and its thread's and process's
    names (the logging HOWTO's "Optimization"). The journal keeps them (CODE_FILE, CODE_LINE, THREAD_NAME);
    the text and JSON lines show none of them, and looking them up was a sixth of a line's cost."""
    logging._srcfile = _SRCFILE if on else None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = on


def setup_logging(level: str, log_format: str = "text", node: str | None = None) -> None:
    """`text`: the journal under systemd (JOURNAL_STREAM set; it keeps its own timestamps), else
    stderr with ISO timestamps; `json`: JSON lines on stderr in any case (for shipping elsewhere)."""
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler | None = None
    if log_format == "json":
        handler = LineHandler(sys.stderr)
        handler.setFormatter(JsonFormatter(node))
    elif os.environ.get("JOURNAL_STREAM"):
        try:
            from systemd.journal import JournalHandler
        except ImportError:
            pass
        else:
            extra = {"NODE": node} if node else {}
            handler = JournalHandler(SYSLOG_IDENTIFIER="cloudmanagerd", **extra)
            handler.setFormatter(logging.Formatter("%(message)s"))
    if handler is None:
        handler = LineHandler(sys.stderr)
        handler.setFormatter(TextFormatter())
    record_details(not isinstance(handler, LineHandler))
    handler.addFilter(RepeatFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("boto3").setLevel(logging.WARNING)
