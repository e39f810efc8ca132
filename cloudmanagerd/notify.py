"""sd_notify through systemd-python: a no-op when systemd did not start us."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

try:
    from systemd import daemon as _sd
except ImportError:  # pragma: no cover - the package is a hard dependency; keep tests of other parts running
    _sd = None


class Notifier:
    def __init__(self) -> None:
        self.enabled = _sd is not None and bool(os.environ.get("NOTIFY_SOCKET"))
        self._last_status: str | None = None
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_interval = (int(usec) / 1e6 / 2) if usec and (not pid or int(pid) == os.getpid()) else None

    def send(self, *fields: str) -> None:
        if self.enabled:
            _sd.notify("\n".join(fields))

    def ready(self) -> None:
        self.send("READY=1", f"MAINPID={os.getpid()}")

    def status(self, line: str) -> None:
        if line != self._last_status:
            self._last_status = line
            self.send(f"STATUS={line}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")
