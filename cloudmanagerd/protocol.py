"""The control socket's wire format, shared by the daemon and cloudmanagerctl.

One JSON object per line each way. Requests: {"cmd": "status"}, {"cmd": "info", "hash": ...}.
Replies: {"ok": true, "result": ...} or {"ok": false, "error": "..."}; a long request may
first send {"progress": {"done": N, "total": M}} lines, and the daemon repeats the last one
about every HEARTBEAT seconds while a request runs ({"progress": {}} before the first), so
that a client can tell a slow request from a stopped daemon. An error reply may carry
"errno" (a name such as "EPIPE") when writing to a descriptor the client passed failed. File descriptors for `get -o` and
the like travel beside the request line as SCM_RIGHTS ancillary data.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any

MAX_LINE = 1 << 20
HEARTBEAT = 0.5
HASH_PREFIX = re.compile(r"^[0-9a-f]{6,64}$")
FULL_HASH = re.compile(r"^[0-9a-f]{64}$")

# exit codes of cloudmanagerctl
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class ProtocolError(Exception):
    pass


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8", "surrogatepass") + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"malformed request: {exc}") from None
    except RecursionError:  # "[[[[...": a client must not get an internal error and a traceback logged
        raise ProtocolError("malformed request: nested too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError("malformed request: expected a JSON object")
    return message


class LineReader:
    """Reads lines and the file descriptors that arrived with them from a stream socket."""

    def __init__(self, sock: socket.socket, limit: int = MAX_LINE) -> None:
        self.sock = sock
        self.limit = limit
        self.buffer = bytearray()
        self.fds: list[int] = []

    def readline(self) -> bytes | None:
        """The next line (without its newline), or None at end of stream; ProtocolError when too long."""
        while True:
            line = self.next_line()
            if line is not None:
                return line
            if not self.fill():
                return None

    def next_line(self) -> bytes | None:
        """The next complete line already received, or None; ProtocolError when too long."""
        end = self.buffer.find(b"\n")
        if end >= 0:
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 1]
            if len(line) > self.limit:  # the newline may arrive in the same read that crosses the limit
                raise ProtocolError(f"request too long (over {self.limit} bytes)")
            return line
        if len(self.buffer) > self.limit:
            raise ProtocolError(f"request too long (over {self.limit} bytes)")
        return None

    def ready(self) -> bool:
        """A line (or a line already too long) is waiting: next_line() will not need more bytes."""
        return b"\n" in self.buffer or len(self.buffer) > self.limit

    def fill(self) -> bool:
        """One receive into the buffer; False at end of stream (BlockingIOError when a
        non-blocking socket has nothing yet, TimeoutError when a timeout passes)."""
        data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 8)
        self.fds.extend(fds)
        if not data:
            return False
        self.buffer += data
        return True

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds
