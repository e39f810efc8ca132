"""The control socket against hostile or broken clients, and the socket file's life around the daemon.

tests/test_ctl.py covers single bad requests and oversized lines; here: wrong types, clients
that hang or never read, 50 at once, descriptors pushed at the daemon, and after each case the
daemon's own descriptors and threads (/proc/<pid>/fd, /proc/<pid>/task) go back to where they
were while a normal `status` is still answered quickly. Then the socket path: a stale socket is
replaced, a regular file is never deleted, a second daemon on the same state refuses to start,
and the socket's mode and group follow the config.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, LineClient, module_daemon, wait_for

from cloudmanagerd.control import MAX_BUSY, MAX_IDLE
from cloudmanagerd.protocol import HEARTBEAT

DATA = b"a file the abuse must not harm\n" * 64
FD_SLACK = 4       # a lazily opened cache folder descriptor is no leak
THREAD_SLACK = 16  # nor the pools' lazily started threads (scheduler 10, uploads 4), waiting on futexes;
WAITER_SLACK = 2   # threads waiting on a socket (control clients, the accept loop, the observer) are counted apart
# SQLite cannot close a database descriptor while the process holds POSIX locks on the file (closing
# any descriptor would drop them all): a closed connection's descriptor waits for reuse by the next
# connection. After N clients at once, up to N such descriptors remain, reused by the next ones: bounded
# by the clients at once, where a leak grows with every client (200 clients below would add 400).
CATALOG_SLACK = MAX_BUSY + 16


def fd_kinds(pid: int) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            kinds[target] = kinds.get(target, 0) + 1
    return kinds


def Conn(path: str, timeout: float = 10) -> LineClient:  # noqa: N802 - reads like the class it makes
    return LineClient(path, timeout)


class Shared:
    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.hash = d.files()[0]["hash"]
        self.catalog = os.path.join(d.config["state"], "catalog.sqlite3")

    def counts(self) -> tuple[int, int, int, int]:
        """The daemon's (descriptors other than the catalog's, the catalog's descriptors, threads, threads
        blocked in poll(): a control-client thread waits there for its client, and pool threads never do)."""
        pid = self.d.proc.pid
        other = catalog = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(self.catalog):
                    catalog += 1
                else:
                    other += 1
        tasks = os.listdir(f"/proc/{pid}/task")
        waiters = 0
        for tid in tasks:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/wchan") as f:
                waiters += "poll" in f.read()
        return other, catalog, len(tasks), waiters


@pytest.fixture(scope="module")
def shared() -> Iterator[Shared]:
    """One daemon, one file with its copies; the abuse tests take turns on it."""
    with module_daemon("cm-abuse-", remotes=1) as d:
        (d.inbox / "kept.txt").write_bytes(DATA)
        wait_for(lambda: any(f["copies"] for f in d.files()), message="the file registered and copied")
        yield Shared(d)


def prompt_status(d: Daemon, limit: float = 1.0) -> dict[str, Any]:
    started = time.monotonic()
    s = d.status()
    elapsed = time.monotonic() - started
    assert elapsed < limit, f"status took {elapsed:.2f}s"
    return s


@pytest.fixture
def daemon(shared: Shared) -> Iterator[Daemon]:
    """The shared daemon; afterwards its descriptors and threads are back near where they were."""
    d = shared.d
    prompt_status(d)  # warm: this connection's thread opened (and left) its catalog connection
    fds, catalog, threads, waiters = shared.counts()
    yield d
    assert d.proc.poll() is None, f"the daemon died: {d.log()[-2000:]}"

    def settled() -> bool:
        prompt_status(d)  # a new client thread also closes the catalog connections of ended ones
        now_fds, now_catalog, now_threads, now_waiters = shared.counts()
        return (now_fds <= fds + FD_SLACK and now_catalog <= catalog + CATALOG_SLACK
                and now_threads <= threads + THREAD_SLACK and now_waiters <= waiters + WAITER_SLACK)

    try:
        wait_for(settled, timeout=10, interval=0.2, message="the daemon's descriptors and threads to settle")
    except AssertionError:
        raise AssertionError(f"leak: (fds, catalog fds, threads, socket waiters) {(fds, catalog, threads, waiters)}"
                             f" -> {shared.counts()}: {fd_kinds(d.proc.pid)}") from None
    s = prompt_status(d, 0.5)
    assert s["catalog"]["files"] == 1 and s["state"] == "running", s
    assert "Traceback" not in d.log()


# -- bad requests -----------------------------------------------------------------------------

WRONG_TYPES = [
    b'{"cmd": 5}', b'{"cmd": null}', b'{"cmd": {"cmd": "status"}}', b'{"cmd": "info", "hash": 12}',
    b'{"cmd": "info", "hash": null}', b'{"cmd": "info", "hash": ["abcdef"]}', b'{"cmd": "info", "hash": "ABCDEF12"}',
    b'{"cmd": "info", "hash": "/etc/passwd"}', b'{"cmd": "pin", "hash": "../../catalog.sqlite3"}',
    b'{"cmd": "rm", "hash": "abcdef/../../"}', b'{"cmd": "unpin", "hash": "abcdef\\u0000"}',
    b'{"cmd": "info", "hash": "\\udcff\\udcfe"}', b'{"cmd": "retry", "hashes": [5]}',
    b'{"cmd": "retry", "hashes": "abcdef"}', b'{"cmd": "retry", "hashes": ["../x"]}',
    b'{"cmd": "ls", "limit": true}', b'{"cmd": "ls", "limit": -1}', b'{"cmd": "ls", "limit": 1.5}',
    b'{"cmd": "ls", "limit": 100000000000000000000000000000}', b'{"cmd": "ls", "name": 5}',
    b'{"cmd": "ls", "name": "\\ud800"}', b'{"cmd": "ls", "state": 3}', b'{"cmd": "get", "hash": "abcdef"}',
    b'{"cmd": "backup"}', b'{"cmd": "STATUS"}', b'{"cmd": "__init__"}', b'{"cmd": "status ", "x": 1}',
    b'[' * 100_000 + b']' * 100_000, b'{"cmd": "status"} trailing', b"\xff\xfe\x00\x01",
    b'{"cmd": "status", "cmd": 7}', b"NaN", b"\x00" * 1000,
]


def test_wrong_types_and_garbage_get_error_replies_on_one_connection(daemon: Daemon) -> None:
    c = Conn(daemon.socket_path)
    try:
        for raw in WRONG_TYPES:
            c.send(raw + b"\n")
            reply = c.reply()
            assert reply is not None, f"connection closed on {raw[:60]!r}"
            assert reply["ok"] is False, (raw[:60], reply)
            assert isinstance(reply["error"], str) and reply["error"], reply
            assert "internal error" not in reply["error"], (raw[:60], reply)
        # the same connection still serves a good request
        assert c.ask({"cmd": "status"})["ok"]
    finally:
        c.close()


def test_oversized_requests_leave_nothing_behind(daemon: Daemon) -> None:
    """Requests over 1 MiB (test_ctl.py checks the reply): here, five in a row, and nothing stays."""
    for payload in (b'{"cmd": "status", "pad": "' + b"x" * (2 << 20) + b'"}\n', b"y" * (3 << 20)) * 2 + (b"\n" * 10,):
        c = Conn(daemon.socket_path)
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                c.send(payload)  # the daemon may stop reading once the line is too long
            if payload.strip():
                reply = c.reply()
                assert reply is not None and reply["ok"] is False and "too long" in reply["error"], reply
        finally:
            c.close()


def test_descriptors_sent_with_requests_are_closed(daemon: Daemon, workdir: Path) -> None:
    """A client may push descriptors at any command; the daemon keeps none of them."""
    files = [open(workdir / f"fd{i}", "wb") for i in range(3)]
    try:
        for request in ({"cmd": "status"}, {"cmd": "info", "hash": "zz"}, {"cmd": "nonsense"},
                        {"cmd": "backup"}):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(daemon.socket_path)
                socket.send_fds(s, [json.dumps(request).encode() + b"\n"], [f.fileno() for f in files])
                assert s.recv(65536).endswith(b"\n")
    finally:
        for f in files:
            f.close()


def test_hanging_half_lines_do_not_block_other_clients(daemon: Daemon) -> None:
    hangers = [Conn(daemon.socket_path) for _ in range(10)]
    try:
        for i, h in enumerate(hangers):
            h.send(b'{"cmd": "sta' if i % 2 else b"")  # half a line, or nothing at all
        for _ in range(5):
            prompt_status(daemon, 0.5)
        result = daemon.ctl("--json", "info", daemon.files()[0]["hash"][:8])
        assert result.returncode == 0, result.stderr
    finally:
        for h in hangers:
            h.close()


def test_a_client_that_never_reads_its_replies_does_not_block_others(daemon: Daemon) -> None:
    greedy = Conn(daemon.socket_path)
    try:
        greedy.sock.setblocking(False)
        request = b'{"cmd": "status"}\n' * 256
        sent = 0
        deadline = time.monotonic() + 10
        # keep asking until the daemon stops reading: its replies fill both socket buffers
        while time.monotonic() < deadline:
            try:
                sent += greedy.sock.send(request)
            except BlockingIOError:
                break
        assert sent > 0
        for _ in range(5):
            prompt_status(daemon, 0.5)
    finally:
        greedy.close()


def fifty_at_once(d: Daemon) -> None:
    n = 50
    barrier = threading.Barrier(n)
    replies: list[Any] = [None] * n

    def client(i: int) -> None:
        try:
            c = Conn(d.socket_path, timeout=20)
        except OSError as exc:
            replies[i] = exc
            return
        try:
            barrier.wait(10)
            replies[i] = [c.ask({"cmd": "status"}), c.ask({"cmd": "ls"})]
        except Exception as exc:  # reported below
            replies[i] = exc
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    for r in replies:
        assert isinstance(r, list), r
        status, listing = r
        assert status["ok"] and status["result"]["catalog"]["files"] == 1, status
        assert listing["ok"] and len(listing["result"]) == 1, listing


def test_fifty_clients_at_once_are_all_answered_and_leave_nothing(daemon: Daemon) -> None:
    for _ in range(4):  # 200 clients in all: a per-client leak would stand out in the fixture's check
        fifty_at_once(daemon)


def test_idle_connections_beyond_the_limit_push_out_the_oldest_not_newcomers(daemon: Daemon) -> None:
    hangers: list[Conn] = []
    try:
        # one request each, as it connects (a connection gets a few seconds for its first request),
        # makes sure every hanger was accepted before the extra one comes
        for _ in range(MAX_IDLE):
            hangers.append(Conn(daemon.socket_path))
            assert hangers[-1].ask({"cmd": "status"})["ok"]
        extra = Conn(daemon.socket_path, timeout=5)
        try:
            reply = extra.ask({"cmd": "status"})
        finally:
            extra.close()
        assert reply is not None and reply["ok"], reply
        # the one idle longest made room: the daemon closed it
        hangers[0].sock.settimeout(5)
        try:
            closed = hangers[0].reply() is None
        except ConnectionResetError:
            closed = True
        assert closed
    finally:
        for h in hangers:
            h.close()


def test_many_requests_on_one_connection_are_answered_in_order(daemon: Daemon, shared: Shared) -> None:
    c = Conn(daemon.socket_path)
    try:
        h = shared.hash
        requests: list[dict[str, Any]] = []
        for i in range(100):
            requests.append([{"cmd": "info", "hash": h[: 6 + i % 59]}, {"cmd": "status"},
                             {"cmd": "info", "hash": "0" * 64}, {"cmd": "ls", "limit": i % 3}][i % 4])
        c.send(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
        for i, request in enumerate(requests):
            reply = c.reply()
            kind = i % 4
            if kind == 0:
                assert reply["ok"] and reply["result"]["hash"] == h, (i, reply)
            elif kind == 1:
                assert reply["ok"] and "catalog" in reply["result"], (i, reply)
            elif kind == 2:
                assert reply["ok"] is False, (i, reply)
            else:
                assert reply["ok"] and len(reply["result"]) == min(request["limit"], 1), (i, reply)
    finally:
        c.close()


def test_a_connection_idle_past_the_heartbeat_gets_its_answer_first(daemon: Daemon) -> None:
    """The progress heartbeat is owed from a request's arrival, not from the connection's last reply: a
    request on a connection idle for a while is answered with its result, never an empty progress line
    first (a client that reads one line per request would take that line for the answer)."""
    c = Conn(daemon.socket_path)
    try:
        for _ in range(3):
            assert c.ask({"cmd": "status"})["ok"]
            time.sleep(HEARTBEAT + 0.2)  # the condition under test (an idle connection), not a synchronisation
            for request in ({"cmd": "status"}, {"cmd": "info", "hash": "0" * 64}):
                reply = c.ask(request)
                assert "progress" not in reply and "ok" in reply, (request, reply)
    finally:
        c.close()


def test_the_daemon_survives_clients_that_vanish_mid_request(daemon: Daemon) -> None:
    for _ in range(20):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(daemon.socket_path)
            s.sendall(b'{"cmd": "ls"}\n{"cmd": "status"}\n{"cmd": "verify", "remotes": true}\n')
        # closed without reading: the daemon's replies hit a dead socket (EPIPE)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket_path)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.sendall(b'{"cmd": "status"}\n')
    # an RST instead of a FIN (linger 0) is no different


# -- the socket file and the state lock -------------------------------------------------------

def test_a_stale_socket_from_a_killed_daemon_is_replaced(daemon_factory) -> None:
    d = daemon_factory()
    d.kill()
    assert stat.S_ISSOCK(os.lstat(d.socket_path).st_mode), "SIGKILL leaves the socket file"
    d.start()
    assert d.status()["pid"] == d.proc.pid
    assert d.stop() == 0
    assert not os.path.exists(d.socket_path)


def test_a_regular_file_at_the_socket_path_is_never_deleted(daemon_factory) -> None:
    d = daemon_factory(start=False)
    precious = Path(d.socket_path)
    precious.write_bytes(b"someone's data, not a socket\n")
    d.start(wait=False)
    assert d.proc.wait(30) == 1
    d._close_log()
    assert precious.read_bytes() == b"someone's data, not a socket\n"
    errors = [line for line in d.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1, d.log()
    assert d.socket_path in errors[0] and "not a socket" in errors[0], errors
    assert "Traceback" not in d.log()


def test_a_second_daemon_on_the_same_state_refuses_to_start(daemon_factory, workdir: Path) -> None:
    first = daemon_factory()
    (first.inbox / "first.txt").write_bytes(b"the first daemon's file\n")
    wait_for(lambda: first.status()["catalog"]["files"] == 1, message="the first daemon's file")

    twin_root = workdir / "twin"
    twin_root.mkdir()
    twin = Daemon(twin_root, first.config)  # the very same config: state, socket, inbox
    try:
        twin.start(wait=False)
        assert twin.proc.wait(30) == 1
    finally:
        if twin.proc.poll() is None:
            twin.kill()
        twin._close_log()
    errors = [line for line in twin.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "another cloudmanagerd is already running" in errors[0], twin.log()
    assert "Traceback" not in twin.log()

    # the first runs on, untouched: its socket still answers and it still ingests
    assert first.proc.poll() is None
    assert first.status()["pid"] == first.proc.pid
    (first.inbox / "second.txt").write_bytes(b"after the twin tried\n")
    wait_for(lambda: first.status()["catalog"]["files"] == 2, message="the first daemon ingesting on")

    # a different state folder but the same socket: refused too, and the socket is not stolen
    other = workdir / "other"
    other.mkdir()
    thief = Daemon(other, {**first.config, "state": str(other / "state")})
    try:
        thief.start(wait=False)
        assert thief.proc.wait(30) == 1
    finally:
        if thief.proc.poll() is None:
            thief.kill()
        thief._close_log()
    assert "another cloudmanagerd is listening" in thief.log(), thief.log()
    assert first.status()["pid"] == first.proc.pid
    assert first.stop() == 0


def test_socket_mode_and_group_follow_the_config(daemon_factory) -> None:
    group = next(g for g in ("nogroup", "users") if _group_exists(g))
    d = daemon_factory(control={"mode": "0600", "group": group})
    st = os.stat(d.socket_path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_gid == grp.getgrnam(group).gr_gid
    assert d.stop() == 0


def test_socket_mode_defaults_to_0660(daemon_factory) -> None:
    d = daemon_factory()
    assert stat.S_IMODE(os.stat(d.socket_path).st_mode) == 0o660
    assert d.stop() == 0


def test_ctl_exit_3_when_the_configured_daemon_is_stopped(daemon_factory) -> None:
    d = daemon_factory()
    assert d.stop() == 0
    for args in (("status",), ("--json", "reload")):
        result = d.ctl(*args)
        assert result.returncode == 3, (args, result.stderr)
        err = result.stderr.decode().strip()
        assert len(err.splitlines()) == 1 and d.socket_path in err, err
        assert result.stdout == b""


def _group_exists(name: str) -> bool:
    with contextlib.suppress(KeyError):
        grp.getgrnam(name)
        return True
    return False
