"""The control socket server: JSON lines in, JSON lines out, no client can hurt the daemon.

Each connection gets a thread, up to MAX_CLIENTS; a client idle mid-line or not reading
its reply for CLIENT_TIMEOUT seconds is dropped. Commands are plain callables handed in
by the composition root; this module knows only the wire format.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import sqlite3
import stat
import threading
from collections.abc import Callable
from typing import Any

from .errors import CloudManagerError, StartupError
from .protocol import LineReader, ProtocolError, decode, encode

log = logging.getLogger(__name__)

MAX_CLIENTS = 64
CLIENT_TIMEOUT = 30.0

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


class ControlServer:
    def __init__(self, path: str, mode: int, group: str | None, commands: dict[str, Command],
                 on_client_done: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.commands = commands
        # called in a client's thread as it ends (the daemon closes that thread's catalog connection)
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
        self.sock.listen(128)
        self.sock.settimeout(0.5)
        self._stop = threading.Event()
        self._clients: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self.last_progress = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float | None = None) -> None:
        if self._thread.ident is not None:  # never started when an earlier start-up step failed
            self._thread.join(timeout)
        with self._lock:
            clients = list(self._clients)
        for t in clients:
            t.join(timeout)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            # only our own socket: a successor may already have bound a new one
            if (st.st_dev, st.st_ino) == (self._stat.st_dev, self._stat.st_ino):
                os.unlink(self.path)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("control socket: out of file descriptors; refusing clients for a moment")
                    self._stop.wait(0.5)
                    continue
                if self._stop.is_set():
                    break
                raise
            with self._lock:
                if len(self._clients) >= MAX_CLIENTS:
                    with contextlib.suppress(OSError):
                        conn.sendall(encode({"ok": False, "error": "too many clients; try again"}))
                    conn.close()
                    continue
                t = threading.Thread(target=self._serve, args=(conn,), name="control-client", daemon=True)
                self._clients.add(t)
                self._conns.add(conn)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        reader = LineReader(conn)
        try:
            conn.settimeout(CLIENT_TIMEOUT)
            while not self._stop.is_set():
                try:
                    line = reader.readline()
                except ProtocolError as exc:
                    conn.sendall(encode({"ok": False, "error": str(exc)}))
                    break
                if line is None:
                    break
                if not line.strip():
                    continue
                reply = self._handle(conn, line, reader.take_fds())
                conn.sendall(encode(reply))
        except (OSError, TimeoutError):
            pass
        finally:
            for fd in reader.take_fds():
                with contextlib.suppress(OSError):
                    os.close(fd)
            try:
                self.on_client_done()
            except Exception:
                log.exception("control: cleaning up after a client failed")
            with self._lock:
                self._conns.discard(conn)
                self._clients.discard(threading.current_thread())
            conn.close()

    def _handle(self, conn: socket.socket, line: bytes, fds: list[int]) -> dict[str, Any]:
        try:
            request = decode(line)
            cmd = request.get("cmd")
            command = self.commands.get(cmd) if isinstance(cmd, str) else None
            if command is None:
                known = ", ".join(sorted(self.commands))
                return {"ok": False, "error": f"unknown command {cmd!r}; known: {known}"}

            def progress(done: int, total: int) -> None:
                conn.sendall(encode({"progress": {"done": done, "total": total}}))

            return {"ok": True, "result": command(request, fds, progress)}
        except (CloudManagerError, ProtocolError) as exc:
            return {"ok": False, "error": str(exc)}
        except OSError as exc:
            return {"ok": False, "error": f"{exc.strerror or exc}"}
        except sqlite3.Error as exc:  # a damaged or full catalog: the health check reports it (status)
            return {"ok": False, "error": f"catalog: {exc}"}
        except Exception as exc:
            log.exception("control request failed")
            return {"ok": False, "error": f"internal error: {exc} (see the daemon's log)"}
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
