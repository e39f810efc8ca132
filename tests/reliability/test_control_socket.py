"""The control socket and cloudmanagerctl under abuse: idle hordes, unread pipes, a stopped daemon, a closed pipe.

Issue 10, items 11, 12 and the ctl half of 13.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import Daemon, LineClient, module_daemon, wait_for

from cloudmanagerd.control import FIRST_REQUEST
from cloudmanagerd.fsutil import STALL

BIG = os.urandom(4 << 20)  # far more than a pipe holds


@pytest.fixture(scope="module")
def d() -> Iterator[Daemon]:
    with module_daemon("cm-relctl-", remotes=1) as d:
        for i in range(30):
            (d.inbox / f"f{i:02}.txt").write_bytes(f"file {i}\n".encode() * 50)
        (d.inbox / "big.bin").write_bytes(BIG)
        wait_for(lambda: len(d.files()) == 31, timeout=30, message="31 files registered")
        yield d
        assert "Traceback" not in d.log(), d.log()[-3000:]


def ctl(d: Daemon, *args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudmanagerd.ctl", "-c", str(d.config_path), *args],
                          stdout=stdout, stderr=subprocess.PIPE, timeout=120)


def timed_status(d: Daemon) -> float:
    started = time.monotonic()
    result = ctl(d, "status")
    assert result.returncode == 0, (result.stderr, d.log()[-3000:])
    return time.monotonic() - started


def threads_of(d: Daemon) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/task"))


# -- item 11 -------------------------------------------------------------------------------------------------

def test_two_hundred_idle_connections_do_not_lock_anyone_out(d: Daemon) -> None:
    idle = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(s)
            s.settimeout(10)
            s.connect(d.socket_path)
        for _ in range(3):
            assert timed_status(d) < 3.0
        assert ctl(d, "ls", "--limit", "3").returncode == 0
    finally:
        for s in idle:
            s.close()


def test_a_client_that_never_sends_a_request_is_closed_after_a_few_seconds(d: Daemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(FIRST_REQUEST + 10)
        s.connect(d.socket_path)
        started = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - started < FIRST_REQUEST + 5
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # half a request is no better
        s.settimeout(FIRST_REQUEST + 10)
        s.connect(d.socket_path)
        s.sendall(b'{"cmd": "sta')
        assert s.recv(100) == b""


def test_a_get_into_a_pipe_nobody_reads_ends_and_frees_its_thread(d: Daemon) -> None:
    h = hashlib.sha256(BIG).hexdigest()
    before = threads_of(d)
    r, w = os.pipe()
    c = LineClient(d.socket_path, timeout=STALL + 30)
    try:
        socket.send_fds(c.sock, [json.dumps({"cmd": "get", "hash": h}).encode() + b"\n"], [w])
        os.close(w)
        w = -1
        replies: list = []
        reader = threading.Thread(target=lambda: replies.append(_final(c)))
        reader.start()
        started = time.monotonic()
        # meanwhile everyone else is served
        while reader.is_alive() and time.monotonic() - started < STALL - 5:
            assert timed_status(d) < 3.0
            reader.join(1)
        reader.join(STALL + 30)
        assert not reader.is_alive()
        reply = replies[0]
        assert reply["ok"] is False and "nothing was read" in reply["error"], reply
        assert time.monotonic() - started < STALL + 15
    finally:
        c.close()
        os.close(r)
        if w >= 0:
            os.close(w)
    # its request slot is free again: as many gets into unread pipes as there are slots would now
    # starve status if it were not (the next test holds them all); here a plain get still works.
    # (Counting the process's threads is no measure: the scheduler's pool grows as jobs run.)
    with open(os.devnull, "wb") as sink:
        reply = d.request({"cmd": "get", "hash": h}, fds=[sink.fileno()])
    assert reply["ok"], reply
    assert threads_of(d) <= before + 12  # no thread per abandoned request piles up


def _final(c: LineClient) -> dict:
    while True:
        reply = c.reply()
        assert reply is not None
        if "progress" not in reply:
            return reply


def test_status_is_answered_while_every_request_slot_is_busy(d: Daemon) -> None:
    """MAX_BUSY gets into unread pipes hold every ordinary slot; status has its reserve."""
    from cloudmanagerd.control import MAX_BUSY
    h = hashlib.sha256(BIG).hexdigest()
    pipes, clients = [], []
    try:
        for _ in range(MAX_BUSY):
            r, w = os.pipe()
            pipes.append(r)
            c = LineClient(d.socket_path, timeout=STALL + 30)
            clients.append(c)
            socket.send_fds(c.sock, [json.dumps({"cmd": "get", "hash": h}).encode() + b"\n"], [w])
            os.close(w)
        wait_for(lambda: all(_pipe_full(r) for r in pipes), timeout=30, message="every get blocked on its pipe")
        assert timed_status(d) < 3.0
        refused = ctl(d, "info", h[:8])
        assert refused.returncode == 1 and "too many requests" in refused.stderr.decode(), refused.stderr
    finally:
        for c in clients:
            c.close()
        for r in pipes:
            os.close(r)  # the gets end at once: EPIPE


def _pipe_full(r: int) -> bool:
    import fcntl
    import termios
    buf = bytearray(4)
    fcntl.ioctl(r, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder) >= 4096


# -- item 12 -------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def stopped(d: Daemon) -> Iterator[None]:
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)


def test_ctl_gives_up_on_a_stopped_daemon_with_exit_3(d: Daemon) -> None:
    with stopped(d):
        for args, limit in ((("--timeout", "1", "status"), 6), (("status", "--check"), 16),
                            (("--timeout", "1", "get", "abcdef", "-o", "/dev/null"), 6)):
            started = time.monotonic()
            result = ctl(d, *args)
            elapsed = time.monotonic() - started
            assert result.returncode == 3, (args, result.stderr)
            # a monitoring check says it on stdout (the Nagios plugin convention: UNKNOWN)
            lines = (result.stdout if "--check" in args else result.stderr).decode().splitlines()
            assert len(lines) == 1 and "did not answer" in lines[0], lines
            assert elapsed < limit, (args, elapsed)
    assert timed_status(d) < 3.0


def test_a_long_get_outlives_the_timeout_while_progress_comes(d: Daemon) -> None:
    """A consumer slower than --timeout: the daemon's heartbeats keep ctl waiting, and the bytes arrive."""
    h = hashlib.sha256(BIG).hexdigest()
    proc = subprocess.Popen([sys.executable, "-m", "cloudmanagerd.ctl", "-c", str(d.config_path), "--timeout", "1",
                             "get", h], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.read(65536)
        time.sleep(4)  # the consumer pauses (this is the behaviour under test, not a synchronisation)
        rest = proc.stdout.read()
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert hashlib.sha256(first + rest).digest() == hashlib.sha256(BIG).digest()


# -- item 13 (ctl) -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [("status",), ("ls",), ("--json", "ls"), ("get", "BIG")])
def test_output_into_a_closed_pipe_exits_quietly(d: Daemon, args: tuple[str, ...]) -> None:
    if args[-1] == "BIG":
        args = ("get", hashlib.sha256(BIG).hexdigest())
    r, w = os.pipe()
    os.close(r)  # like `| head -1` once head has gone
    try:
        result = ctl(d, *args, stdout=w)
    finally:
        os.close(w)
    assert "Traceback" not in result.stderr.decode(), result.stderr.decode()
    assert result.stderr == b"", result.stderr.decode()
    assert result.returncode == 128 + signal.SIGPIPE


def test_status_piped_into_head_prints_one_line_and_no_traceback(d: Daemon) -> None:
    result = subprocess.run(f"{sys.executable} -m cloudmanagerd.ctl -c {d.config_path} ls | head -1",
                            shell=True, capture_output=True, timeout=60)
    assert result.returncode == 0
    assert len(result.stdout.splitlines()) == 1
    assert b"Traceback" not in result.stderr


def test_copies_into_a_descriptor_nobody_reads_fail_after_the_stall(tmp_path) -> None:
    """The bound behind `backup -o` into a pipe (fsutil.copy_fd) and `get` (fsutil.write_all), with a short stall."""
    from cloudmanagerd.fsutil import StalledWrite, copy_fd, nonblocking, write_all
    src = tmp_path / "src"
    src.write_bytes(os.urandom(1 << 20))
    r, w = os.pipe()
    try:
        with nonblocking(w), open(src, "rb") as f:
            started = time.monotonic()
            with pytest.raises(StalledWrite):
                copy_fd(f.fileno(), w, stall=0.3)
            with pytest.raises(StalledWrite):
                write_all(w, b"x" * 100_000, stall=0.3)
            assert time.monotonic() - started < 5
        assert os.get_blocking(w), "the descriptor's flags are put back"
    finally:
        os.close(r)
        os.close(w)
