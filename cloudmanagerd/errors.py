"""One exception tree: every error a user can meet carries a message that says what to do."""

from __future__ import annotations

import errno
from collections.abc import Mapping


class CloudManagerError(Exception):
    """Base of every error cloudmanagerd reports to a person; the message is one line."""

    exit_code = 1


class StartupError(CloudManagerError):
    """The daemon cannot start (bad config, missing folder, a second instance)."""


class NotFound(CloudManagerError):
    """An unknown hash, or a prefix that matches nothing."""


class Ambiguous(CloudManagerError):
    """A hash prefix that matches more than one file."""


class CacheFull(CloudManagerError):
    """There is no room in the cache and nothing can be evicted."""


class OutputError(CloudManagerError):
    """Writing to a descriptor a client passed failed (a full disk, a reader gone, no progress)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


# Where a hint depends on the place: the capacity setting is a remedy for the cache's disk only.
CACHE_HINTS = {
    errno.ENOSPC: "no space left on the cache's device (free some space there, or lower cache.capacity to "
                  "what the disk holds)",
}


def explain_oserror(exc: OSError, what: str, hints: Mapping[int, str] | None = None) -> str:
    """Turn an errno into a sentence an operator can act on; `hints` override the general ones
    for a place (CACHE_HINTS)."""
    general = {
        errno.ENOSPC: "no space left on the device (free some space on it)",
        errno.EDQUOT: "disk quota exceeded (raise the quota or free some space)",
        errno.EACCES: "permission denied (check the owner and mode of the folder)",
        errno.EPERM: "operation not permitted (check the owner and mode of the folder)",
        errno.EROFS: "read-only filesystem (remount it read-write or choose another folder)",
        errno.ENOENT: "does not exist (create it first)",
        errno.ENOTDIR: "a path component is not a folder",
        errno.ELOOP: "a path component is a symbolic link, which is never followed",
        errno.EXDEV: "on another filesystem",
        errno.EIO: "input/output error (check the disk)",
    }
    reason = (hints or {}).get(exc.errno) or general.get(exc.errno) or (exc.strerror or str(exc))
    return f"{what}: {reason}"
