"""Logging: repeated errors are rate-limited with a count, journal fields are lifted out of messages,
and under systemd (JOURNAL_STREAM) the log goes to the journal, to stderr otherwise."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from systemd.journal import JournalHandler

from cloudmanagerd.logs import FieldsFilter, RepeatFilter, setup_logging

H = "0123456789abcdef" * 4


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: object, level: int = logging.ERROR, name: str = "cloudmanagerd") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args or None, None)


def passes(f: logging.Filter, rec: logging.LogRecord) -> bool:
    return bool(f.filter(rec))


# -- RepeatFilter ------------------------------------------------------------------------------

def test_identical_errors_pass_once_per_window_then_with_a_count() -> None:
    clock = Clock()
    f = RepeatFilter(window=60, clock=clock)
    assert passes(f, record("remote %s: connection refused", "nas"))
    for _ in range(5):
        clock.now += 10
        assert not passes(f, record("remote %s: connection refused", "nas"))
    clock.now += 11  # 61 s after the first: the window is over
    rec = record("remote %s: connection refused", "nas")
    assert passes(f, rec)
    assert rec.getMessage() == "remote nas: connection refused (repeated 5 more times in the last 60s)"

    # a new window starts: silent again, and a message after a quiet window carries no count
    clock.now += 1
    assert not passes(f, record("remote %s: connection refused", "nas"))
    clock.now += 120
    again = record("remote %s: connection refused", "nas")
    assert passes(f, again)
    assert again.getMessage() == "remote nas: connection refused (repeated 1 more times in the last 60s)"
    clock.now += 120
    quiet = record("remote %s: connection refused", "nas")
    assert passes(f, quiet)
    assert quiet.getMessage() == "remote nas: connection refused"


def test_different_messages_and_levels_are_limited_independently() -> None:
    clock = Clock()
    f = RepeatFilter(window=60, clock=clock)
    assert passes(f, record("remote nas: down"))
    assert passes(f, record("remote s3: down"))
    assert passes(f, record("remote nas: down", level=logging.WARNING))
    clock.now += 1
    assert not passes(f, record("remote nas: down"))
    assert not passes(f, record("remote s3: down"))
    assert not passes(f, record("remote nas: down", level=logging.WARNING))
    assert passes(f, record("remote gdrive: down"))
    # the same text from other arguments is another message
    assert passes(f, record("upload of %s failed", "a"))
    assert passes(f, record("upload of %s failed", "b"))
    assert not passes(f, record("upload of %s failed", "a"))


def test_info_and_debug_are_never_limited() -> None:
    clock = Clock()
    f = RepeatFilter(window=60, clock=clock)
    for _ in range(100):
        assert passes(f, record("uploaded hash=%s remote=nas", H, level=logging.INFO))
        assert passes(f, record("scan", level=logging.DEBUG))


def test_memory_stays_bounded_with_many_distinct_messages() -> None:
    clock = Clock()
    f = RepeatFilter(window=60, clock=clock, remember=100)
    for i in range(10_000):
        assert passes(f, record("file %d failed", i))
    assert len(f._seen) <= 100


# -- FieldsFilter ------------------------------------------------------------------------------

def test_fields_filter_lifts_hash_remote_and_attempt() -> None:
    f = FieldsFilter()
    rec = record("upload of hash=%s to remote=%s failed (attempt=%d, next in 30s): refused", H, "nas", 3,
                 level=logging.WARNING)
    assert passes(f, rec)
    assert (rec.HASH, rec.REMOTE, rec.ATTEMPT) == (H, "nas", "3")

    rec = record("uploaded hash=%s remote=s3-eu, size=12", H, level=logging.INFO)
    assert passes(f, rec)
    assert rec.HASH == H and rec.REMOTE == "s3-eu" and not hasattr(rec, "ATTEMPT")

    rec = record("cache full: 12 files waiting for uploads")
    assert passes(f, rec)
    assert not any(hasattr(rec, k) for k in ("HASH", "REMOTE", "ATTEMPT"))

    rec = record("hash=%s is not a hash", H[:63])  # 63 digits: not a hash
    assert passes(f, rec) and not hasattr(rec, "HASH")


# -- setup_logging: journal under systemd, stderr otherwise -------------------------------------

@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    others = {name: logging.getLogger(name).level for name in ("apscheduler", "watchdog", "botocore", "boto3")}
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in others.items():
        logging.getLogger(name).setLevel(lvl)


def test_under_systemd_the_log_goes_to_the_journal_with_fields(monkeypatch: pytest.MonkeyPatch,
                                                                restore_logging: None) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    setup_logging("info")
    root = logging.getLogger()
    assert len(root.handlers) == 1
    handler = root.handlers[0]
    assert isinstance(handler, JournalHandler)
    assert root.level == logging.INFO

    sent: list[tuple[str, dict[str, object]]] = []

    def fake_send(message: str, /, **fields: object) -> None:  # systemd.journal.send's shape
        sent.append((message, fields))

    handler.send = fake_send
    log = logging.getLogger("cloudmanagerd.uploads")
    log.info("uploaded hash=%s remote=%s size=%d", H, "nas", 3)
    log.debug("not at info")
    for _ in range(3):
        log.warning("upload of hash=%s to remote=%s failed (attempt=%d): refused", H, "nas", 1)
    assert len(sent) == 2, sent  # debug dropped; the repeated warning only once

    message, fields = sent[0]
    assert message == f"uploaded hash={H} remote=nas size=3"  # the journal keeps its own timestamp
    assert fields["HASH"] == H and fields["REMOTE"] == "nas"
    assert fields["SYSLOG_IDENTIFIER"] == "cloudmanagerd"
    assert fields["PRIORITY"] == "6"
    message, fields = sent[1]
    assert fields["ATTEMPT"] == "1" and fields["PRIORITY"] == "4"


def test_without_systemd_the_log_goes_to_stderr(monkeypatch: pytest.MonkeyPatch, restore_logging: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("warning")
    root = logging.getLogger()
    assert len(root.handlers) == 1 and not isinstance(root.handlers[0], JournalHandler)
    log = logging.getLogger("cloudmanagerd.uploads")
    log.info("hidden at warning")
    log.error("remote nas: access denied")
    log.error("remote nas: access denied")
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert err.count("remote nas: access denied") == 1
    assert "ERROR cloudmanagerd.uploads: remote nas: access denied" in err
