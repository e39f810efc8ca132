"""Prometheus metrics: on an HTTP endpoint (`metrics.listen`), as a node_exporter textfile
(`metrics.textfile`) and through the control command `metrics`, all from one registry.

Most figures are read at scrape time from what `status` already reads (the catalog's trigger-kept
counters: constant time whatever the catalog's size) plus one catalog query for the pairs per remote
(`Catalog.metrics_figures`); nothing is counted twice. Only what no table keeps is counted here, from
the node's events: the ingest latency ("registered"), the transfer sizes and durations ("uploaded"),
each remote's last success, and the background scrub's work (the daemon hands over each step's report).

Names follow the Prometheus conventions (`cloudmanagerd_` prefix, base units, `_total` counters,
`_bytes`, `_seconds`); labels are bounded: a remote's name, a state, never a hash.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from . import __version__
from .errors import StartupError, explain_oserror

log = logging.getLogger(__name__)

UPLOAD_STATES = ("queued", "active", "retrying", "failed")
TEXTFILE_INTERVAL = 15.0  # seconds between rewrites of metrics.textfile (node_exporter reads it at each scrape)
# a slow or stuck scraper gives up its connection after this long without a byte
CLIENT_TIMEOUT = 5.0
# seconds: from a file's arrival in the inbox to its catalog commit (settle is 2 s by default)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60, 300, 1800, 3600, float("inf"))
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, float("inf"))
SIZE_BUCKETS = (4096, 65536, 1 << 20, 16 << 20, 128 << 20, 1 << 30, 8 << 30, float("inf"))


class _StatusCollector:
    """The gauges and persistent counters, read from the daemon's status and the catalog at each scrape."""

    def __init__(self, status: Callable[[], dict[str, Any]], figures: Callable[[], dict[str, Any]],
                 pending_age: Callable[[], float], remote_names: Callable[[], Iterable[str]],
                 last_success: Mapping[str, float]) -> None:
        self.status = status
        self.figures = figures
        self.pending_age = pending_age
        self.remote_names = remote_names
        self.last_success = last_success

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only (the registry must not call status() when registering)

    def collect(self) -> Iterable[Any]:
        try:
            s = self.status()
            f = self.figures()
        except Exception as exc:  # a busy or damaged catalog: say so in the scrape, not as a traceback
            log.warning("metrics: cannot read the status: %s", exc)
            yield _gauge("cloudmanagerd_scrape_error", "1 when this scrape could not read the status (see the "
                         "log); the other cloudmanagerd_ series are then missing", 1)
            return
        yield _gauge("cloudmanagerd_scrape_error", "1 when this scrape could not read the status (see the log); "
                     "the other cloudmanagerd_ series are then missing", 0)
        info = InfoMetricFamily("cloudmanagerd", "the daemon's version and node name")
        info.add_metric([], {"version": __version__, "node": s["node"]})
        yield info
        yield _gauge("cloudmanagerd_problems", "problems status lists now (0 when healthy)", len(s["problems"]))

        files, size = s["catalog"]["files"], s["catalog"]["bytes"]
        cache = s["cache"]
        by_state = GaugeMetricFamily("cloudmanagerd_files", "files in the catalog, by whether this node caches "
                                     "them", labels=["state"])
        by_state.add_metric(["cached"], cache["files"])
        by_state.add_metric(["evicted"], max(files - cache["files"], 0))
        yield by_state
        bytes_state = GaugeMetricFamily("cloudmanagerd_files_size_bytes", "bytes of the catalog's files, by "
                                        "whether this node caches them", labels=["state"])
        bytes_state.add_metric(["cached"], cache["used"])
        bytes_state.add_metric(["evicted"], max(size - cache["used"], 0))
        yield bytes_state
        yield _gauge("cloudmanagerd_cache_used_bytes", "bytes in this node's cache", cache["used"])
        yield _gauge("cloudmanagerd_cache_capacity_bytes", "cache.capacity", cache["capacity"])

        inbox = s["inbox"]
        yield _gauge("cloudmanagerd_inbox_pending_files", "files seen in the inbox and not yet ingested "
                     "(settling, queued or waiting for room)", inbox["pending"])
        yield _gauge("cloudmanagerd_inbox_oldest_pending_seconds", "how long the oldest file pending (as above) "
                     "has waited (0 when none)", self.pending_age())
        yield _gauge("cloudmanagerd_inbox_rejected_files", "files in the rejected folder", inbox["rejected"])

        names = list(self.remote_names())
        uploads = GaugeMetricFamily("cloudmanagerd_uploads", "upload pairs (file, remote) not done, by remote and "
                                    "state", labels=["remote", "state"])
        seen = set(names) | {remote for remote, _ in f["uploads"]}
        for remote in sorted(seen):
            for state in UPLOAD_STATES:
                uploads.add_metric([remote, state], f["uploads"].get((remote, state), 0))
        yield uploads
        yield _gauge("cloudmanagerd_upload_queue_bytes", "bytes of the pairs queued, sending or retrying (status's "
                     "uploads.queued_bytes)", s["uploads"]["queued_bytes"])

        healthy = GaugeMetricFamily("cloudmanagerd_remote_healthy", "1 when the remote works, 0 while it fails",
                                    labels=["remote"])
        copies = GaugeMetricFamily("cloudmanagerd_remote_copies", "good copies recorded on the remote",
                                   labels=["remote"])
        errors = CounterMetricFamily("cloudmanagerd_remote_errors", "failed transfers to the remote (kept across "
                                     "restarts)", labels=["remote"])
        success = GaugeMetricFamily("cloudmanagerd_remote_last_success_timestamp_seconds", "when the last copy to "
                                    "the remote was recorded (since this start)", labels=["remote"])
        for r in s["remotes"]:
            healthy.add_metric([r["name"]], 1 if r["healthy"] else 0)
            copies.add_metric([r["name"]], r["copies"])
            errors.add_metric([r["name"]], r["errors"])
            if r["name"] in self.last_success:
                success.add_metric([r["name"]], self.last_success[r["name"]])
        yield from (healthy, copies, errors, success)

        safety = s["safety"]
        yield _gauge("cloudmanagerd_files_below_min_redundancy", "files with fewer good copies than "
                     "upload.min_redundancy (not yet safe)", safety["below_min"])
        yield _gauge("cloudmanagerd_files_below_min_redundancy_bytes", "bytes of those files",
                     safety["below_min_bytes"])
        yield _gauge("cloudmanagerd_files_below_redundancy", "files with fewer good copies than upload.redundancy",
                     safety["below_redundancy"])
        yield _gauge("cloudmanagerd_oldest_below_min_redundancy_seconds", "age of the oldest file below "
                     "min_redundancy (0 when none)", safety["oldest_below_min"] or 0.0)

        transfer = CounterMetricFamily("cloudmanagerd_transfer_bytes", "bytes that entered this node (incoming: "
                                       "files taken in, copies fetched back) and left it (outgoing: copies sent to "
                                       "remotes, files handed out by get), kept across restarts", labels=["direction"])
        transfer.add_metric(["outgoing"], s["transfer"]["total_outgoing"])
        transfer.add_metric(["incoming"], s["transfer"]["total_incoming"])
        yield transfer

        yield _gauge("cloudmanagerd_scrub_unverified_files", "cached objects not yet re-hashed by the scrub",
                     f["cache_unverified"])
        if f["cache_oldest_verified"] is not None and not f["cache_unverified"]:
            yield _gauge("cloudmanagerd_scrub_last_full_pass_timestamp_seconds", "every cached object was "
                         "re-hashed at or after this time (absent until a first full pass)", f["cache_oldest_verified"])


class _Spaced:
    """`fn`'s last result, computed again only once the time since is `1 / share` times what the last
    computation took: the per-remote pair counts cost about 0.5 s a million pairs, so with a huge
    queue a scrape reuses figures up to that much older, and never spends over `share` of the time
    on them; with a small catalog they are fresh at every scrape."""

    def __init__(self, fn: Callable[[], dict[str, Any]], share: float = 0.05,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fn = fn
        self.share = share
        self.clock = clock
        self._lock = threading.Lock()  # the endpoint, the textfile job and `metrics` may scrape at once
        self._value: dict[str, Any] | None = None
        self._next = 0.0

    def __call__(self) -> dict[str, Any]:
        with self._lock:
            started = self.clock()
            if self._value is None or started >= self._next:
                self._value = self.fn()
                ended = self.clock()
                self._next = ended + (ended - started) / self.share
            return self._value


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class _Deadline(io.RawIOBase):
    """The request's bytes, all of them within CLIENT_TIMEOUT of the connection's start: a per-read
    timeout alone lets a client that trickles a header line every few seconds hold the endpoint
    (one scrape at a time) for ever."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the request took over {CLIENT_TIMEOUT:g}s")
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(CLIENT_TIMEOUT)  # the reply gets its own CLIENT_TIMEOUT (sendall's total)


class _QuietHandler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's own reader: an open one would keep the socket from closing
        self.rfile = io.BufferedReader(_Deadline(self.connection, time.monotonic() + CLIENT_TIMEOUT))
        self.server.current = self.connection  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is no news


class _Server(WSGIServer):
    """One scrape at a time, in one thread: a slow client delays the next scrape (by CLIENT_TIMEOUT at
    most per silence), never the daemon, and it cannot make the endpoint start threads."""

    current: socket.socket | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: a scrape from %s failed", client_address, exc_info=True)

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            super().finish_request(request, client_address)
        finally:
            self.current = None


def _quiet(app: Callable[..., Any]) -> Callable[..., Any]:
    """The exporter's WSGI app, with a failure as a 500 and one log line: wsgiref would print a
    traceback to stderr (the journal)."""
    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        # `?name[]=...` would select from the collectors that describe their names up front, and the
        # status collector cannot (it reads the status only when scraped): an empty 200 would say
        # "no such series", so the whole text is served whatever the query
        environ = {**environ, "QUERY_STRING": ""}
        try:
            return app(environ, start_response)
        except Exception as exc:
            log.error("metrics: a scrape failed: %s: %s", type(exc).__name__, exc)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"cloudmanagerd: the metrics could not be collected (see the log)\n"]
    return serve


class Metrics:
    """The registry, the endpoint and the textfile. `status` and `figures` are read at each scrape;
    the event handlers (`registered`, `uploaded`, `scrubbed`) are subscribed by the daemon."""

    def __init__(self, *, status: Callable[[], dict[str, Any]], figures: Callable[[], dict[str, Any]],
                 pending_age: Callable[[], float], remote_names: Callable[[], Iterable[str]],
                 listen: tuple[str, int] | None = None, textfile: str | None = None,
                 now: Callable[[], float] = time.time) -> None:
        self.listen = listen
        self.textfile = textfile
        self.now = now
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.last_success: dict[str, float] = {}
        self.registry.register(_StatusCollector(status, _Spaced(figures), pending_age, remote_names,
                                                self.last_success))
        r = self.registry
        self.ingest_latency = Histogram("cloudmanagerd_ingest_latency_seconds", "from a file's last change in the "
                                        "inbox (its ctime) to its catalog commit", buckets=LATENCY_BUCKETS, registry=r)
        self.upload_seconds = Histogram("cloudmanagerd_upload_duration_seconds", "time to send and record one copy "
                                        "(a batch's copies each count the batch's time)", ["remote"],
                                        buckets=DURATION_BUCKETS, registry=r)
        self.upload_size = Histogram("cloudmanagerd_upload_size_bytes", "size of each copy sent", ["remote"],
                                     buckets=SIZE_BUCKETS, registry=r)
        self.scrub_checked = Counter("cloudmanagerd_scrub_checked", "objects the background scrub checked",
                                     ["where"], registry=r)
        self.scrub_bytes = Counter("cloudmanagerd_scrub_bytes", "bytes the background scrub re-hashed", registry=r)
        self.scrub_problems = Counter("cloudmanagerd_scrub_problems", "what the background scrub found wrong",
                                      ["kind"], registry=r)
        for where in ("cache", "remote"):
            self.scrub_checked.labels(where)
        for kind in ("missing", "corrupt", "bad_copy"):
            self.scrub_problems.labels(kind)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._textfile_error: str | None = None

    # -- the event handlers --------------------------------------------------------------------

    def registered(self, hashes: list[str], dropped: list[float]) -> None:
        now = self.now()
        for when in dropped:
            self.ingest_latency.observe(max(now - when, 0.0))

    def uploaded(self, h: str, remote: str, size: int, seconds: float, proven: Sequence[float] = ()) -> None:
        self.upload_seconds.labels(remote).observe(seconds)
        self.upload_size.labels(remote).observe(size)
        self.last_success[remote] = self.now()

    def scrubbed(self, report: dict[str, Any]) -> None:
        self.scrub_checked.labels("cache").inc(report["cache"]["checked"])
        self.scrub_checked.labels("remote").inc(report["remotes"]["checked"])
        self.scrub_bytes.inc(report["bytes"])
        self.scrub_problems.labels("missing").inc(report["cache"]["missing"])
        self.scrub_problems.labels("corrupt").inc(report["cache"]["corrupt"])
        self.scrub_problems.labels("bad_copy").inc(report["remotes"]["bad"])

    def forget_remotes(self, kept: Iterable[str]) -> None:
        """A reload removed remotes: their transfer series go (a label set no longer configured)."""
        kept = set(kept)
        for remote in set(self.last_success) - kept:
            self.last_success.pop(remote, None)
            for histogram in (self.upload_seconds, self.upload_size):
                with contextlib.suppress(KeyError):
                    histogram.remove(remote)

    # -- the faces -------------------------------------------------------------------------------

    def text(self) -> str:
        """The exposition text (Prometheus text format 0.0.4)."""
        return generate_latest(self.registry).decode("utf-8")

    def write_textfile(self) -> None:
        """Rewrite the textfile atomically (a temp file beside it, fsync'd, renamed over it): node_exporter
        never reads half a file. A failure is one log line while it lasts, not a stopped daemon."""
        if self.textfile is None:
            return
        tmp = f"{self.textfile}.{os.getpid()}.tmp"
        try:
            data = generate_latest(self.registry)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # left by a crash: O_EXCL below never writes into a file someone else made
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.textfile)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            message = explain_oserror(exc, f"metrics.textfile {self.textfile}: cannot write it",
                                      {errno.ENOENT: "its folder does not exist (create it first)"})
            if message != self._textfile_error:
                log.warning("%s; retried every %gs", message, TEXTFILE_INTERVAL)
                self._textfile_error = message
            return
        if self._textfile_error:
            log.info("metrics.textfile %s is written again", self.textfile)
            self._textfile_error = None

    def start(self) -> None:
        """Listen (when `listen` is set); an address that cannot be had is a start-up error naming it."""
        if self.listen is None:
            return
        host, port = self.listen
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        except socket.gaierror as exc:
            raise StartupError(f"metrics.listen {shown}: cannot resolve {host} ({exc.strerror})") from None
        server_class = type("_FamilyServer", (_Server,), {"address_family": family})
        try:
            server = server_class((host, port), _QuietHandler)
        except OSError as exc:
            hint = {errno.EADDRINUSE: " (another program listens there: choose another port)",
                    errno.EADDRNOTAVAIL: " (no interface of this host has that address)",
                    errno.EACCES: " (ports below 1024 need privileges: choose a higher one)"}.get(exc.errno or 0, "")
            raise StartupError(f"metrics.listen {shown}: cannot listen: {exc.strerror or exc}{hint}") from None
        server.set_app(_quiet(make_wsgi_app(self.registry)))
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s/metrics", shown)

    @property
    def address(self) -> tuple[str, int] | None:
        """The address the endpoint listens on (None when off)."""
        return None if self._server is None else self._server.server_address[:2]

    def stop(self) -> None:
        """Stop listening; a scrape in progress is cut off, so that a stuck client cannot hold up the stop."""
        server, self._server = self._server, None
        if server is None:
            return
        current = server.current
        if current is not None:
            try:
                current.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(10)




def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
