"""Shared fixtures: leak guards, a condition waiter, and a real daemon run as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
# tests/postgres.py: the postgres_server and postgres_url fixtures (a real PostgreSQL server)
pytest_plugins = ["postgres"]
CI = os.environ.get("CI") == "true"


# -- waiting on conditions, never on time ---------------------------------------------------

def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll `predicate` until it returns a true value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the daemon may not be up yet
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}"
                                 + (f" (last error: {last_exc})" if last_exc else ""))
        time.sleep(interval)


# -- leak guards -----------------------------------------------------------------------------

def _children() -> set[int]:
    me = str(os.getpid())
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            kids.add(int(entry))
    return kids


def _socket_fds() -> set[int]:
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                fds.add(int(fd))
    return fds


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a thread, a child process or a socket behind."""
    threads = set(threading.enumerate())
    children = _children()
    sockets = _socket_fds()
    yield
    leaked_threads = wait_for_quiet(lambda: [t for t in threading.enumerate() if t not in threads and t.is_alive()])
    leaked_children = wait_for_quiet(lambda: sorted(_children() - children))
    leaked_sockets = wait_for_quiet(lambda: sorted(_socket_fds() - sockets))
    problems = []
    if leaked_threads:
        problems.append(f"threads left running: {[t.name for t in leaked_threads]}")
    if leaked_children:
        problems.append(f"child processes left running: {leaked_children}")
        for pid in leaked_children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    if leaked_sockets:
        problems.append(f"sockets left open: fds {leaked_sockets}")
    if problems:
        pytest.fail("; ".join(problems))


def wait_for_quiet(probe: Callable[[], list], timeout: float = 5.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "STATE_DIRECTORY",
               "RUNTIME_DIRECTORY", "CLOUDMANAGERD_CONFIG", "LISTEN_FDS")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the caller's systemd and config environment out of the tests."""
    for name in SYSTEMD_ENV:
        monkeypatch.delenv(name, raising=False)


# -- folders an unprivileged user can reach ---------------------------------------------------

@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short, world-traversable folder under /tmp (AF_UNIX paths stop at 108 bytes, and
    tests that run the daemon as another user need to reach it)."""
    path = Path(tempfile.mkdtemp(prefix="cm-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def unprivileged_user() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


# -- the daemon as a subprocess ---------------------------------------------------------------

class Daemon:
    """One cloudmanagerd process on its own folders, driven the way an operator would."""

    def __init__(self, root: Path, config: dict[str, Any], user: str | None = None) -> None:
        self.root = root
        self.config = config
        self.user = user
        self.config_path = root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = root / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def inbox(self) -> Path:
        return Path(self.config["inbox"])

    @property
    def cache(self) -> Path:
        return Path(self.config["cache"]["path"])

    @property
    def socket_path(self) -> str:
        return self.config["control"]["socket"]

    def command(self, *extra: str) -> list[str]:
        cmd = [sys.executable, "-m", "cloudmanagerd", "-c", str(self.config_path), *extra]
        if self.user:
            pw = pwd.getpwnam(self.user)
            cmd = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", *cmd]
        return cmd

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> Daemon:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     cwd=self.root)
        if wait:
            wait_for(lambda: self._alive_or_fail() and self.request({"cmd": "status"})["ok"], timeout=30,
                     message=f"the daemon's control socket at {self.socket_path}")
        return self

    def _alive_or_fail(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.log()[-2000:]}")
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, message: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(self.socket_path)
            data = json.dumps(message).encode() + b"\n"
            if fds:
                socket.send_fds(s, [data], fds)
            else:
                s.sendall(data)
            buf = b""
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("daemon closed the connection")
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    reply = json.loads(line)
                    if "progress" not in reply:
                        return reply

    def status(self) -> dict[str, Any]:
        reply = self.request({"cmd": "status"})
        assert reply["ok"], reply
        return reply["result"]

    def files(self) -> list[dict[str, Any]]:
        reply = self.request({"cmd": "ls"})
        assert reply["ok"], reply
        return reply["result"]

    def ctl(self, *args: str, input: bytes | None = None, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cloudmanagerd.ctl", "-c", str(self.config_path), *args],
                              input=input, stdout=stdout, stderr=subprocess.PIPE, timeout=60)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait: the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            self._close_log()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def default_config(root: Path, remotes: int = 2, **overrides: Any) -> dict[str, Any]:
    for name in ("inbox", "remotes"):
        (root / name).mkdir(exist_ok=True)
    config: dict[str, Any] = {
        "inbox": str(root / "inbox"),
        "cache": {"path": str(root / "cache"), "capacity": "1GiB"},
        "state": str(root / "state"),
        "control": {"socket": str(root / "control.sock")},
        "ingest": {"settle": "0.3s"},
        "remotes": [],
        "log": {"level": "debug"},
    }
    for i in range(remotes):
        path = root / "remotes" / f"r{i}"
        path.mkdir(exist_ok=True)
        config["remotes"].append({"name": f"r{i}", "type": "directory", "path": str(path)})
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@pytest.fixture
def daemon_factory(workdir: Path) -> Iterator[Callable[..., Daemon]]:
    """make(remotes=2, user=None, start=True, **config overrides) -> a running Daemon; all stopped at the end."""
    made: list[Daemon] = []

    def make(remotes: int = 2, user: str | None = None, start: bool = True, root: Path | None = None,
             **overrides: Any) -> Daemon:
        base = root or workdir
        d = Daemon(base, default_config(base, remotes, **overrides), user=user)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()
        d._close_log()


def sha256_of(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def module_daemon(prefix: str, remotes: int = 2, **overrides: Any) -> Iterator[Daemon]:
    """A daemon shared by a module's tests (module-scoped fixtures cannot use `workdir`):
    started with the systemd environment kept out, stopped (exit 0 asserted) and removed after."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    d = Daemon(root, default_config(root, remotes, **overrides))
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in SYSTEMD_ENV:
                mp.delenv(name, raising=False)
            d.start()
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            assert d.stop() == 0
        d._close_log()
        shutil.rmtree(root, ignore_errors=True)


class LineClient:
    """One raw connection to the control socket: bytes out, one JSON reply per line back."""

    def __init__(self, path: str, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def reply(self) -> dict[str, Any] | None:
        """The next reply, or None when the daemon closed the connection."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, request: dict[str, Any]) -> dict[str, Any] | None:
        self.send(json.dumps(request).encode() + b"\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def one_reply_daemon(path: str, reply: bytes) -> Iterator[None]:
    """A fake daemon at socket `path` that answers one request with `reply` (raw bytes, garbage
    allowed): what a real daemon rarely or never says. Its thread is joined on leaving."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(reply)

    t = threading.Thread(target=answer)
    t.start()
    try:
        yield
    finally:
        t.join(30)
        server.close()
