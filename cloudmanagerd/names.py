"""Names are byte strings on Linux: kept exactly, shown escaped."""

from __future__ import annotations

import os


def to_text(name: bytes) -> str:
    """For JSON: undecodable bytes become lone surrogates, which json escapes as \\udcXX."""
    return os.fsdecode(name)


def show(name: bytes | str) -> str:
    """For a terminal or a log line: printable text as is, anything else as an escape."""
    if isinstance(name, str):
        name = os.fsencode(name)
    text = name.decode("utf-8", "backslashreplace")
    out = []
    for ch in text:
        if ch == "\\" or ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)
