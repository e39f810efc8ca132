"""The status object (SPEC's fields) and the one-line summary for systemd's STATUS=."""

from __future__ import annotations

import os
import time
from typing import Any

from . import __version__
from .names import to_text


def file_object(info: dict[str, Any]) -> dict[str, Any]:
    """A catalog file row as the JSON file object of SPEC (names as escaped text)."""
    return {**info, "name": to_text(info["name"])}


def build_status(*, state: str, node: str, started: float, findings: list[Any], inbox_path: str,
                 inbox_pending: int, rejected: int, cache_path: str, capacity: int, counts: dict[str, Any],
                 active: int, remotes: list[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    problems = [f.line for f in findings]  # health.Finding: a line and its level
    levels = [f.level for f in findings]
    uploads = counts["uploads"]
    oldest = counts["oldest_below_min_added"]
    used = counts["cache_bytes"]
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime": round(now - started, 3),
        "state": "degraded" if state == "running" and problems else state,
        "node": node,
        "problems": problems,
        # the same problems with their levels, and the worst: `status --check` (Nagios) exits with it
        "findings": [{"level": f.level, "line": f.line} for f in findings],
        "level": "critical" if "critical" in levels else "warning" if levels else "ok",
        "inbox": {"path": inbox_path, "pending": inbox_pending, "rejected": rejected},
        "cache": {"path": cache_path, "capacity": capacity, "used": used,
                  "usage_ratio": used / capacity if capacity else 0.0, "files": counts["cache_files"]},
        "catalog": {"files": counts["files"], "bytes": counts["bytes"]},
        "uploads": {"queued": uploads["queued"], "queued_bytes": counts["queued_bytes"], "active": active,
                    "retrying": uploads["retrying"], "failed": uploads["failed"], "copies": counts["copies"]},
        "safety": {"below_min": counts["below_min"], "below_min_bytes": counts["below_min_bytes"],
                   "below_redundancy": counts["below_redundancy"],
                   "oldest_below_min": round(now - oldest, 3) if oldest is not None else None},
        "remotes": remotes,
        "transfer": {"month": time.strftime("%Y-%m", time.gmtime(now)),
                     "incoming": counts["month_incoming"], "outgoing": counts["month_outgoing"],
                     "total_incoming": counts["total_incoming"], "total_outgoing": counts["total_outgoing"]},
    }


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def human_duration(seconds: float) -> str:
    """`3d 4h`, `2h`, `12m 3s`, `42s`: the largest unit and the next one, for people."""
    seconds = max(0, int(seconds))
    for i, (unit, size) in enumerate(UNITS):
        if seconds >= size or unit == "s":
            text = f"{seconds // size}{unit}"
            if i + 1 < len(UNITS):
                sub, subsize = UNITS[i + 1]
                rest = seconds % size // subsize
                if rest:
                    text += f" {rest}{sub}"
            return text
    return f"{seconds}s"


def summary_line(status: dict[str, Any]) -> str:
    """What `systemctl status` shows: a problem first when there is one, then the figures; short,
    and it changes only when something did."""
    cache, uploads, safety = status["cache"], status["uploads"], status["safety"]
    parts = [f"{status['catalog']['files']} files",
             f"cache {human_size(cache['used'])}/{human_size(cache['capacity'])}",
             f"{uploads['queued'] + uploads['retrying'] + uploads['active']} uploads pending"]
    if safety["below_min"]:
        parts.append(f"{safety['below_min']} under-replicated")
    line = ", ".join(parts)
    problems = status["problems"]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        line = f"{problems[0]}{more}; {line}"
    return line
