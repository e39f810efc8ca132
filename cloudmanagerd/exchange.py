"""The exchange format of cloud-manager 0.2: JSON entries that let nodes learn each other's files.

An entry: {"version": "0.2", "datetime": "1391212800", "filename": "README.md", "filesize": 23124,
"filehash": "<sha256>", "uploads": [{"host_name": "<remote>", "url": "..."}, {"host_name": "<remote>",
"error": true}]}. Import also reads "0.1" entries (the original's first format, without a file name) and
sizes and times given as strings or numbers, as the original wrote them.

Everything here is pure: parsing checks every entry and reports every bad one by its index, so that an
import is all or nothing; dumping fits whole entries into a byte budget. Nothing touches the catalog.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

VERSION = "0.2"
READ_VERSIONS = ("0.1", "0.2")
KEYS = frozenset(("version", "datetime", "filename", "filesize", "filehash", "uploads"))
UPLOAD_KEYS = frozenset(("host_name", "url", "error"))
_HASH = re.compile(r"[0-9a-f]{64}")
_DIGITS = re.compile(r"[0-9]{1,20}")
_NUMBER = re.compile(r"[0-9]{1,20}(\.[0-9]{1,9})?")
# Bounds that keep a hostile text from costing memory or rows: a name or URL longer than any real one,
# more locations than any catalog would hold for one file. Sizes fit SQLite's signed 64-bit integers.
MAX_NAME = 4096
MAX_URL = 8192
MAX_HOST = 255
MAX_UPLOADS = 64
MAX_SIZE = (1 << 63) - 1
# What `data_load` accepts in one call: the original's texts were blockchain payloads of a few KiB;
# 8 MiB is ~25,000 entries. A larger exchange goes through `cloudmanagerctl import`, which reads a file.
MAX_TEXT = 8 << 20
MAX_PROBLEMS = 100


class ExchangeError(ValueError):
    """The text cannot be imported; `problems` names the first bad entries by their index, `count` is
    how many are bad in all."""

    def __init__(self, problems: list[str], count: int | None = None) -> None:
        count = len(problems) if count is None else count
        super().__init__("; ".join(problems[:5]) + (f"; and {count - 5} more" if count > 5 else ""))
        self.problems = problems
        self.count = count


@dataclass(frozen=True)
class Location:
    """Where a node put a copy (`url`), or that its upload there failed (`error`)."""

    host_name: str
    url: str | None = None

    @property
    def error(self) -> bool:
        return self.url is None

    def to_object(self) -> dict[str, Any]:
        if self.url is None:
            return {"host_name": self.host_name, "error": True}
        return {"host_name": self.host_name, "url": self.url}


@dataclass(frozen=True)
class Entry:
    filehash: str
    filename: bytes
    filesize: int
    datetime: int
    uploads: tuple[Location, ...] = ()

    def to_object(self) -> dict[str, Any]:
        return {"version": VERSION, "datetime": str(self.datetime), "filename": os.fsdecode(self.filename),
                "filesize": self.filesize, "filehash": self.filehash,
                "uploads": [u.to_object() for u in self.uploads]}

    def to_json(self) -> str:
        # ensure_ascii: a name that is not UTF-8 travels as \udcXX escapes, which any JSON reader takes
        return json.dumps(self.to_object())


def dump(entries: Sequence[Entry], limit: int | None) -> tuple[str | None, int]:
    """(JSON text of the leading entries that fit in `limit` bytes, how many). `None` when none fit.

    The text is a JSON array joined with ", " as the original wrote it; its length counts the
    brackets and separators, so the text itself is at most `limit` bytes (the original's estimate
    counted the brackets twice and so stayed below its limit too).
    """
    parts: list[str] = []
    used = 2  # "[]"
    for entry in entries:
        text = entry.to_json()
        cost = len(text) + (2 if parts else 0)
        if limit is not None and used + cost > limit:
            break
        parts.append(text)
        used += cost
    if not parts:
        return None, 0
    return "[" + ", ".join(parts) + "]", len(parts)


def parse(text: Any, max_bytes: int | None = MAX_TEXT) -> list[Entry]:
    """Every entry of an exchange text, or ExchangeError naming each bad one; never anything else."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ExchangeError([f"not UTF-8 text: {exc}"]) from None
    if not isinstance(text, str):
        raise ExchangeError([f"expected JSON text, got {type(text).__name__}"])
    if max_bytes is not None and len(text) > max_bytes:
        raise ExchangeError([f"text of {len(text)} characters is over the limit of {max_bytes} "
                             "(import a larger exchange with cloudmanagerctl import)"])
    try:
        data = json.loads(text)
    except RecursionError:
        raise ExchangeError(["JSON nested too deeply"]) from None
    except ValueError as exc:
        raise ExchangeError([f"not JSON: {exc}"]) from None
    if not isinstance(data, list):
        raise ExchangeError([f"expected a JSON array of entries, got {type(data).__name__}"])
    entries: list[Entry] = []
    problems: list[str] = []
    bad = 0
    for index, obj in enumerate(data):
        try:
            entries.append(parse_entry(obj))
        except ValueError as exc:
            bad += 1
            if len(problems) < MAX_PROBLEMS:  # 4 million bad entries fit in 8 MiB: name the first ones only
                problems.append(f"entry {index}: {exc}")
    if bad:
        raise ExchangeError(problems, bad)
    return entries


def parse_entry(obj: Any) -> Entry:
    """One entry, or ValueError saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected an object, got {type(obj).__name__}")
    unknown = set(obj) - KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(map(repr, unknown)))}")
    version = obj.get("version")
    if version not in READ_VERSIONS:
        raise ValueError(f"version must be one of {', '.join(READ_VERSIONS)}, got {_short(version)}")
    filehash = obj.get("filehash")
    if not isinstance(filehash, str) or not _HASH.fullmatch(filehash):
        raise ValueError(f"filehash must be 64 lowercase hex digits, got {_short(filehash)}")
    size = _whole(obj.get("filesize"), "filesize")
    if size > MAX_SIZE:
        raise ValueError(f"filesize {size} is too large")
    added = _time(obj.get("datetime"))
    name = obj.get("filename", filehash if version == "0.1" else None)
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or "\x00" in name:
        raise ValueError(f"filename must be a non-empty string without NUL, at most {MAX_NAME} characters, "
                         f"got {_short(name)}")
    try:
        raw_name = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError("filename holds a lone surrogate that is not an escaped byte") from None
    uploads = obj.get("uploads", [])
    if not isinstance(uploads, list) or len(uploads) > MAX_UPLOADS:
        raise ValueError(f"uploads must be a list of at most {MAX_UPLOADS} locations")
    locations: dict[str, Location] = {}
    for i, up in enumerate(uploads):
        loc = _location(up, i)
        # one location per host: a url beats an error mark for the same host
        if loc.host_name not in locations or locations[loc.host_name].error:
            locations[loc.host_name] = loc
    return Entry(filehash, raw_name, size, added, tuple(locations.values()))


def _location(up: Any, i: int) -> Location:
    if not isinstance(up, dict) or set(up) - UPLOAD_KEYS:
        raise ValueError(f"uploads[{i}] must be an object with host_name and url, or host_name and error")
    host = up.get("host_name")
    if not isinstance(host, str) or not host or len(host) > MAX_HOST or not host.isprintable():
        raise ValueError(f"uploads[{i}].host_name must be a printable name of 1 to {MAX_HOST} characters")
    if "url" in up:
        url = up["url"]
        if not isinstance(url, str) or not url or len(url) > MAX_URL or not url.isprintable():
            raise ValueError(f"uploads[{i}].url must be a printable string of 1 to {MAX_URL} characters")
        if up.get("error", False) is not False:
            raise ValueError(f"uploads[{i}] has both a url and an error")
        return Location(host, url)
    if up.get("error") is not True:
        raise ValueError(f"uploads[{i}] needs a url or \"error\": true")
    return Location(host, None)


def _whole(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a whole number of bytes, got {_short(value)}")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    raise ValueError(f"{key} must be a whole number of bytes, 0 or more, got {_short(value)}")


def _time(value: Any) -> int:
    """Unix seconds, from a number or a numeric string; fractions are dropped, as the original wrote whole
    seconds."""
    if isinstance(value, bool):
        raise ValueError(f"datetime must be unix seconds, got {_short(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value) and 0 <= value < 1 << 40:
            return int(value)
    elif isinstance(value, str) and _NUMBER.fullmatch(value):
        number = float(value)
        if number < 1 << 40:
            return int(number)
    raise ValueError(f"datetime must be unix seconds (a number or a string of digits), got {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
