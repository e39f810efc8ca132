"""The configuration: defaults, then parsing, then validation, into frozen dataclasses.

Every problem is collected and reported at once, one line each, named by its dotted key
(``cache.capacity: expected a size like 20GiB, got 'lots'``): ``--check-config`` and a
failed reload then show the operator everything there is to fix in one go, and bad input
never surfaces as a traceback, only as :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

import yaml

from cloudmanagerd.errors import CloudManagerError
from cloudmanagerd.urls import scrub

DEFAULT_CONFIG_PATH = "/etc/cloudmanagerd/config.yaml"
DEFAULT_STATE_DIR = "/var/lib/cloudmanagerd"
DEFAULT_CONTROL_SOCKET = "/run/cloudmanagerd/control.sock"

REMOTE_TYPES = ("directory", "s3", "plowshare", "rclone")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
OBSERVERS = ("inotify", "polling")
S3_REQUEST_CHECKSUMS = ("when_supported", "when_required")
CATALOG_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")

# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107

T = TypeVar("T")


class ConfigError(CloudManagerError):
    """A configuration that cannot be used; ``errors`` holds one line per problem.

    Unlike its siblings the message may span several lines: all problems at once.
    """

    errors: list[str]

    def __init__(self, errors: str | Iterable[str]) -> None:
        # A single string is split into lines so that the exception survives pickling
        # (which re-creates it from the joined text) with its list intact.
        lines = errors.splitlines() if isinstance(errors, str) else list(errors)
        self.errors = lines
        super().__init__("\n".join(lines))

    def __str__(self) -> str:
        return "\n".join(self.errors)


# --- the configuration objects ---------------------------------------------------------


@dataclass(frozen=True)
class CacheConfig:
    path: str
    capacity: int
    scrub: float  # bytes per second re-hashed in the background; 0 = off


@dataclass(frozen=True)
class IngestConfig:
    settle: float
    observer: str
    rescan: float
    ignore: tuple[str, ...]
    rejected: str


@dataclass(frozen=True)
class RetryConfig:
    initial: float
    max: float
    max_attempts: int  # 0 = never give up


@dataclass(frozen=True)
class UploadConfig:
    redundancy: int
    min_redundancy: int
    concurrency: int
    retry: RetryConfig
    stall: float
    min_rate: float  # bytes per second; 0 = no minimum
    # how long a file may stay below min_redundancy before `status --check` says CRITICAL: a new
    # file is below it until its uploads finish, which is normal, not an alarm
    grace: float = 3600.0


@dataclass(frozen=True)
class ControlConfig:
    socket: str
    mode: int
    group: str | None


@dataclass(frozen=True)
class ClusterConfig:
    lease: float


@dataclass(frozen=True)
class LogConfig:
    level: str
    format: str = "text"  # "json": one JSON object a line on stderr (outside the journal)


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, int] | None = None  # (host, port) of the Prometheus endpoint; None = off
    textfile: str | None = None            # node_exporter textfile (*.prom), rewritten atomically; None = off


# The background scrub's remote reads: bytes per second of remote copies read back and hashed.
# 1GiB/day proves 1 TiB of copies in about 3 years; README says how to size it.
DEFAULT_REMOTE_READ = 2**30 / 86400.0


@dataclass(frozen=True)
class ScrubConfig:
    remote_read: float = DEFAULT_REMOTE_READ  # bytes per second; 0 = quick checks only (exists, size)


@dataclass(frozen=True)
class CatalogBackupConfig:
    interval: float  # seconds between snapshots of a SQLite catalog to the remotes; 0 = off


_SECRET_OPTIONS = frozenset({"secret_access_key"})


@dataclass(frozen=True, repr=False)
class RemoteConfig:
    name: str
    type: str
    options: tuple[tuple[str, object], ...]  # sorted by key; paths absolute

    def get(self, key: str, default: object = None) -> object:
        for option, value in self.options:
            if option == key:
                return value
        return default

    @property
    def place(self) -> str:
        """Where this remote's copies live, in words: a remote's name must mean this same place on
        every node sharing a catalog (the catalog records it; a node that differs refuses to start)."""
        if self.type == "directory":
            return f"directory {self.get('path')}"
        if self.type == "s3":
            endpoint = str(self.get("endpoint") or "AWS").rstrip("/")
            return f"s3://{self.get('bucket')}/{self.get('prefix') or ''} at {endpoint}"
        if self.type == "rclone":
            return f"rclone {self.get('remote')}"
        if self.type == "plowshare":
            return f"plowshare {self.get('host')}"
        return f"{self.type} " + " ".join(f"{k}={self.get(k)}" for k in _LOCATION_OPTIONS if self.get(k))

    def __repr__(self) -> str:
        # Configs end up in logs and tracebacks; a secret must not.
        shown = tuple(
            (key, "***" if key in _SECRET_OPTIONS else value) for key, value in self.options
        )
        return f"RemoteConfig(name={self.name!r}, type={self.type!r}, options={shown!r})"


@dataclass(frozen=True)
class Config:
    inbox: str
    cache: CacheConfig
    state: str
    catalog: str
    node: str
    control: ControlConfig
    ingest: IngestConfig
    upload: UploadConfig
    cluster: ClusterConfig
    log: LogConfig
    remotes: tuple[RemoteConfig, ...]
    source: str | None = None  # the file it was loaded from
    scrub: ScrubConfig = ScrubConfig()
    metrics: MetricsConfig = MetricsConfig()
    catalog_backup: CatalogBackupConfig = CatalogBackupConfig(interval=900.0)

    def remote(self, name: str) -> RemoteConfig | None:
        for remote in self.remotes:
            if remote.name == name:
                return remote
        return None


def catalog_sqlite_path(catalog: str) -> str | None:
    """The file of a ``sqlite:///`` catalog URL, or None for PostgreSQL."""
    if catalog.lower().startswith("sqlite:///"):
        return catalog[len("sqlite:///") :]
    return None


# --- sizes, durations, rates -----------------------------------------------------------

_SIZE_EXAMPLE = "a size like 20GiB"
_DURATION_EXAMPLE = "a duration like 30s"
_RATE_EXAMPLE = "a rate like 64KiB/s"

_SIZE_RE = re.compile(r"([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*([kmgtpe]i?)?b?", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15, "e": 10**18,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50, "ei": 2**60,
}

_NUMBER_RE = re.compile(r"[+-]?(\d+(?:\.\d*)?|\.\d+)")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*")
_SECOND, _MINUTE, _HOUR, _DAY = 1.0, 60.0, 3600.0, 86400.0
_DURATION_UNITS = {
    "ms": 0.001,
    "s": _SECOND, "sec": _SECOND, "secs": _SECOND, "second": _SECOND, "seconds": _SECOND,
    "m": _MINUTE, "min": _MINUTE, "mins": _MINUTE, "minute": _MINUTE, "minutes": _MINUTE,
    "h": _HOUR, "hr": _HOUR, "hrs": _HOUR, "hour": _HOUR, "hours": _HOUR,
    "d": _DAY, "day": _DAY, "days": _DAY,
    "w": 7 * _DAY, "week": 7 * _DAY, "weeks": 7 * _DAY,
}
_RATE_PERIODS = {
    "s": _SECOND, "sec": _SECOND, "m": _MINUTE, "min": _MINUTE,
    "h": _HOUR, "hour": _HOUR, "d": _DAY, "day": _DAY,
}


def _describe(value: object) -> str:
    """A value as the user wrote it, for 'got ...' in a message."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        # YAML 1.1 reads yes/no/on/off as booleans: show what the parser saw.
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    if isinstance(value, (int, float)):
        return repr(value)
    return f"{value} (a {type(value).__name__})"


def _byte_amount(value: object, expected: str) -> Decimal:
    """The number of bytes a size stands for, exactly (it may have a fraction)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"expected {expected}, got {_describe(value)}")
        amount = Decimal(value)
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value.strip())):
        sign, number, unit = match.groups()
        amount = Decimal(number) * _SIZE_UNITS[(unit or "").lower()]
        if sign == "-":
            amount = -amount
    else:
        raise ValueError(f"expected {expected}, got {_describe(value)}")
    if amount < 0:
        raise ValueError(f"expected {expected}, got {_describe(value)} (it cannot be negative)")
    return amount


def parse_size(text: object) -> int:
    """Bytes in a size: ``500MB`` is 500*10**6, ``500MiB`` 500*2**20, a bare number bytes."""
    # A fraction of a byte ("1.1GiB") is rounded down: nobody means it.
    return int(_byte_amount(text, _SIZE_EXAMPLE))


def parse_duration(text: object) -> float:
    """Seconds in ``30s``, ``5m``, ``6h``, ``1d``, ``250ms``, ``1h30m`` or a bare number."""
    seconds: float | None = None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    elif isinstance(text, str):
        seconds = _duration_seconds(text.strip())
    if seconds is None or not math.isfinite(seconds):
        raise ValueError(f"expected {_DURATION_EXAMPLE}, got {_describe(text)}")
    if seconds < 0:
        raise ValueError(
            f"expected {_DURATION_EXAMPLE}, got {_describe(text)} (it cannot be negative)"
        )
    return seconds


def _duration_seconds(text: str) -> float | None:
    """Seconds in a duration string, negative if it starts with '-'; None if malformed."""
    if _NUMBER_RE.fullmatch(text):
        return float(text)
    sign = -1.0 if text.startswith("-") else 1.0
    position = 1 if text[:1] in "+-" and text else 0
    total, parts = 0.0, 0
    while position < len(text):
        match = _DURATION_PART_RE.match(text, position)
        if match is None or match.group(2) not in _DURATION_UNITS:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        parts += 1
        position = match.end()
    return sign * total if parts else None


def parse_rate(text: object) -> float:
    """Bytes per second in ``64KiB/s`` or ``1GiB/h``; ``0`` alone means none."""
    if isinstance(text, str) and "/" in text:
        size, _, period = text.rpartition("/")
        seconds = _RATE_PERIODS.get(period.strip())
        if seconds is None:
            raise ValueError(f"expected {_RATE_EXAMPLE} (per s, m, h or d), got {_describe(text)}")
        return float(_byte_amount(size, _RATE_EXAMPLE)) / seconds
    amount = _byte_amount(text, _RATE_EXAMPLE)
    if amount == 0:
        return 0.0
    raise ValueError(f"expected {_RATE_EXAMPLE}, got {_describe(text)} (add /s or /h)")


def format_duration(seconds: float) -> str:
    """A duration the way a user would write it in the config (``6h``, ``250ms``)."""
    for unit, length in (("d", _DAY), ("h", _HOUR), ("m", _MINUTE), ("s", _SECOND)):
        if seconds >= length and seconds % length == 0:
            return f"{int(seconds // length)}{unit}"
    if 0 < seconds < 1 and (seconds * 1000).is_integer():
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


# --- the schema ------------------------------------------------------------------------

_TOP_KEYS = (
    "inbox", "cache", "state", "catalog", "node", "control",
    "ingest", "upload", "cluster", "log", "remotes", "scrub", "metrics", "catalog_backup",
)
_SECTION_KEYS = {
    "cache": ("path", "capacity", "scrub"),
    "control": ("socket", "mode", "group"),
    "ingest": ("settle", "observer", "rescan", "ignore", "rejected"),
    "upload": ("redundancy", "min_redundancy", "concurrency", "retry", "stall", "min_rate", "grace"),
    "upload.retry": ("initial", "max", "max_attempts"),
    "cluster": ("lease",),
    "log": ("level", "format"),
    "scrub": ("remote_read",),
    "metrics": ("listen", "textfile"),
    "catalog_backup": ("interval",),
}
_DEFAULT_IGNORE: tuple[str, ...] = (".*", "*.part", "*.tmp", "*~")

# option -> (kind of value, required); a kind names a _Parser method "_<kind>".
_REMOTE_OPTIONS: dict[str, dict[str, tuple[str, bool]]] = {
    "directory": {"path": ("path", True), "rate_limit": ("rate_limit", False)},
    "s3": {
        "bucket": ("bucket", True),
        "prefix": ("text", False),
        "endpoint": ("url", False),
        "region": ("word", False),
        "access_key_id": ("word", False),
        "secret_access_key": ("secret", False),
        "secret_access_key_file": ("path", False),
        "request_checksum": ("request_checksum", False),
        "rate_limit": ("rate_limit", False),
    },
    "plowshare": {"host": ("word", True), "auth_file": ("path", False), "bin_dir": ("path", False)},
    "rclone": {"remote": ("rclone_remote", True), "config": ("path", False), "rate_limit": ("rate_limit", False)},
}
_REMOTE_DEFAULTS: dict[str, dict[str, object]] = {
    "s3": {"prefix": "", "request_checksum": "when_supported"},
}
_ARTICLE = {"directory": "a", "s3": "an", "plowshare": "a", "rclone": "an"}
# What makes two remotes of one type the same place.
_LOCATION_OPTIONS = ("path", "endpoint", "bucket", "prefix", "remote")
_REMOTE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _first_dir(value: str | None) -> str | None:
    """The first of systemd's colon-separated *_DIRECTORY entries."""
    first = (value or "").split(":")[0]
    return os.path.abspath(first) if first else None


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it (both absolute and normalized)."""
    return os.path.commonpath([path, folder]) == folder


def _overlap(one: str, other: str) -> bool:
    return _inside(one, other) or _inside(other, one)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


class _Parser:
    """Reads one mapping into a Config, collecting every problem on the way.

    A value that fails is recorded in ``errors`` and comes back as None; checks that
    involve it are then skipped, so one mistake is reported once, not once per rule.
    """

    def __init__(self, base_dir: str, environ: Mapping[str, str], hostname: str | None) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.environ = environ
        self.hostname = hostname
        self.errors: list[str] = []

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{key}: {message}")

    # -- structure --

    def check_keys(self, mapping: Mapping[Any, Any], prefix: str, known: Iterable[str],
                   what: str = "unknown key") -> None:
        known = tuple(known)
        for key in mapping:
            if key in known:
                continue
            name = str(key)
            hint = ""
            if not prefix and name.partition(".")[0] in _SECTION_KEYS:
                # The SPEC's table writes keys dotted; YAML wants them nested.
                section, _, rest = name.partition(".")
                hint = f" (write {rest}: nested under {section}:)"
            elif close := difflib.get_close_matches(name, known, n=1):
                hint = f" (did you mean {close[0]}?)"
            self.error(f"{prefix}{name}", what + hint)

    def section(self, data: Mapping[Any, Any], key: str) -> Mapping[Any, Any] | None:
        """A nested mapping checked for unknown keys: empty when absent, None when bad."""
        value = data.get(key.rpartition(".")[2])
        if value is None:
            return {}  # "ingest:" with every line below it commented out
        if not isinstance(value, Mapping):
            self.error(key, f"expected a mapping of {key} settings, got {_describe(value)}")
            return None
        self.check_keys(value, f"{key}.", _SECTION_KEYS[key])
        return value

    def value(self, mapping: Mapping[Any, Any], key: str, path: str,
              convert: Callable[[Any], T], default: T | None = None) -> T | None:
        """``mapping[key]`` converted, ``default`` when absent or null, None when bad."""
        raw = mapping.get(key)
        if raw is None:
            return default
        try:
            return convert(raw)
        except ValueError as exc:
            self.error(path, str(exc))
            return None

    def required(self, mapping: Mapping[Any, Any], key: str, path: str,
                 convert: Callable[[Any], T]) -> T | None:
        if mapping.get(key) is None:
            self.error(path, "required")
            return None
        return self.value(mapping, key, path, convert)

    # -- kinds of values (each raises ValueError with the message after "key: ") --

    def _text(self, value: object) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {_describe(value)}")
        return value

    def _word(self, value: object) -> str:
        text = self._text(value)
        if not text or any(c.isspace() or not c.isprintable() for c in text):
            raise ValueError(f"expected a name without spaces, got {_describe(value)}")
        return text

    def _secret(self, value: object) -> str:
        if not isinstance(value, str) or not value:
            # Not _describe(value): the value may be (part of) the secret.
            raise ValueError("expected a non-empty string")
        return value

    def _path(self, value: object) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a path (a string), got {_describe(value)}")
        if "\0" in value:
            raise ValueError(f"a path cannot contain a NUL byte, got {_describe(value)}")
        return os.path.abspath(os.path.join(self.base_dir, value))

    def _bucket(self, value: object) -> str:
        text = self._word(value)
        if "/" in text:
            raise ValueError(f"expected a bucket name (put folders in prefix), got {_describe(value)}")
        return text

    def _url(self, value: object) -> str:
        text = self._word(value)
        if not re.match(r"https?://[^/]", text):
            raise ValueError(f"expected an http:// or https:// URL, got {_describe(value)}")
        return text

    def _request_checksum(self, value: object) -> str:
        return self._choice(value, S3_REQUEST_CHECKSUMS)

    def _rclone_remote(self, value: object) -> str:
        text = self._text(value)
        if ":" not in text:
            raise ValueError(f"expected an rclone remote like name:path, got {_describe(value)}")
        return text

    @staticmethod
    def _choice(value: object, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {_describe(value)}")
        return value

    @staticmethod
    def _whole(minimum: int) -> Callable[[object], int]:
        def convert(value: object) -> int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"expected a whole number, got {_describe(value)}")
            if value < minimum:
                raise ValueError(f"must be at least {minimum}, got {value}")
            return value

        return convert

    @staticmethod
    def _duration(positive: bool) -> Callable[[object], float]:
        def convert(value: object) -> float:
            seconds = parse_duration(value)
            if positive and seconds == 0:
                raise ValueError(f"must be longer than 0s, got {_describe(value)}")
            return seconds

        return convert

    @staticmethod
    def _rate(value: object) -> float:
        if value is False:  # "off", "no" and "false" in YAML 1.1
            return 0.0
        return parse_rate(value)

    @staticmethod
    def _rate_limit(value: object) -> float:
        if value is False or value == "off":  # "off" and "no" read as false in YAML 1.1
            return 0.0
        rate = parse_rate(value)
        if 0 < rate < 1024:
            raise ValueError(f"must be 0 (no limit) or at least 1KiB/s, got {_describe(value)}")
        return rate

    @staticmethod
    def _mode(value: object) -> int:
        expected = f"expected a mode like 0660 (octal, at most 0777), got {_describe(value)}"
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value <= 0o777:
                return value
            if re.fullmatch(r"[0-7]{1,3}", str(value)):
                # YAML read 660 as decimal; only a leading 0 makes it octal.
                raise ValueError(f"{expected} (write 0{value} or quote it)")
            raise ValueError(expected)
        if isinstance(value, str) and re.fullmatch(r"(0o?)?[0-7]{1,4}", value.strip().lower()):
            mode = int(value.strip().lower().removeprefix("0o"), 8)
            if mode <= 0o777:
                return mode
        raise ValueError(expected)

    def _catalog(self, value: object) -> str:
        expected = (
            f"expected a URL starting with {', '.join(CATALOG_SCHEMES)} (sqlite:////absolute/path, "
            # a mistyped URL or a libpq "host=... password=..." string: its password stays out of the message
            f"or sqlite:///path relative to the config file), got {_describe(scrub(value) if isinstance(value, str) else value)}"
        )
        if not isinstance(value, str):
            raise ValueError(expected)
        sqlite, *postgres = CATALOG_SCHEMES
        if value.lower().startswith(tuple(postgres)):
            return value  # handed to the PostgreSQL driver as written
        if value.lower().startswith(sqlite) and len(value) > len(sqlite):
            return sqlite + self._path(value[len(sqlite) :])
        raise ValueError(expected)

    def _node(self, value: object) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a node name (a string), got {_describe(value)}")
        if any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError(f"must not contain spaces or control characters, got {_describe(value)}")
        if "/" in value:
            # "node/api/pid" names a script's upload claims: a node called "a/api/1" would own them
            raise ValueError(f"must not contain '/', got {_describe(value)}")
        return value

    def _socket(self, value: object) -> str:
        path = self._path(value)
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"a Unix socket path is at most {_MAX_SOCKET_PATH} bytes, got {_describe(path)}"
            )
        return path

    def _group(self, value: object) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a group name (a string), got {_describe(value)}")
        return value

    def _patterns(self, value: object) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
            raise ValueError(f'expected a list of glob patterns like ["*.tmp"], got {_describe(value)}')
        for pattern in value:
            if "/" in pattern:
                raise ValueError(f"patterns match the base name, so '/' never matches, got {pattern!r}")
        return tuple(value)

    def _level(self, value: object) -> str:
        return self._choice(value.lower() if isinstance(value, str) else value, LOG_LEVELS)

    def _observer(self, value: object) -> str:
        return self._choice(value, OBSERVERS)

    @staticmethod
    def _listen(value: object) -> tuple[str, int]:
        expected = f"expected an address like 127.0.0.1:9464 or [::1]:9464, got {_describe(value)}"
        if not isinstance(value, str):
            raise ValueError(expected)
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", value.strip())
        if not match:
            raise ValueError(expected)
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4))
        if not 1 <= port <= 65535:
            raise ValueError(f"the port must be 1 to 65535, got {_describe(value)}")
        return host, port

    def _textfile(self, value: object) -> str:
        path = self._path(value)
        if not path.endswith(".prom"):
            raise ValueError("node_exporter's textfile collector reads only files named *.prom, got "
                             f"{_describe(value)}")
        return path

    # -- sections --

    def parse(self, data: Mapping[Any, Any]) -> Config | None:
        self.check_keys(data, "", _TOP_KEYS)
        inbox = self.required(data, "inbox", "inbox", self._path)
        state = self.value(data, "state", "state", self._path, self._default_state())
        default_catalog = f"sqlite:///{os.path.join(state, 'catalog.sqlite3')}" if state else None
        catalog = self.value(data, "catalog", "catalog", self._catalog, default_catalog)
        if data.get("node") is None:
            node = self._default_node()
        else:
            node = self.value(data, "node", "node", self._node)
        cache = self.parse_cache(data)
        control = self.parse_control(data)
        ingest = self.parse_ingest(data, inbox)
        remotes = self.parse_remotes(data.get("remotes"))
        upload = self.parse_upload(data, None if remotes is None else len(remotes))
        self.check_rate_limits(remotes or [], upload)
        lease = self.parse_lease(data)
        log = self.parse_log(data)
        scrub = self.parse_scrub(data)
        metrics = self.parse_metrics(data)
        backup = self.parse_catalog_backup(data)
        self.check_layout(inbox, state, catalog, cache, ingest, remotes or [],
                          metrics.textfile if metrics is not None else None)

        if (self.errors or inbox is None or state is None or catalog is None or node is None
                or cache is None or control is None or ingest is None or remotes is None
                or upload is None or lease is None or log is None or scrub is None or metrics is None
                or backup is None):
            return None
        return Config(
            inbox=inbox, cache=cache, state=state, catalog=catalog, node=node,
            control=control, ingest=ingest, upload=upload, cluster=ClusterConfig(lease=lease),
            log=log, remotes=tuple(r for r in remotes if r is not None), scrub=scrub,
            metrics=metrics,
            catalog_backup=backup,
        )

    def _default_state(self) -> str:
        return _first_dir(self.environ.get("STATE_DIRECTORY")) or DEFAULT_STATE_DIR

    def _default_node(self) -> str | None:
        hostname = self.hostname if self.hostname is not None else socket.gethostname()
        try:
            return self._node(hostname)
        except ValueError as exc:
            self.error("node", f"{exc} (from the hostname: set node explicitly)")
            return None

    def parse_lease(self, data: Mapping[Any, Any]) -> float | None:
        section = self.section(data, "cluster")
        if section is None:
            return None
        return self.value(section, "lease", "cluster.lease", self._duration(positive=True), 60.0)

    def parse_catalog_backup(self, data: Mapping[Any, Any]) -> CatalogBackupConfig | None:
        section = self.section(data, "catalog_backup")
        if section is None:
            return None
        # 0 (or "off") turns the snapshots off; a PostgreSQL catalog never has them (see snapshots.py)
        interval = self.value(section, "interval", "catalog_backup.interval", self._interval_or_off, 900.0)
        return None if interval is None else CatalogBackupConfig(interval=interval)

    @staticmethod
    def _interval_or_off(value: object) -> float:
        if value is False:  # "off" and "no" in YAML 1.1
            return 0.0
        seconds = parse_duration(value)
        if 0 < seconds < 1:
            raise ValueError(f"must be at least 1s (or 0 to turn snapshots off), got {_describe(value)}")
        return seconds

    def parse_log(self, data: Mapping[Any, Any]) -> LogConfig | None:
        section = self.section(data, "log")
        if section is None:
            return None
        level = self.value(section, "level", "log.level", self._level, "info")
        log_format = self.value(section, "format", "log.format", lambda v: self._choice(v, LOG_FORMATS), "text")
        if level is None or log_format is None:
            return None
        return LogConfig(level=level, format=log_format)

    def parse_metrics(self, data: Mapping[Any, Any]) -> MetricsConfig | None:
        section = self.section(data, "metrics")
        if section is None:
            return None
        before = len(self.errors)
        listen = self.value(section, "listen", "metrics.listen", self._listen)
        textfile = self.value(section, "textfile", "metrics.textfile", self._textfile)
        if len(self.errors) > before:
            return None
        return MetricsConfig(listen=listen, textfile=textfile)

    def parse_scrub(self, data: Mapping[Any, Any]) -> ScrubConfig | None:
        section = self.section(data, "scrub")
        if section is None:
            return None
        remote_read = self.value(section, "remote_read", "scrub.remote_read", self._rate, DEFAULT_REMOTE_READ)
        return None if remote_read is None else ScrubConfig(remote_read=remote_read)

    def parse_cache(self, data: Mapping[Any, Any]) -> CacheConfig | None:
        section = self.section(data, "cache")
        if section is None:
            return None
        path = self.required(section, "path", "cache.path", self._path)
        capacity = self.required(section, "capacity", "cache.capacity", parse_size)
        if capacity == 0:
            self.error("cache.capacity", f"must be more than 0 bytes, got {_describe(section['capacity'])}")
        scrub = self.value(section, "scrub", "cache.scrub", self._rate, parse_rate("1GiB/h"))
        if path is None or not capacity or scrub is None:
            return None
        return CacheConfig(path=path, capacity=capacity, scrub=scrub)

    def parse_control(self, data: Mapping[Any, Any]) -> ControlConfig | None:
        section = self.section(data, "control")
        if section is None:
            return None
        runtime = _first_dir(self.environ.get("RUNTIME_DIRECTORY"))
        default = os.path.join(runtime, "control.sock") if runtime else DEFAULT_CONTROL_SOCKET
        path = self.value(section, "socket", "control.socket", self._socket, default)
        mode = self.value(section, "mode", "control.mode", self._mode, 0o660)
        before = len(self.errors)
        group = self.value(section, "group", "control.group", self._group)
        if path is None or mode is None or len(self.errors) > before:
            return None
        return ControlConfig(socket=path, mode=mode, group=group)

    def parse_ingest(self, data: Mapping[Any, Any], inbox: str | None) -> IngestConfig | None:
        section = self.section(data, "ingest")
        if section is None:
            return None
        settle = self.value(section, "settle", "ingest.settle", self._duration(positive=False), 2.0)
        observer = self.value(section, "observer", "ingest.observer", self._observer, "inotify")
        rescan = self.value(section, "rescan", "ingest.rescan", self._duration(positive=True), 600.0)
        ignore = self.value(section, "ignore", "ingest.ignore", self._patterns, _DEFAULT_IGNORE)
        # Beside the inbox: outside it, yet most likely on the same mount, so a rename works.
        default = os.path.join(os.path.dirname(inbox), "rejected") if inbox else None
        rejected = self.value(section, "rejected", "ingest.rejected", self._path, default)
        if settle is None or observer is None or rescan is None or ignore is None or rejected is None:
            return None
        return IngestConfig(settle=settle, observer=observer, rescan=rescan, ignore=ignore,
                            rejected=rejected)

    def parse_upload(self, data: Mapping[Any, Any], remotes: int | None) -> UploadConfig | None:
        """``remotes`` is how many remotes there are, None when the list was unreadable."""
        section = self.section(data, "upload")
        if section is None:
            return None
        redundancy = self.parse_redundancy(section, remotes)
        min_redundancy = self.value(section, "min_redundancy", "upload.min_redundancy",
                                    self._whole(0), redundancy)
        if min_redundancy is not None and redundancy is not None and min_redundancy > redundancy:
            self.error("upload.min_redundancy",
                       f"must be at most upload.redundancy ({redundancy}), got {min_redundancy}")
            min_redundancy = None
        concurrency = self.value(section, "concurrency", "upload.concurrency", self._whole(1), 4)
        retry = self.parse_retry(section)
        stall = self.value(section, "stall", "upload.stall", self._duration(positive=True), 60.0)
        min_rate = self.value(section, "min_rate", "upload.min_rate", self._rate,
                              parse_rate("64KiB/s"))
        grace = self.value(section, "grace", "upload.grace", self._duration(positive=True), 3600.0)
        if (redundancy is None or min_redundancy is None or concurrency is None or retry is None
                or stall is None or min_rate is None or grace is None):
            return None
        return UploadConfig(redundancy=redundancy, min_redundancy=min_redundancy,
                            concurrency=concurrency, retry=retry, stall=stall, min_rate=min_rate, grace=grace)

    def parse_redundancy(self, section: Mapping[Any, Any], remotes: int | None) -> int | None:
        count = remotes or 0
        # At least 1 with remotes: 0 would let a file be evicted with no copy anywhere.
        redundancy = self.value(section, "redundancy", "upload.redundancy",
                                self._whole(1 if count else 0), min(2, count))
        if redundancy is None or remotes is None or redundancy <= remotes:
            return redundancy
        wanted = f"{redundancy} {'copy' if redundancy == 1 else 'copies'} wanted"
        if remotes == 0:
            configured = "no remotes are configured"
        else:
            configured = f"only {_plural(remotes, 'remote')} {'is' if remotes == 1 else 'are'} configured"
        self.error("upload.redundancy", f"{wanted} but {configured}")
        return None

    def parse_retry(self, upload: Mapping[Any, Any]) -> RetryConfig | None:
        section = self.section(upload, "upload.retry")
        if section is None:
            return None
        initial = self.value(section, "initial", "upload.retry.initial",
                             self._duration(positive=True), 30.0)
        maximum = self.value(section, "max", "upload.retry.max", self._duration(positive=True),
                             6 * _HOUR)
        attempts = self.value(section, "max_attempts", "upload.retry.max_attempts",
                              self._whole(0), 0)
        if initial is None or maximum is None or attempts is None:
            return None
        if maximum < initial:
            self.error("upload.retry.max", "must be at least upload.retry.initial "
                       f"({format_duration(initial)}), got {format_duration(maximum)}")
            return None
        return RetryConfig(initial=initial, max=maximum, max_attempts=attempts)

    # -- remotes --

    def parse_remotes(self, raw: object) -> list[RemoteConfig | None] | None:
        """One entry per remote written (None where it is bad); None if not a list at all."""
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.error("remotes", f"expected a list of remotes, got {_describe(raw)}")
            return None
        remotes = [self.parse_remote(entry, f"remotes[{index}]") for index, entry in enumerate(raw)]
        self.check_remote_names(raw)
        self.check_remote_locations(remotes)
        return remotes

    def parse_remote(self, entry: object, where: str) -> RemoteConfig | None:
        if not isinstance(entry, Mapping):
            self.error(where, "expected a mapping like {name: nas, type: directory, path: ...}, "
                       f"got {_describe(entry)}")
            return None
        before = len(self.errors)
        name = self.required(entry, "name", f"{where}.name", self._remote_name)
        kind = self.required(entry, "type", f"{where}.type", self._remote_type)
        if kind is None:
            return None  # the options allowed depend on the type
        schema = _REMOTE_OPTIONS[kind]
        options = {k: v for k, v in entry.items() if k not in ("name", "type")}
        if kind == "plowshare" and "rate_limit" in options:
            # plowup has no option to limit its speed, and a limit that holds for fetches alone
            # would be a promise half kept
            self.error(f"{where}.rate_limit", "plowshare remotes cannot be rate-limited (plowup has no "
                       "such option); remove it, or limit the line with the host's traffic shaping")
            options.pop("rate_limit")
        self.check_keys(options, f"{where}.", schema,
                        f"unknown key for {_ARTICLE[kind]} {kind} remote")
        values = dict(_REMOTE_DEFAULTS.get(kind, {}))
        for option, (value_kind, needed) in schema.items():
            read = self.required if needed else self.value
            value = read(entry, option, f"{where}.{option}", getattr(self, f"_{value_kind}"))
            if value is not None:
                values[option] = value
        if kind == "s3":
            self.check_s3_credentials(values, where)
        if name is None or len(self.errors) > before:
            return None
        return RemoteConfig(name=name, type=kind, options=tuple(sorted(values.items())))

    def _remote_name(self, value: object) -> str:
        if not isinstance(value, str) or not _REMOTE_NAME_RE.fullmatch(value):
            raise ValueError("expected letters, digits, '.', '_' or '-', starting with a letter "
                             f"or digit, got {_describe(value)}")
        return value

    def _remote_type(self, value: object) -> str:
        return self._choice(value, REMOTE_TYPES)

    def check_s3_credentials(self, options: Mapping[str, object], where: str) -> None:
        secrets = [k for k in ("secret_access_key", "secret_access_key_file") if k in options]
        if len(secrets) == 2:
            self.error(f"{where}.secret_access_key_file",
                       "give either secret_access_key or secret_access_key_file, not both")
        elif secrets and "access_key_id" not in options:
            self.error(f"{where}.{secrets[0]}", "needs access_key_id too")
        elif "access_key_id" in options and not secrets:
            self.error(f"{where}.access_key_id",
                       "needs secret_access_key or secret_access_key_file too (or leave out "
                       "all three to use the standard AWS credential chain)")

    def check_remote_names(self, raw: list[Any]) -> None:
        first: dict[str, int] = {}
        for index, entry in enumerate(raw):
            name = entry.get("name") if isinstance(entry, Mapping) else None
            if not isinstance(name, str):
                continue
            if name in first:
                self.error(f"remotes[{index}].name",
                           f"{name!r} is already the name of remotes[{first[name]}]")
            else:
                first[name] = index

    def check_rate_limits(self, remotes: list[RemoteConfig | None], upload: UploadConfig | None) -> None:
        # An upload slower than upload.min_rate is cancelled: a limit that forces every upload below
        # it would cancel them all. A folder or S3 remote's limit is shared by the uploads running at
        # once (up to upload.concurrency); rclone's holds per process, so per upload.
        if upload is None or not upload.min_rate:
            return
        for index, remote in enumerate(remotes):
            limit = float(remote.get("rate_limit", 0.0)) if remote is not None else 0.0
            if not limit:
                continue
            assert remote is not None
            shared = upload.concurrency if remote.type in ("directory", "s3") else 1
            if limit >= upload.min_rate * shared:
                continue
            if shared > 1:
                self.error(f"remotes[{index}].rate_limit", f"is below upload.min_rate times upload.concurrency "
                           f"({upload.min_rate * shared:.0f} bytes/s): the {shared} uploads that may share it would "
                           "each run below upload.min_rate and be cancelled as too slow; raise it, or lower "
                           "upload.min_rate or upload.concurrency")
            else:
                self.error(f"remotes[{index}].rate_limit", f"is below upload.min_rate ({upload.min_rate:.0f} "
                           "bytes/s), so every upload to it would be cancelled as too slow; raise it or lower "
                           "upload.min_rate")

    def check_remote_locations(self, remotes: list[RemoteConfig | None]) -> None:
        # Two remotes storing into one place would count one copy as two. Plowshare is
        # exempt: one host with two accounts is two places.
        seen: dict[tuple[object, ...], int] = {}
        for index, remote in enumerate(remotes):
            if remote is None or remote.type == "plowshare":
                continue
            location = (remote.type,) + tuple(remote.get(k) for k in _LOCATION_OPTIONS)
            if location in seen:
                self.error(f"remotes[{index}]", "stores into the same place as "
                           f"remotes[{seen[location]}], so its copies would add no redundancy")
            else:
                seen[location] = index

    # -- cross-checks --

    def check_layout(self, inbox: str | None, state: str | None, catalog: str | None,
                     cache: CacheConfig | None, ingest: IngestConfig | None,
                     remotes: list[RemoteConfig | None], textfile: str | None = None) -> None:
        """Folders that must stay apart: anything inside the inbox would be ingested."""
        if inbox is None:
            return
        if textfile is not None and (_inside(textfile, inbox) or (cache is not None and _inside(textfile, cache.path))):
            self.error("metrics.textfile", "must be outside the inbox and cache.path (the daemon would take its "
                       f"own metrics in as a file every 15 s), got {_describe(textfile)}")
        if ingest is not None and _inside(ingest.rejected, inbox):
            self.error("ingest.rejected", "must be outside the inbox (droppers could tamper "
                       f"with it), got {_describe(ingest.rejected)}")
        if cache is not None and _overlap(cache.path, inbox):
            self.error("cache.path", f"must be apart from the inbox, got {_describe(cache.path)}")
        if state is not None and _inside(state, inbox):
            self.error("state", f"must be outside the inbox, got {_describe(state)}")
        sqlite = catalog_sqlite_path(catalog) if catalog else None
        if sqlite and _inside(sqlite, inbox) and not (state and _inside(state, inbox)):
            self.error("catalog", f"must be outside the inbox, got {_describe(catalog)}")
        for index, remote in enumerate(remotes):
            path = remote.get("path") if remote and remote.type == "directory" else None
            if not isinstance(path, str):
                continue
            if _overlap(path, inbox):
                self.error(f"remotes[{index}].path",
                           f"must be apart from the inbox, got {_describe(path)}")
            elif cache is not None and _overlap(path, cache.path):
                self.error(f"remotes[{index}].path", "must be apart from cache.path (evicting "
                           f"would delete the copy), got {_describe(path)}")


# --- entry points ----------------------------------------------------------------------


def _not_a_mapping(data: object) -> str:
    return f"the top level must be a mapping of keys (inbox: ..., cache: ...), got {_describe(data)}"


def config_from_mapping(data: object, *, base_dir: str,
                        environ: Mapping[str, str] = os.environ,
                        hostname: str | None = None) -> Config:
    """A Config from parsed YAML; relative paths are taken from ``base_dir``."""
    if data is None:
        data = {}  # an empty file: report the required keys, not "not a mapping"
    if not isinstance(data, Mapping):
        raise ConfigError(_not_a_mapping(data))
    parser = _Parser(base_dir, environ, hostname)
    config = parser.parse(data)
    if config is None:
        raise ConfigError(parser.errors)
    return config


def parse_remotes(entries: object, *, base_dir: str) -> tuple[RemoteConfig, ...]:
    """Remote mappings like the config file's ``remotes:`` (for the Python API)."""
    parser = _Parser(base_dir, {}, hostname="")
    remotes = parser.parse_remotes(entries)
    if parser.errors or remotes is None:
        raise ConfigError(parser.errors)
    return tuple(remote for remote in remotes if remote is not None)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys.

    PyYAML silently keeps the last of two equal keys; an operator who wrote ``capacity``
    twice should hear about it rather than guess which one is in force.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<" overrides are meant to repeat keys
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_describe(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line, with its position."""
    if isinstance(exc, yaml.reader.ReaderError):
        return f"invalid YAML: not UTF-8 text (byte {exc.position}: {exc.reason})"
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    return "invalid YAML: " + " ".join(str(exc).split())


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] = os.environ,
                hostname: str | None = None) -> Config:
    """The Config in a YAML file; any problem raises ConfigError."""
    source = os.path.abspath(os.fspath(path))
    try:
        with open(source, "rb") as stream:
            text = stream.read()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {_not_a_mapping(data)}")
    config = config_from_mapping(data, base_dir=os.path.dirname(source),
                                 environ=environ, hostname=hostname)
    return dataclasses.replace(config, source=source)


def load_or_report(path: str) -> Config | None:
    """For the command line: the config, or None with one line per error on stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"cloudmanagerd: {line}", file=sys.stderr)
        return None


def upload_policy(remotes: int, redundancy: object = None, min_redundancy: object = None) -> UploadConfig:
    """The upload policy for the Python API: the config file's defaults and checks for `upload.redundancy`
    and `upload.min_redundancy` given as keyword arguments."""
    section = {key: value for key, value in (("redundancy", redundancy), ("min_redundancy", min_redundancy))
               if value is not None}
    parser = _Parser(".", {}, hostname="")
    upload = parser.parse_upload({"upload": section}, remotes)
    if parser.errors or upload is None:
        raise ConfigError(parser.errors)
    return upload
