"""sd_notify as systemd sees it: a real NOTIFY_SOCKET in the test records every datagram the daemon sends.

READY=1 (with MAINPID) once the control socket answers, STATUS= when the summary changes,
WATCHDOG=1 at half of WATCHDOG_USEC and only while the pipeline is healthy, RELOADING=1 then
READY=1 around a SIGHUP, STOPPING=1 on SIGTERM, and "reload failed: ..." for a broken config.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import Daemon, wait_for

WATCHDOG_USEC = 1_000_000  # systemd's WatchdogSec=1s: the daemon must ping every 0.5 s
INTERVAL = WATCHDOG_USEC / 1e6


class NotifyRecorder:
    """A datagram socket standing in for systemd's notify socket; every message is kept with its arrival time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        self.sock.settimeout(0.05)
        self._messages: list[tuple[float, list[str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-recorder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                self._messages.append((time.monotonic(), data.decode(errors="replace").split("\n")))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        with_suppress_unlink(self.path)

    def messages(self, after: float = 0.0) -> list[tuple[float, list[str]]]:
        with self._lock:
            return [(t, fields) for t, fields in self._messages if t >= after]

    def times(self, field: str, after: float = 0.0) -> list[float]:
        """Arrival times of every message carrying exactly `field` (e.g. "WATCHDOG=1")."""
        return [t for t, fields in self.messages(after) if field in fields]

    def values(self, prefix: str, after: float = 0.0) -> list[tuple[float, str]]:
        """(time, value) of every field starting with `prefix` (e.g. "STATUS=")."""
        return [(t, f[len(prefix):]) for t, fields in self.messages(after) for f in fields if f.startswith(prefix)]


def with_suppress_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@pytest.fixture
def notify(workdir: Path) -> Iterator[NotifyRecorder]:
    rec = NotifyRecorder(str(workdir / "notify.sock"))
    yield rec
    rec.close()


def start_notified(d: Daemon, rec: NotifyRecorder, **extra_env: str) -> list[str]:
    """Start the daemon under our notify socket; the fields of its READY=1 message."""
    d.start(wait=False, env={"NOTIFY_SOCKET": rec.path, "WATCHDOG_USEC": str(WATCHDOG_USEC), **extra_env})

    def ready() -> list[str] | None:
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {d.proc.returncode}: {d.log()[-2000:]}")
        return next((fields for _, fields in rec.messages() if "READY=1" in fields), None)

    return wait_for(ready, timeout=30, message="READY=1")


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def write_config(d: Daemon) -> None:
    d.config_path.write_text(yaml.safe_dump(d.config))


# -- READY, STATUS, WATCHDOG, RELOADING, STOPPING ------------------------------------------------

def test_ready_status_watchdog_reload_and_stop(daemon_factory, notify: NotifyRecorder) -> None:
    d = daemon_factory(start=False)
    ready = start_notified(d, notify)

    # READY=1 comes once the control socket answers: one attempt, no retry, must succeed
    reply = d.request({"cmd": "status"})
    assert reply["ok"], reply
    assert f"MAINPID={d.proc.pid}" in ready, ready

    # STATUS= says what the daemon holds, and changes when a file arrives
    wait_for(lambda: any(v.startswith("0 files") for _, v in notify.values("STATUS=")),
             message="STATUS=0 files ...")
    (d.inbox / "one.txt").write_bytes(b"one file\n" * 100)
    wait_for(lambda: any(v.startswith("1 files") for _, v in notify.values("STATUS=")), timeout=20,
             message="STATUS=1 files ...")
    statuses = [v for _, v in notify.values("STATUS=")]
    assert all(len(s.splitlines()) == 1 and s for s in statuses), statuses
    assert all(a != b for a, b in zip(statuses, statuses[1:])), f"STATUS= repeated unchanged: {statuses}"
    assert "cache" in statuses[-1] and "uploads pending" in statuses[-1], statuses[-1]

    # WATCHDOG=1 at about half the interval, steadily
    ready_at = notify.times("READY=1")[0]
    wait_for(lambda: len(notify.times("WATCHDOG=1", after=ready_at)) >= 7, timeout=15,
             message="several WATCHDOG=1 pings")
    pings = notify.times("WATCHDOG=1", after=ready_at)
    spacing = gaps(pings)
    assert 0.25 <= statistics.median(spacing) <= 0.8, f"pings should come every ~{INTERVAL / 2}s: {spacing}"
    assert max(spacing) < INTERVAL, f"a gap reached WatchdogSec ({INTERVAL}s); systemd would kill us: {spacing}"

    # SIGHUP: RELOADING=1, then READY=1 again, and the daemon goes on pinging
    hup = time.monotonic()
    d.proc.send_signal(signal.SIGHUP)
    reloading = wait_for(lambda: notify.times("RELOADING=1", after=hup), message="RELOADING=1")[0]
    wait_for(lambda: notify.times("READY=1", after=reloading), message="READY=1 after RELOADING=1")
    wait_for(lambda: len(notify.times("WATCHDOG=1", after=reloading)) >= 2, message="pings after the reload")
    assert "reloaded" in d.log()
    assert d.status()["state"] == "running"

    # SIGTERM: STOPPING=1, exit 0, the control socket is gone and ctl says the daemon is unreachable
    term = time.monotonic()
    assert d.stop() == 0
    wait_for(lambda: notify.times("STOPPING=1", after=term), message="STOPPING=1")
    assert not os.path.exists(d.socket_path), "the control socket was left behind"
    result = d.ctl("status")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in d.log()


def test_a_wedged_ingest_stage_stops_the_watchdog_but_not_the_socket(daemon_factory,
                                                                      notify: NotifyRecorder) -> None:
    d = daemon_factory(start=False)
    start_notified(d, notify, CLOUDMANAGERD_FAULT="wedge-ingest")
    ready_at = notify.times("READY=1")[0]
    wait_for(lambda: len(notify.times("WATCHDOG=1", after=ready_at)) >= 3, message="pings while healthy")

    (d.inbox / "stuck.bin").write_bytes(b"this file wedges the ingest thread\n" * 10)
    wait_for(lambda: "the ingest thread now hangs" in d.log(), message="the ingest thread to wedge")
    wedged = time.monotonic()

    # the pings stop: silence for 4 ping periods (healthy() allows max(3 s, 2 x interval) without progress)
    wait_for(lambda: time.monotonic() - notify.times("WATCHDOG=1")[-1] > 2 * INTERVAL, timeout=15,
             message="WATCHDOG=1 to stop")
    last_ping = notify.times("WATCHDOG=1")[-1]
    assert last_ping - wedged < 3.0 + INTERVAL + 1.5, "the pings went on too long after the wedge"

    # the control socket answers meanwhile, promptly; the file is still in the inbox, not registered
    started = time.monotonic()
    s = d.status()
    assert time.monotonic() - started < 1.0
    assert s["catalog"]["files"] == 0 and (d.inbox / "stuck.bin").exists()
    # still no ping: the wedge is not a blip
    assert notify.times("WATCHDOG=1")[-1] == last_ping
    assert d.stop() == 0


def test_a_broken_reload_says_so_in_status_and_keeps_running(daemon_factory, notify: NotifyRecorder) -> None:
    d = daemon_factory(start=False)
    start_notified(d, notify)
    good = dict(d.config)
    d.config = {**good, "cache": {**good["cache"], "capacity": "-5MiB"}}
    write_config(d)

    hup = time.monotonic()
    d.proc.send_signal(signal.SIGHUP)
    reloading = wait_for(lambda: notify.times("RELOADING=1", after=hup), message="RELOADING=1")[0]
    failed = wait_for(lambda: [v for _, v in notify.values("STATUS=", after=reloading)
                               if v.startswith("reload failed: ")], message="STATUS=reload failed: ...")
    assert "cache.capacity" in failed[0], failed
    wait_for(lambda: notify.times("READY=1", after=reloading), message="READY=1 after the failed reload")

    # the old config runs on: same capacity, still healthy, still pinging
    assert d.proc.poll() is None
    s = d.status()
    assert s["cache"]["capacity"] == 2**30 and s["state"] == "degraded"
    assert s["problems"][0].startswith("reload failed: cache.capacity")
    wait_for(lambda: len(notify.times("WATCHDOG=1", after=reloading)) >= 2, message="pings after the failed reload")

    # a fixed config reloads, and STATUS= goes back to the summary
    d.config = {**good, "cache": {**good["cache"], "capacity": "2GiB"}}
    write_config(d)
    again = time.monotonic()
    d.proc.send_signal(signal.SIGHUP)
    # the capacity is applied inside the reload; the state says "running" once the reload has ended
    wait_for(lambda: (s := d.status())["cache"]["capacity"] == 2 * 2**30 and s["state"] == "running",
             message="the fixed config applied and the reload ended")
    assert d.status()["problems"] == []
    wait_for(lambda: any(v.startswith("0 files") and "2.0 GiB" in v for _, v in notify.values("STATUS=", after=again)),
             message="STATUS= summary with the new capacity")
    assert d.stop() == 0
