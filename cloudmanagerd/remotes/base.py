"""The Remote protocol every backend implements, and the errors they raise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Progress = Callable[[int], None]

# How the upload loop treats an error (SPEC: transient errors retry; remote errors mark the
# remote unhealthy and say what to fix; file errors give up this pair and use a spare remote).
TRANSIENT = "transient"
REMOTE = "remote"
FILE = "file"
MISSING = "missing"


class RemoteError(Exception):
    """A failed remote operation; `kind` decides what the upload loop does next."""

    def __init__(self, message: str, kind: str = TRANSIENT) -> None:
        super().__init__(message)
        self.kind = kind


class Remote(Protocol):
    name: str
    kind: str

    def put(self, h: str, src_fd: int, size: int, progress: Progress | None = None) -> str:
        """Store the object read from `src_fd` under hash `h`; returns its URL once it is complete."""

    def get(self, h: str, url: str, dst_fd: int, progress: Progress | None = None) -> None:
        """Write the object's bytes to `dst_fd`; RemoteError(kind=MISSING) when it is gone."""

    def exists(self, h: str, url: str) -> int | None:
        """The object's size, or None when it does not exist."""

    def delete(self, h: str, url: str) -> None:
        """Remove the object; deleting a missing object is not an error."""

    def probe(self) -> None:
        """Raise RemoteError when the remote cannot take uploads now."""

    def close(self) -> None:
        ...
