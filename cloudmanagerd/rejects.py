"""The rejected folder: where inbox entries that can never be ingested are moved, with a reason."""

from __future__ import annotations

import logging
import os

from . import fsutil
from .errors import explain_oserror
from .names import show

log = logging.getLogger(__name__)


class Rejector:
    """Moves entries that can never be ingested to the rejected folder, keeping their relative path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.root_fd = fsutil.open_root(path, create=True, mode=0o750)
        self.count = sum(1 for _ in os.scandir(self.root_fd))

    def close(self) -> None:
        os.close(self.root_fd)

    def reject(self, dir_fd: int, name: bytes, rel: bytes, reason: str) -> bool:
        parts = fsutil.split_rel(rel)[:-1]
        try:
            with fsutil.subdir(self.root_fd, parts, create=True) as target_fd:
                target = name
                for n in range(1, 1000):
                    try:
                        os.stat(target, dir_fd=target_fd, follow_symlinks=False)
                    except FileNotFoundError:
                        break
                    target = name + b".%d" % n
                os.rename(name, target, src_dir_fd=dir_fd, dst_dir_fd=target_fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.error("cannot move %s to the rejected folder %s: %s (left in the inbox)",
                      show(rel), self.path, explain_oserror(exc, "rename").split(": ", 1)[1])
            return False
        self.count += 1
        log.warning("rejected %s: %s (moved to %s)", show(rel), reason, self.path)
        return True
