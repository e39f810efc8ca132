"""Logging: repeated errors are rate-limited with a count, journal fields are lifted out of messages,
and under systemd (JOURNAL_STREAM) the log goes to the journal, to stderr otherwise."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator

import pytest
from systemd.journal import JournalHandler

from cloudmanagerd.logs import (COPY_BAD, FILE_AT_RISK, FILE_SAFE, REMOTE_BACK, REMOTE_DOWN, RepeatFilter, fields,
                                record_details, setup_logging, timestamp)

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


# -- per kind: messages about files --------------------------------------------------------------

def about(msg: str, *args: object, h: str = H, remote: str | None = "nas", level: int = logging.WARNING):
    rec = record(msg, *args, level=level)
    for key, value in fields(h, remote).items():
        setattr(rec, key, value)
    return rec


def test_a_dead_remote_writes_one_line_a_window_not_one_per_file() -> None:
    clock = Clock()
    f = RepeatFilter(window=60, clock=clock)
    template = "upload of hash=%s to remote=%s failed (attempt=%d, next in 30s): refused"
    hashes = [f"{i:064x}" for i in range(500)]
    passed = [passes(f, about(template, h, "nas", 1, h=h)) for h in hashes]
    assert passed.count(True) == 1
    assert passes(f, about(template, H, "s3", 1, remote="s3"))  # another remote is another kind
    clock.now += 61
    rec = about(template, H, "nas", 2)
    assert passes(f, rec)
    assert rec.getMessage().endswith("(499 more like it for other files in the last 60s)")
    # messages without a file are limited per text, as before
    assert passes(f, record("remote %s: connection refused", "nas"))
    assert passes(f, record("remote %s: connection refused", "s3"))


def test_per_kind_limiting_never_hides_a_file_at_risk_nor_a_different_failure() -> None:
    f = RepeatFilter(window=60, clock=Clock())
    # two files lost within a minute: each is an alert of its own (journalctl HASH=... must find both)
    for h in (H, "f" * 64):
        rec = about("hash=%s has no good copy left and is not cached here: the file is lost", h, h=h,
                    remote=None, level=logging.ERROR)
        rec.MESSAGE_ID = FILE_AT_RISK
        assert passes(f, rec), h
    for h in (H, "e" * 64):
        rec = about("remote %s: %s; marked bad, a new copy will be made", "nas", f"copy of {h} is missing", h=h,
                    level=logging.ERROR)
        rec.MESSAGE_ID = COPY_BAD
        assert passes(f, rec), h
    # a remote that flaps: down, back, down with the same error within the minute; the last word must be "down"
    down = record("remote %s: %s", "nas", "connection refused")
    down.MESSAGE_ID, down.REMOTE = REMOTE_DOWN, "nas"
    back = record("remote %s works again", "nas", level=logging.INFO)
    again = record("remote %s: %s", "nas", "connection refused")
    again.MESSAGE_ID, again.REMOTE = REMOTE_DOWN, "nas"
    assert passes(f, down) and passes(f, back) and passes(f, again)
    # the same kind of warning with another failure behind it is news; the same failure for another file is not
    template = "upload of hash=%s to remote=%s failed (attempt=%d, next in 30s): %s"
    assert passes(f, about(template, H, "nas", 1, OSError(f"copy of {H} is missing")))
    assert not passes(f, about(template, "d" * 64, "nas", 1, OSError(f"copy of {'d' * 64} is missing"), h="d" * 64))
    assert passes(f, about(template, "c" * 64, "nas", 1, OSError("No space left on device"), h="c" * 64))


def test_fields_are_only_those_given() -> None:
    assert fields(H, "nas", 3, FILE_SAFE) == {"HASH": H, "REMOTE": "nas", "ATTEMPT": "3", "MESSAGE_ID": FILE_SAFE}
    assert fields(remote="nas") == {"REMOTE": "nas"}
    ids = [FILE_SAFE, FILE_AT_RISK, REMOTE_DOWN, REMOTE_BACK, COPY_BAD]
    assert len(set(ids)) == 5 and all(len(i) == 32 and int(i, 16) for i in ids)


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
    record_details(True)  # the text and JSON handlers turn the caller's file and line off
    for name, lvl in others.items():
        logging.getLogger(name).setLevel(lvl)


def test_under_systemd_the_log_goes_to_the_journal_with_fields(monkeypatch: pytest.MonkeyPatch,
                                                                restore_logging: None) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    setup_logging("info", node="n7")
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
    log.info("uploaded %s to %s, size %d", H[:12], "nas", 3, extra=fields(H, "nas"))  # fields, not words
    log.debug("not at info")
    for _ in range(3):
        log.warning("upload of hash=%s to remote=%s failed (attempt=%d): refused", H, "nas", 1,
                    extra=fields(H, "nas", 1))
    assert len(sent) == 2, sent  # debug dropped; the repeated warning only once

    message, sent_fields = sent[0]
    assert message == f"uploaded {H[:12]} to nas, size 3"  # the journal keeps its own timestamp
    assert sent_fields["HASH"] == H and sent_fields["REMOTE"] == "nas" and sent_fields["NODE"] == "n7"
    assert sent_fields["SYSLOG_IDENTIFIER"] == "cloudmanagerd"
    assert sent_fields["PRIORITY"] == "6"
    message, sent_fields = sent[1]
    assert sent_fields["ATTEMPT"] == "1" and sent_fields["PRIORITY"] == "4"


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
    stamp = err.split(" ")[0]  # ISO 8601 with the zone's offset: 2026-11-29T20:37:18.123+00:00
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", stamp), err


def test_json_lines_carry_time_with_offset_level_fields_and_node(monkeypatch: pytest.MonkeyPatch,
                                                                  restore_logging: None,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")  # json goes to stderr even under systemd
    setup_logging("info", "json", node="n7")
    log = logging.getLogger("cloudmanagerd.uploads")
    log.info("hash=%s is safe", H, extra=fields(H, message_id=FILE_SAFE))
    log.warning("remote %s: %s", "nas", "refused \"x\"\nsecond line", extra=fields(remote="nas"))
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("unexpected")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 3
    first, second, third = lines
    assert first["message"] == f"hash={H} is safe" and first["hash"] == H and first["message_id"] == FILE_SAFE
    assert first["level"] == "info" and first["logger"] == "cloudmanagerd.uploads" and first["node"] == "n7"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", first["time"])
    assert second["remote"] == "nas" and "hash" not in second and second["message"].endswith("second line")
    assert "ValueError: boom" in third["exception"]


# -- a real daemon ----------------------------------------------------------------------------------

def test_a_real_daemon_logs_json_with_fields_and_message_ids(daemon_factory) -> None:
    from pathlib import Path

    from conftest import wait_for

    d = daemon_factory(log={"level": "info", "format": "json"},
                       upload={"redundancy": 2, "min_redundancy": 1, "retry": {"initial": "1s", "max": "1s"}})
    r1 = Path(d.config["remotes"][1]["path"])
    r1.rename(r1.with_name("away"))
    data = b"journal fields" * 100
    (d.inbox / "a").write_bytes(data)
    h = __import__("hashlib").sha256(data).hexdigest()

    def entries() -> list[dict]:
        return [json.loads(line) for line in d.log().splitlines() if line.strip()]

    def with_id(message_id: str) -> list[dict]:
        return [e for e in entries() if e.get("message_id") == message_id]

    wait_for(lambda: with_id(REMOTE_DOWN) and with_id(FILE_SAFE), timeout=30, message="remote down and file safe")
    r1.with_name("away").rename(r1)
    wait_for(lambda: with_id(REMOTE_BACK), timeout=30, message="remote back")
    assert d.stop() == 0

    all_entries = entries()  # every line of the daemon's output is one JSON object
    safe, = with_id(FILE_SAFE)
    assert safe["hash"] == h and safe["node"] == d.config.get("node", safe["node"])
    down = with_id(REMOTE_DOWN)[0]
    assert down["remote"] == "r1" and down["level"] == "error"
    assert with_id(REMOTE_BACK)[0]["remote"] == "r1"
    registered = [e for e in all_entries if e["message"].startswith("registered")]
    assert registered and registered[0]["hash"] == h
    failed = [e for e in all_entries if e.get("attempt")]
    assert failed and failed[0]["hash"] == h and failed[0]["remote"] == "r1"
    assert all(re.search(r"[+-]\d\d:\d\d$", e["time"]) for e in all_entries)


def test_every_file_made_safe_is_said_once_even_when_its_copies_land_together(daemon_factory) -> None:
    """FILE_SAFE is the audit trail of "this file is safe": with min_redundancy 1 and two remotes
    uploading at once, both copies are often recorded before either is announced; counting the
    good copies afterwards saw 2 for both and said nothing (46 of 150 files unsaid)."""
    import os

    from conftest import wait_for

    d = daemon_factory(log={"level": "info", "format": "json"}, upload={"redundancy": 2, "min_redundancy": 1})
    for i in range(150):
        (d.inbox / f"f{i}").write_bytes(os.urandom(100 + i))
    wait_for(lambda: d.status()["uploads"]["copies"] == 300, timeout=60, message="300 copies")
    assert d.stop() == 0
    safe = [json.loads(line)["hash"] for line in d.log().splitlines() if FILE_SAFE in line]
    assert len(safe) == len(set(safe)) == 150


def test_damage_to_each_file_is_written_for_each_file_and_repeats_of_one_file_are_still_limited() -> None:
    # two cache objects found rotten within a minute: the second must not hide behind the first
    f = RepeatFilter(window=60, clock=Clock())
    template = "cache object hash=%s holds other bytes; dropping it and fetching it again"
    assert passes(f, about(template, H, h=H, remote=None, level=logging.ERROR))
    assert passes(f, about(template, "f" * 64, h="f" * 64, remote=None, level=logging.ERROR))
    assert not passes(f, about(template, H, h=H, remote=None, level=logging.ERROR))


def test_lines_written_by_many_threads_at_once_are_whole_and_none_is_lost(
        monkeypatch: pytest.MonkeyPatch, restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    # each upload thread writes a line per file: the handler formats outside its lock, writes under it
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    for log_format in ("text", "json"):
        setup_logging("info", log_format, node="n1")

        def work(n: int) -> None:
            log = logging.getLogger(f"cloudmanagerd.t{n}")
            for i in range(500):
                log.info("uploaded hash=%s remote=%s n=%d i=%d", H, "nas", n, i, extra=fields(H, "nas"))

        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 3000
        if log_format == "json":
            said = [json.loads(line)["message"] for line in lines]
        else:
            assert all(re.fullmatch(r"\S+ INFO cloudmanagerd\.t\d: uploaded .*", line) for line in lines), lines[:3]
            said = [line.split(": ", 1)[1] for line in lines]
        assert sorted(said) == sorted(f"uploaded hash={H} remote=nas n={n} i={i}" for n in range(6) for i in range(500))


def test_timestamps_are_the_local_time_with_its_offset_across_a_dst_change(monkeypatch: pytest.MonkeyPatch) -> None:
    # the date, time and offset are worked out once a second: a second across a DST change must not
    # keep the old offset, and the milliseconds round as datetime rounds them
    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    try:
        change = 1711846800  # 2024-03-31 01:00 UTC: 02:00 +01:00 became 03:00 +02:00
        for t in (change - 1.0, change - 0.0004, change - 0.0005, change, change + 0.9995, change + 0.0996,
                  change + 3600.123, 1730595600.5, 0.25, time.time()):
            assert timestamp(t) == datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")
        assert timestamp(change - 0.5).endswith("+01:00") and timestamp(change + 0.5).endswith("+02:00")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert os.environ.get("TZ") is None


def test_json_lines_escape_a_name_that_is_not_utf8(monkeypatch: pytest.MonkeyPatch, restore_logging: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("info", "json")
    logging.getLogger("cloudmanagerd.ingest").info("registered %s", os.fsdecode(b"caf\xe9 \xc3\xa9t\xc3\xa9"))
    line = capsys.readouterr().err.strip()
    assert "caf\\udce9 \u00e9t\u00e9" in line  # the byte escaped, the UTF-8 kept as it is
    assert json.loads(line)["message"] == "registered caf\udce9 \u00e9t\u00e9"


def test_the_journal_gets_the_callers_file_line_and_thread_even_after_a_text_setup(
        monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    # the text and JSON handlers turn the caller lookups off process-wide: a later journal setup turns them on
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("info", "json")
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    setup_logging("info")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, JournalHandler)
    sent: list[dict[str, object]] = []
    handler.send = lambda message, /, **fields: sent.append(fields)
    logging.getLogger("cloudmanagerd.ingest").warning("file at risk %s", H, extra={"MESSAGE_ID": FILE_AT_RISK})
    (got,) = sent
    assert got["CODE_FILE"] == __file__ and int(str(got["CODE_LINE"])) > 0
    assert got["CODE_FUNC"] == "test_the_journal_gets_the_callers_file_line_and_thread_even_after_a_text_setup"
    assert got["THREAD_NAME"] == threading.current_thread().name
    assert got["MESSAGE_ID"] == FILE_AT_RISK


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_name_with_a_line_break_or_control_characters_cannot_forge_a_log_line(
        log_format: str, monkeypatch: pytest.MonkeyPatch, restore_logging: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    # a file dropped as "x\n<time> ERROR cloudmanagerd.uploads: remote nas down" must stay one line
    # that reads as what it is, in the text log as in JSON; and no escape sequence reaches a terminal
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("info", log_format)
    forged = "2026-01-01T00:00:00.000+00:00 ERROR cloudmanagerd.uploads: remote nas down"
    names = [f"x\n{forged}", f"y\r{forged}", f"z\u2028{forged}", "w\x1b[2Jcleared\x00\x7f\x85",
             os.fsdecode(b"v\xff\n") + forged]
    log = logging.getLogger("cloudmanagerd.ingest")
    for name in names:
        log.info("registered %s", name)
    lines = capsys.readouterr().err.splitlines()  # splitlines: \r, \u2028, \x85 ... count as breaks too
    assert len(lines) == len(names), lines
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert not any("\x1b" in line or "\x00" in line for line in lines)
    if log_format == "json":
        assert [json.loads(line)["message"] for line in lines] == [f"registered {n}" for n in names]
    else:
        assert "registered x\\n2026-01-01T00:00:00.000+00:00 ERROR" in lines[0]
        assert lines[4].endswith("registered v\\udcff\\n2026-01-01T00:00:00.000+00:00 ERROR cloudmanagerd.uploads: "
                                 "remote nas down")


def test_timestamps_stay_right_across_midnight_and_a_clock_stepped_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # the per-second cache is keyed by the record's own second: a clock stepped back an hour (or a
    # day), then forward again, and a record of a second before one already stamped, all come out right
    monkeypatch.setenv("TZ", "Asia/Kathmandu")  # +05:45: the offset's minutes must be kept
    time.tzset()
    try:
        midnight = datetime.datetime(2026, 3, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=45)))
        m = midnight.timestamp()
        for t in (m - 0.001, m, m - 0.0004, m + 0.999, m - 3600.25, m - 86400.5, m + 0.5, m - 1e-7, m + 1 - 1e-7):
            assert timestamp(t) == datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")
        assert timestamp(m - 0.001) == "2026-02-28T23:59:59.999+05:45"
        assert timestamp(m) == "2026-03-01T00:00:00.000+05:45"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()

