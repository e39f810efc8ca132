"""The control socket server: JSON lines in, JSON lines out, no client can hurt the daemon.

One thread (the selector) accepts connections and reads requests from all of them at once,
never blocking on any: an idle connection costs a descriptor and a buffer, not a thread. A
complete request line is handed to a request thread, which answers it (and any request queued
behind it) and gives the connection back. Up to KEEP_WORKERS request threads then wait for the
next request instead of ending: a new thread and its new catalog connection (the schema read
again) cost more than a `status` itself. The limits a client meets:

- FIRST_REQUEST seconds to send its first request, IDLE seconds between later ones;
- at most MAX_IDLE idle connections: beyond that the one idle longest is closed, so that
  idle connections can never lock anyone out;
- at most MAX_BUSY requests at once, and STATUS_RESERVE more for `status`, so that monitoring
  answers while every slot is taken;
- every write to a client, on the socket or to a descriptor it passed, fails after
  fsutil.STALL seconds without progress (a `get` into a pipe nobody reads ends).

While a request runs, the selector repeats its last progress line every HEARTBEAT seconds
(protocol.py), so that cloudmanagerctl can tell a long request from a stopped daemon.
Commands are plain callables handed in by the composition root; this module knows only the
wire format.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import grp
import logging
import os
import select
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import fsutil
from .catalog import DB_ERRORS
from .errors import CloudManagerError, StartupError
from .protocol import HEARTBEAT, LineReader, ProtocolError, decode, encode

log = logging.getLogger(__name__)

FIRST_REQUEST = 5.0
IDLE = 30.0
MAX_IDLE = 256
MAX_BUSY = 64
STATUS_RESERVE = 8
STREAM_CHUNK = 256  # items of a streamed reply per write
TICK = 0.25  # the selector's longest sleep: deadlines and heartbeats are checked this often
# request threads kept waiting for the next request, each with its catalog connection (two descriptors);
# a kept one ends after WORKER_IDLE seconds without a request, and more than these end at once
KEEP_WORKERS = 2
WORKER_IDLE = IDLE

Progress = Callable[[int, int], None]
Command = Callable[[dict[str, Any], list[int], Progress], Any]


def prepare_socket_path(path: str) -> None:
    """Remove a stale socket left by a crash; refuse anything else that sits at the path."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"control.socket {path} exists and is not a socket; move it away or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise StartupError(f"control.socket {path}: another cloudmanagerd is listening there")


class Streamed:
    """A command's result that is a long list (`ls` of a million files), produced item by item:
    the reply is written as the items come (Client.send_stream), never held whole."""

    def __init__(self, items: Iterator[Any]) -> None:
        self.items = items


class Client:
    """One connection: its reader, and what the selector needs to time it out or keep it informed."""

    def __init__(self, conn: socket.socket, now: float) -> None:
        self.conn = conn
        self.reader = LineReader(conn)
        self.deadline = now + FIRST_REQUEST
        self.write_lock = threading.Lock()  # one line at a time: replies, progress and heartbeats never interleave
        self.last_sent = now
        self.progress: dict[str, int] = {}

    def send(self, message: dict[str, Any]) -> None:
        with self.write_lock:
            fsutil.write_all(self.conn.fileno(), encode(message))
            self.last_sent = time.monotonic()

    def send_stream(self, stream: Streamed) -> None:
        """A reply whose list is written as its items come (`Streamed`): one line on the wire, as
        every reply, but never one string in memory. An error after the first byte cannot be
        answered any more: the connection is closed, and the client sees a cut reply."""
        with self.write_lock:
            fd = self.conn.fileno()
            fsutil.write_all(fd, b'{"ok":true,"result":[')
            chunk: list[bytes] = []
            sent = False
            try:
                for item in stream.items:
                    chunk.append(encode(item)[:-1])
                    if len(chunk) >= STREAM_CHUNK:
                        fsutil.write_all(fd, (b"," if sent else b"") + b",".join(chunk))
                        chunk, sent = [], True
            except OSError:
                raise  # the client went away or stopped reading: nothing to say, nothing to log
            except DB_ERRORS as exc:  # a damaged or full catalog: the health check reports it (status)
                log.error("control: a streamed reply cut half-way: catalog: %s", exc)
                with contextlib.suppress(OSError):
                    self.conn.shutdown(socket.SHUT_RDWR)
                raise OSError(errno.EIO, "streamed reply cut") from None
            except Exception:
                log.exception("control: a streamed reply failed half-way; closing the connection")
                with contextlib.suppress(OSError):
                    self.conn.shutdown(socket.SHUT_RDWR)
                raise OSError(errno.EPIPE, "streamed reply cut") from None
            if chunk:
                fsutil.write_all(fd, (b"," if sent else b"") + b",".join(chunk))
            fsutil.write_all(fd, b"]}\n")
            self.last_sent = time.monotonic()

    def heartbeat(self, now: float) -> None:
        """Repeat the last progress line, from the selector: never wait for the lock or the client."""
        if now - self.last_sent < HEARTBEAT or not self.write_lock.acquire(blocking=False):
            return
        try:
            if self.conn.fileno() < 0:  # closed by its thread since the selector listed it
                return
            line = encode({"progress": self.progress})
            poller = select.poll()
            poller.register(self.conn.fileno(), select.POLLOUT)
            if poller.poll(0):  # room for a short line: the write below is whole
                if os.write(self.conn.fileno(), line) != len(line):
                    self.conn.shutdown(socket.SHUT_RDWR)  # half a line would garble the stream
            self.last_sent = now
        except OSError:
            pass
        finally:
            self.write_lock.release()

    def close(self) -> None:
        for fd in self.reader.take_fds():
            with contextlib.suppress(OSError):
                os.close(fd)
        with self.write_lock:  # not under a heartbeat that the selector is sending
            self.conn.close()


class ControlServer:
    def __init__(self, path: str, mode: int, group: str | None, commands: dict[str, Command],
                 on_client_done: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.commands = commands
        # called in a request thread as it ends (the daemon closes that thread's catalog connection)
        self.on_client_done = on_client_done
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        prepare_socket_path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(path)
        except OSError as exc:
            self.sock.close()
            raise StartupError(f"control.socket {path}: cannot listen there ({exc.strerror})") from None
        self._stat = os.stat(path)
        os.chmod(path, mode)
        if group:
            try:
                os.chown(path, -1, grp.getgrnam(group).gr_gid)
            except (KeyError, OSError) as exc:
                log.warning("control.group %s: cannot give the socket to this group (%s)", group, exc)
        self.sock.listen(1024)  # a burst of clients waits in the backlog, not in a refusal (EAGAIN)
        self.sock.setblocking(False)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # a kept request thread waits here for a client
        self._busy: set[Client] = set()  # requests being answered, or queued for a kept thread
        self._queue: collections.deque[Client] = collections.deque()
        self._waiting = 0  # kept request threads waiting on _work: at least len(_queue)
        self._workers: set[threading.Thread] = set()
        self._returned: collections.deque[Client] = collections.deque()
        self._idle: dict[Client, None] = {}  # insertion order: the one idle longest comes first
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._select_loop, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        with self._lock:
            for client in self._busy:
                with contextlib.suppress(OSError):
                    client.conn.shutdown(socket.SHUT_RDWR)
            self._work.notify_all()  # kept request threads end

    def join(self, timeout: float | None = None) -> None:
        if self._thread.ident is not None:  # never started when an earlier start-up step failed
            self._thread.join(timeout)
        with self._lock:  # the selector has stopped: no request thread starts any more
            threads = list(self._workers)
        for t in threads:
            t.join(timeout)
        for client in list(self._idle) + list(self._returned):
            client.close()
        self._idle.clear()
        self._returned.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            # only our own socket: a successor may already have bound a new one
            if (st.st_dev, st.st_ino) == (self._stat.st_dev, self._stat.st_ino):
                os.unlink(self.path)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full wake-up pipe already wakes the selector
            self._wake_w.send(b"\0")

    # -- the selector thread ---------------------------------------------------------------------

    def _select_loop(self) -> None:
        self._selector.register(self.sock, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        state = {"accepting": True, "paused_until": 0.0}
        while not self._stop.is_set():
            try:
                self._select_once(state)
            except Exception:  # a bug here must not leave the daemon deaf: log it and go on
                log.exception("control socket: selector step failed")
                self._stop.wait(TICK)
        for client in list(self._idle):
            self._drop_idle(client)

    def _select_once(self, state: dict[str, Any]) -> None:
        sel = self._selector
        if not state["accepting"] and time.monotonic() >= state["paused_until"]:
            sel.register(self.sock, selectors.EVENT_READ, "accept")
            state["accepting"] = True
        for key, _events in sel.select(TICK):
            if key.data == "accept":
                if not self._accept(time.monotonic()):
                    sel.unregister(self.sock)  # out of descriptors: a readable listener would spin
                    state["accepting"], state["paused_until"] = False, time.monotonic() + 0.5
            elif key.data == "wake":
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            else:
                self._read(key.data)
        now = time.monotonic()
        while self._returned:
            client = self._returned.popleft()
            client.deadline = now + IDLE
            self._add_idle(client)
        for client in [c for c in self._idle if c.deadline <= now]:
            self._drop_idle(client)
        with self._lock:
            busy = list(self._busy)
        for client in busy:
            client.heartbeat(now)

    def _accept(self, now: float) -> bool:
        """Take every waiting connection; False when out of descriptors."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("control socket: out of file descriptors; refusing clients for a moment")
                    return False
                if exc.errno in (errno.ECONNABORTED, errno.EINTR):
                    continue
                raise
            conn.setblocking(False)
            self._add_idle(Client(conn, now))

    def _add_idle(self, client: Client) -> None:
        if len(self._idle) >= MAX_IDLE:
            oldest = next(iter(self._idle))
            log.warning("control socket: %d idle connections; closing the one idle longest", len(self._idle))
            self._drop_idle(oldest)
        self._idle[client] = None
        self._selector.register(client.conn, selectors.EVENT_READ, client)
        if client.reader.ready():  # a request queued behind the last one, already received
            self._dispatch(client)

    def _drop_idle(self, client: Client) -> None:
        self._idle.pop(client, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.conn)
        client.close()

    def _read(self, client: Client) -> None:
        try:
            more = client.reader.fill()
        except BlockingIOError:
            return
        except OSError:
            more = False
        if not more:
            self._drop_idle(client)
        elif client.reader.ready():
            self._dispatch(client)

    def _dispatch(self, client: Client) -> None:
        """A request is in: answer it in a thread of its own, if a slot is free."""
        self._idle.pop(client, None)
        self._selector.unregister(client.conn)
        thread = None
        # a heartbeat is owed HEARTBEAT seconds after this request, not after the last reply: an empty
        # progress line must never come before the answer of a client that was idle a while
        client.progress = {}
        client.last_sent = time.monotonic()
        with self._lock:
            # the request is decoded here only when the slots are full (a second decode per request)
            refused = len(self._busy) >= MAX_BUSY and (len(self._busy) >= MAX_BUSY + STATUS_RESERVE
                                                        or not _is_status(client.reader))
            if not refused:
                self._busy.add(client)
                if self._waiting > len(self._queue):  # a kept thread is free: it takes the client
                    self._queue.append(client)
                    self._work.notify()
                else:
                    thread = threading.Thread(target=self._request_thread, args=(client,), name="control-client",
                                              daemon=True)
                    self._workers.add(thread)
        if refused:
            with contextlib.suppress(OSError):  # best effort: this client is not worth a wait
                client.conn.send(encode({"ok": False, "error": "too many requests at once; try again"}))
            client.close()
            return
        if thread is not None:
            thread.start()

    # -- a request thread ---------------------------------------------------------------------------

    def _request_thread(self, first: Client) -> None:
        """Answer `first`, then the clients handed over while this thread is kept (_next_client)."""
        client: Client | None = first
        try:
            while client is not None:
                self._serve(client)
                client = self._next_client()
        finally:
            try:
                self.on_client_done()
            except Exception:
                log.exception("control: cleaning up after a request thread failed")
            with self._lock:
                self._workers.discard(threading.current_thread())

    def _next_client(self) -> Client | None:
        """The next client for this thread; None: end it (stopping, enough threads kept already, or
        none came for WORKER_IDLE seconds). A client queued for a kept thread is always taken."""
        with self._lock:
            deadline = time.monotonic() + WORKER_IDLE
            while not self._queue:
                remaining = deadline - time.monotonic()
                if self._stop.is_set() or self._waiting >= KEEP_WORKERS or remaining <= 0:
                    return None
                self._waiting += 1
                try:
                    self._work.wait(remaining)
                finally:
                    self._waiting -= 1
            return self._queue.popleft()

    def _serve(self, client: Client) -> None:
        keep = False
        try:
            while not self._stop.is_set():
                try:
                    line = client.reader.next_line()
                except ProtocolError as exc:
                    client.send({"ok": False, "error": str(exc)})
                    break
                if line is None:
                    keep = True
                    break
                if not line.strip():
                    continue
                client.progress = {}
                client.last_sent = time.monotonic()
                reply = self._handle(client, line, client.reader.take_fds())
                if isinstance(reply.get("result"), Streamed):
                    client.send_stream(reply["result"])
                else:
                    client.send(reply)
        except OSError:
            pass  # the client went away or stopped reading: nothing to answer
        finally:
            with self._lock:
                self._busy.discard(client)
                keep = keep and not self._stop.is_set()
                if keep:
                    self._returned.append(client)
            if keep:
                self._wake()
            else:
                client.close()

    def _handle(self, client: Client, line: bytes, fds: list[int]) -> dict[str, Any]:
        try:
            request = decode(line)
            cmd = request.get("cmd")
            command = self.commands.get(cmd) if isinstance(cmd, str) else None
            if command is None:
                known = ", ".join(sorted(self.commands))
                return {"ok": False, "error": f"unknown command {cmd!r}; known: {known}"}

            def progress(done: int, total: int) -> None:
                client.progress = {"done": done, "total": total}
                client.send({"progress": client.progress})

            return {"ok": True, "result": command(request, fds, progress)}
        except (CloudManagerError, ProtocolError) as exc:
            return _error(str(exc), getattr(exc, "errno", None))
        except OSError as exc:
            return _error(f"{exc.strerror or exc}", exc.errno)
        except DB_ERRORS as exc:  # a damaged or full catalog: the health check reports it (status)
            return {"ok": False, "error": f"catalog: {exc}"}
        except Exception as exc:
            log.exception("control request failed")
            return {"ok": False, "error": f"internal error: {exc} (see the daemon's log)"}
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _error(message: str, number: int | None) -> dict[str, Any]:
    reply: dict[str, Any] = {"ok": False, "error": message}
    if number in errno.errorcode:
        reply["errno"] = errno.errorcode[number]
    return reply


def _is_status(reader: LineReader) -> bool:
    """Whether the request waiting first is `status` (it may use the reserved slots)."""
    end = reader.buffer.find(b"\n")
    if end < 0 or end > 4096:
        return False
    try:
        return decode(bytes(reader.buffer[:end])).get("cmd") == "status"
    except ProtocolError:
        return False


def node_commands(node: Any) -> dict[str, Callable[[dict[str, Any], list[int], Any], Any]]:
    """The requests every node answers, mapped from JSON onto the typed operations of ops.py. The
    daemon adds its own (status, reload). A descriptor-taking command gets exactly one."""
    from . import ops

    def one_fd(cmd: str, fds: list[int]) -> int:
        if len(fds) != 1:
            raise CloudManagerError(f"{cmd}: pass exactly one open file descriptor")
        return fds[0]

    return {
        "ls": lambda req, fds, progress: Streamed(ops.ls_pages(node, req.get("state"), req.get("name"),
                                                               req.get("limit"), req.get("after"))),
        "info": lambda req, fds, progress: ops.info(node, req.get("hash")),
        "get": lambda req, fds, progress: ops.get(node, req.get("hash"), one_fd("get", fds), progress),
        "pin": lambda req, fds, progress: ops.pin(node, req.get("hash"), True, progress),
        "unpin": lambda req, fds, progress: ops.pin(node, req.get("hash"), False),
        "rm": lambda req, fds, progress: ops.rm(node, req.get("hash")),
        "retry": lambda req, fds, progress: ops.retry(node, req.get("hashes"), bool(req.get("all")),
                                                          dry_run=req.get("dry_run") is True),
        "verify": lambda req, fds, progress: ops.verify(node, bool(req.get("remotes")), progress,
                                                              bool(req.get("deep"))),
        "backup": lambda req, fds, progress: ops.backup(node, one_fd("backup", fds)),
        "export": lambda req, fds, progress: ops.export_to(node, one_fd("export", fds), req.get("limit")),
        "import": lambda req, fds, progress: ops.import_from(node, one_fd("import", fds), req.get("source")),
    }
