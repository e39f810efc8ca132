"""Running a remote's command-line tool (rclone, plowup...) under a Transfer's control.

`run()` starts the command in its own process group, feeds it stdin, collects stdout and
the tail of stderr, and watches two things while it runs: the Transfer (cancelled by the
uploader when a transfer stalls, or by the daemon stopping) and an optional deadline. Either
one kills the whole process group (a shell script's children too) and reaps the leader, so
nothing is left running and no zombie stays behind. A command that exits on its own also has
its process group killed: a straggler holding our pipes open cannot keep us waiting.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .base import TRANSIENT, Cancelled, RemoteError, Transfer

STDERR_TAIL_LINES = 20
STDOUT_LIMIT = 1 << 20  # captured stdout beyond this is dropped (a URL or a path is expected)
POLL_INTERVAL = 0.05
# After the command exits (or is killed), how long to keep reading what is left in the pipes.
DRAIN_TIMEOUT = 2.0


@dataclass
class Result:
    argv: list[str]
    code: int  # the exit code; -N when killed by signal N
    stdout: bytes = b""
    stderr_tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.code == 0

    def last_stderr_line(self) -> str:
        for line in reversed(self.stderr_tail):
            if line.strip():
                return line.strip()
        return ""

    def stdout_lines(self) -> list[str]:
        return [line.strip() for line in self.stdout.decode("utf-8", "replace").splitlines() if line.strip()]


class Timeout(RemoteError):
    """The command ran longer than its deadline and was killed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, TRANSIENT)


class NotInstalled(RemoteError):
    """The command's program was not found or cannot be executed."""


def run(argv: Sequence[str], *, transfer: Transfer | None = None, timeout: float | None = None,
        env: Mapping[str, str] | None = None, stdin: int | None = None, stdout: int | None = None,
        pass_fds: Sequence[int] = (), on_stderr_line: Callable[[str], None] | None = None,
        cwd: str | None = None, what: str | None = None) -> Result:
    """Run `argv` to completion, cancellation or `timeout`; the exit code is the caller's to judge.

    stdin: a readable fd, or None for /dev/null. stdout: a writable fd to hand the command
    (it writes there directly), or None to capture it into Result.stdout. `on_stderr_line`
    sees each complete stderr line as it arrives; an exception it raises (Cancelled from
    Transfer.update) stops the command. Raises Cancelled when the Transfer is cancelled,
    Timeout past the deadline, NotInstalled when the program cannot be started.
    """
    argv = [os.fspath(a) for a in argv]
    what = what or os.path.basename(argv[0])
    if transfer is not None:
        transfer.check()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            close_fds=True,
            start_new_session=True,  # its own process group, killed as one
        )
    except FileNotFoundError:
        raise NotInstalled(f"{what} is not installed (not found: {argv[0]})", TRANSIENT) from None
    except PermissionError:
        raise NotInstalled(f"{what} cannot be executed (permission denied: {argv[0]})", TRANSIENT) from None
    except OSError as exc:
        raise RemoteError(f"cannot start {what}: {exc.strerror or exc}", TRANSIENT) from None
    try:
        return _watch(proc, argv, what, transfer, timeout, on_stderr_line)
    finally:
        _kill_group(proc)
        _reap(proc)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _watch(proc: subprocess.Popen, argv: list[str], what: str, transfer: Transfer | None,
           timeout: float | None, on_stderr_line: Callable[[str], None] | None) -> Result:
    deadline = None if timeout is None else time.monotonic() + timeout
    out = bytearray()
    err_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    err_partial = bytearray()

    def stderr_bytes(data: bytes) -> None:
        err_partial.extend(data)
        while b"\n" in err_partial:
            raw, _, rest = bytes(err_partial).partition(b"\n")
            err_partial[:] = rest
            line = raw.decode("utf-8", "replace").rstrip("\r")
            err_tail.append(line)
            if on_stderr_line is not None:
                on_stderr_line(line)

    selector = selectors.DefaultSelector()
    try:
        if proc.stdout is not None:
            os.set_blocking(proc.stdout.fileno(), False)
            selector.register(proc.stdout.fileno(), selectors.EVENT_READ, "out")
        assert proc.stderr is not None
        os.set_blocking(proc.stderr.fileno(), False)
        selector.register(proc.stderr.fileno(), selectors.EVENT_READ, "err")
        exited_at: float | None = None
        while True:
            if transfer is not None and transfer.cancelled:
                _kill_group(proc)
                raise Cancelled(f"{what} stopped: {transfer.reason or 'cancelled'}")
            now = time.monotonic()
            if deadline is not None and now > deadline:
                _kill_group(proc)
                raise Timeout(f"{what} gave no answer within {timeout:g}s and was killed")
            if exited_at is None and _exited(proc):
                # The leader is done: kill whatever it left in its group, then drain the pipes.
                exited_at = now
                _kill_group(proc)
            if not selector.get_map() or (exited_at is not None and now - exited_at > DRAIN_TIMEOUT):
                if exited_at is not None:
                    break
                # both pipes closed but the process still runs: wait for it (or a cancel)
                if transfer is not None:
                    transfer.wait(POLL_INTERVAL)
                else:
                    time.sleep(POLL_INTERVAL)
                continue
            for key, _ in selector.select(POLL_INTERVAL):
                try:
                    data = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        raise
                    data = b""
                if not data:
                    selector.unregister(key.fd)
                elif key.data == "out":
                    if len(out) < STDOUT_LIMIT:
                        out.extend(data[: STDOUT_LIMIT - len(out)])
                else:
                    stderr_bytes(data)
        if err_partial:
            line = err_partial.decode("utf-8", "replace")
            err_partial.clear()
            err_tail.append(line)
            if on_stderr_line is not None:
                on_stderr_line(line)
    finally:
        selector.close()
    code = _reap(proc)
    return Result(argv=argv, code=code, stdout=bytes(out), stderr_tail=list(err_tail))


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the leader has exited, without reaping it (its pid keeps the group id reserved)."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None and info.si_pid != 0


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.returncode is not None:
        return  # reaped: its group id may belong to someone else by now
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _reap(proc: subprocess.Popen) -> int:
    if proc.returncode is None:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # in uninterruptible sleep (a dead NFS mount): try again
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return proc.returncode


def environment(prepend_path: str | None = None, drop: Sequence[str] = (),
                extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment for a tool, with `prepend_path` first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if prepend_path:
        env["PATH"] = prepend_path + os.pathsep + env.get("PATH", os.defpath)
    if extra:
        env.update(extra)
    return env


def one_line(text: str, limit: int = 300) -> str:
    """`text` squeezed onto one line for a log line or a status field."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["NotInstalled", "Result", "Timeout", "environment", "one_line", "run"]
