"""A remote on any S3 server (AWS, SeaweedFS, MinIO, Ceph): copies at s3://<bucket>/<prefix><h>.

Uploads go through boto3's managed transfer (s3transfer): one PUT below `multipart_threshold`, a
multipart upload with `max_concurrency` parts in flight above it. We never write multipart by hand.
Downloads are GET_STREAMS ranged GETs at once, the parts taken in order and each written where it
belongs, so that the prefix on disk grows as the bytes arrive: `get` reports that prefix as its
progress (`sequential_get`), and fetch hashes behind it instead of reading the file again.
(s3transfer's download wrote its parts out of order, and the second pass cost a read of the whole
file on top of the transfer.)

What a reader of a bucket can see:

* A PUT is atomic and a multipart upload becomes visible only when it is completed, so an
  object under its final key is always whole. `put` also checks the stored size with a
  HEAD before it reports the copy.
* A put cancelled by the uploader (stall, too slow, daemon stopping) raises `Cancelled` from
  the progress callback inside the transfer's worker thread; s3transfer then fails the
  transfer and runs its failure clean-up, which aborts the multipart upload (AbortMultipartUpload),
  so nothing is left on the server. A request that is waiting for the server's answer
  (no bytes moving, so no callback) notices the cancellation only when the server answers
  or `read_timeout` expires.
* A process killed in the middle of a multipart upload (SIGKILL, power loss) cannot abort it:
  the parts stay on the server, invisible under the key but stored (and billed). At most
  once an hour, `put` and `probe` call `cleanup_incomplete`, which aborts multipart uploads
  under the prefix that are older than INCOMPLETE_AGE (`put` only after an upload went through,
  so that a server that hangs does not delay an upload before it starts). (An AWS lifecycle rule
  "AbortIncompleteMultipartUpload" does the same on the server side.)

A small object (below SMALL_PUT) is one checksummed PUT; many (`put_many`, the uploader's batches)
are BATCH_CONCURRENCY such PUTs in flight at once from a thread pool of the remote. These PUTs skip
boto3's client pipeline (its event hooks, parameter checks and response parsing cost ~1.5 ms of
CPU per object here, more than the server's work). botocore's S3 SigV4 signs each, given the
object's SHA-256 (its name) as the signed payload hash (`_NamedPayloadAuth`: the server checks the
body against it), and the same hash goes as x-amz-checksum-sha256. To a plain-http endpoint with no
proxy (a server on the LAN, where CPU per PUT is what limits small files) they go over kept-alive
http.client connections of the remote (`_Connections`); otherwise through botocore's HTTP session
(the client's pool, TLS and proxy settings). Errors go through the same classification as the
client's. On our connections the thread awaiting the PUTs (`_watched`) shuts down the connection of
a cancelled transfer, so that a server dribbling its answer (no read times out) cannot hold the
uploader's stall cancel or the daemon's stop; a 2xx is believed only for a body sent whole. Measured on 1,000 x 64 KiB to SeaweedFS, 16 in flight, CPU of the process: put_object
1.3-1.6 s, botocore's signer + its session 0.76-0.92 s, botocore's signer + http.client 0.39-0.58 s.
The server itself spent 1.2-1.7 s. (A SigV4 of our own that kept the day's signing key saved another
~0.1 ms per PUT: not worth hand-writing what botocore does.)

Reading the source: s3transfer keeps up to ten parts of a *file object* in memory (640 MiB
with 64 MiB parts), but streams a *file name* part by part from disk. The cache object is
therefore given to it by name, as /proc/self/fd/<fd>, which reopens the very file the
caller opened (even if it has been unlinked since) without touching the caller's fd.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gc
import http.client
import io
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import Future, ThreadPoolExecutor, wait
from urllib.parse import urlsplit, urlunsplit
from typing import Any, TypeVar

import boto3
import boto3.exceptions
import botocore.auth
import botocore.exceptions
import botocore.utils
import s3transfer.exceptions
from boto3.s3.transfer import ProgressCallbackInvoker, TransferConfig, create_transfer_manager
from botocore.awsrequest import AWSRequest
from botocore.config import Config

from .. import fsutil
from ..config import RemoteConfig
from .base import (FILE, MISSING, OBJECT_NAME, REMOTE, TRANSIENT, Cancelled, RateLimit, RemoteError, Transfer,
                   reserved_parts)

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1 << 20
INCOMPLETE_AGE = 2 * 86400.0  # multipart uploads older than this are leftovers of a killed daemon
CLEANUP_INTERVAL = 3600.0
GET_PART = 16 * MiB  # a download's ranged GETs, GET_STREAMS of them at once
GET_STREAMS = 4
READ_CHUNK = MiB
SMALL_PUT = 8 * MiB  # below this, one checksummed PUT instead of a managed transfer and a HEAD
BATCH_CONCURRENCY = 16  # PUTs of one remote's batches in flight at once (put_many)
CANCEL_CHECK = 0.5  # seconds between two looks of put_many for cancelled transfers to abort
PUT_CHUNK = 256 * 1024
ANSWER_LIMIT = 64 * 1024  # the most of a batch PUT's answer read: a larger one (an error page) is cut  # a batch PUT's body is read and sent in pieces of this size (progress, rate limit)
_TEMPLATE_HASH = "0" * 64  # stands for the hash in the URL template of the batch PUTs

_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
           "ExpiredToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
           "InvalidSecurity", "NotSignedUp", "403", "Forbidden"}
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_NO_BUCKET = {"NoSuchBucket"}
_WRONG_REGION = {"AuthorizationHeaderMalformed", "PermanentRedirect", "IllegalLocationConstraintException",
                 "301"}
_FILE_CODES = {"EntityTooLarge"}
# Errors a server gives when it does not understand boto3's default checksums.
_CHECKSUM_HINT_CODES = {"NotImplemented", "InvalidArgument", "InvalidRequest", "XAmzContentSHA256Mismatch",
                        "BadDigest", "InvalidDigest"}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# What _call converts; anything else is a bug, left to propagate with its traceback.
_EXPECTED = (RemoteError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
             boto3.exceptions.Boto3Error, s3transfer.exceptions.RetriesExceededError,
             s3transfer.exceptions.S3UploadFailedError, s3transfer.exceptions.S3DownloadFailedError,
             FutureCancelled, OSError)


def _chained(exc: BaseException) -> list[BaseException]:
    """The exceptions behind `exc`: its cause and context, botocore's wrapped `error`, and
    s3transfer's `last_exception`."""
    kwargs = getattr(exc, "kwargs", None)
    linked = [exc.__cause__, exc.__context__, getattr(exc, "last_exception", None),
              kwargs.get("error") if isinstance(kwargs, dict) else None]
    return [e for e in linked if isinstance(e, BaseException)]


def _find_cancelled(exc: BaseException) -> Cancelled | None:
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, Cancelled):
            return e
        todo += _chained(e)
    return None


def _forget(exc: BaseException) -> None:
    """Drop the tracebacks of an exception and of those chained to it."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += _chained(e)


class _ProgressReader(io.FileIO):
    """The request body of a small PUT: reports bytes read to the Transfer, whose update()
    raises Cancelled once the uploader gave up on it (botocore then aborts the request)."""

    def __init__(self, fd: int, transfer: Transfer | None, limit: RateLimit) -> None:
        super().__init__(fd, "rb", closefd=True)
        self.seek(0)
        self.transfer = transfer
        self.limit = limit
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        if self.limit and size is not None and size > self.limit.chunk:
            size = self.limit.chunk  # a short read, as raw files may give: the bytes flow evenly
        # (a read of everything, size -1, stays whole: its caller means all of it)
        data = super().read(size)
        self.limit.take(len(data), self.transfer)
        if self.transfer is not None:
            self.total = self.tell()
            self.transfer.update(self.total)
        return data


class _Prefix:
    """How much of a download is on disk from its start: the parts written so far, in any order,
    reported to the Transfer as the contiguous prefix they make (fetch hashes behind it)."""

    def __init__(self, size: int, part: int, transfer: Transfer | None) -> None:
        self.size = size
        self.part = part
        self.transfer = transfer
        self.filled = [0] * ((size + part - 1) // part)
        self.whole = 0  # parts complete from the start
        self._lock = threading.Lock()

    def wrote(self, index: int, amount: int) -> None:
        """`amount` more bytes of part `index` are written; raises Cancelled once the transfer was."""
        with self._lock:
            self.filled[index] += amount
            while self.whole < len(self.filled) and self.filled[self.whole] == self._length(self.whole):
                self.whole += 1
            done = self.whole * self.part + (self.filled[self.whole] if self.whole < len(self.filled) else 0)
            if self.transfer is not None:
                self.transfer.update(min(done, self.size))

    def _length(self, index: int) -> int:
        return min(self.part, self.size - index * self.part)


class _Progress:
    """A Callback for s3transfer: sums the byte counts its worker threads report and hands
    the total to the Transfer, whose update() raises Cancelled once the uploader cancelled."""

    def __init__(self, transfer: Transfer | None, limit: RateLimit) -> None:
        self.transfer = transfer
        self.limit = limit
        self.total = 0
        self._lock = threading.Lock()

    def __call__(self, amount: int) -> None:
        # s3transfer calls back from the thread that read the bytes: sleeping here paces that read
        self.limit.take(amount, self.transfer)
        with self._lock:
            self.total += amount  # negative when a retried request rewinds
            total = self.total
        if self.transfer is not None:
            self.transfer.update(max(total, 0))


class _NamedPayloadAuth(botocore.auth.S3SigV4Auth):
    """botocore's S3 SigV4, given the payload hash instead of reading the body for it: a batch PUT's
    object is named by its SHA-256, which the server then checks the body against."""

    def payload(self, request: AWSRequest) -> str:
        return request.context["payload_sha256"]


class _Connections:
    """Kept-alive connections to a plain-http endpoint with no proxy, one per batch PUT in flight:
    http.client straight, for urllib3's pool and botocore's session cost more CPU per small PUT
    than signing it (see the module doc). Failures come out as the botocore exceptions the client
    would raise, so that one classification (`S3Remote._error`) serves both."""

    def __init__(self, endpoint: str, netloc: str, host: str, port: int, connect_timeout: float,
                 read_timeout: float) -> None:
        self.endpoint = endpoint
        self.netloc = netloc  # the Host the batch URL names: only those PUTs come this way
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: list[http.client.HTTPConnection] = []
        # the connections of PUTs in flight: their socket (http.client lets go of it once an answer
        # says "close") and their transfer, for `abort_cancelled` and `close`
        self._busy: dict[http.client.HTTPConnection, tuple[socket.socket, Transfer | None]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def take(self, transfer: Transfer | None, fresh: bool = False) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection (True: it has been used, the server may have closed it since) or, `fresh`
        or none idle, a new one (a server that drops its idle connections drops them all at once).
        Each goes back by `give`."""
        with self._lock:
            if self._closed:
                raise RemoteError(f"{self.endpoint}: the remote is closed (the daemon is stopping or "
                                  "reloading)", TRANSIENT)
            if self._idle and not fresh:
                conn = self._idle.pop()
                assert conn.sock is not None
                self._busy[conn] = (conn.sock, transfer)
                return conn, True
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)
        try:
            conn.connect()
        except socket.timeout as exc:
            conn.close()
            raise botocore.exceptions.ConnectTimeoutError(endpoint_url=self.endpoint, error=exc) from None
        except OSError as exc:
            conn.close()
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=self.endpoint, error=exc) from None
        assert conn.sock is not None
        conn.sock.settimeout(self.read_timeout)
        with self._lock:
            self._busy[conn] = (conn.sock, transfer)
            closed = self._closed
        if closed:  # closed while connecting: `close` did not see this one
            self.give(conn, keep=False)
            raise RemoteError(f"{self.endpoint}: the remote is closed (the daemon is stopping or reloading)",
                              TRANSIENT)
        return conn, False

    def give(self, conn: http.client.HTTPConnection, keep: bool) -> None:
        """A connection back from its PUT: kept for the next one, or closed (its owner closes it, never
        `abort_cancelled`, so that no one shuts a descriptor number that was reused meanwhile)."""
        with self._lock:
            del self._busy[conn]
            if keep and not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def abort_cancelled(self, every: bool = False) -> None:
        """Shut the connections of cancelled transfers (`every`: all in flight) down: a PUT blocked on a
        server that reads nothing or dribbles its answer a byte at a time (no read times out) ends now,
        its thread seeing a dead connection."""
        with self._lock:
            for sock, transfer in self._busy.values():
                if every or (transfer is not None and transfer.cancelled):
                    with contextlib.suppress(OSError):  # already closed by its owner's http.client
                        sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        self.abort_cancelled(every=True)


class S3Remote:
    kind = "s3"
    reports_progress = True
    sequential_get = True  # get() reports the contiguous prefix on disk: fetch hashes behind it

    def __init__(self, name: str, bucket: str, prefix: str = "", endpoint: str | None = None,
                 region: str | None = None, access_key_id: str | None = None,
                 secret_access_key: str | None = None, request_checksum: str = "when_supported",
                 connect_timeout: float = 10, read_timeout: float = 60,
                 multipart_threshold: int = 64 * MiB, multipart_chunksize: int = 64 * MiB,
                 max_concurrency: int = 4, rate_limit: float = 0.0) -> None:
        self.name = name
        self.limit = RateLimit(rate_limit)  # shared by every transfer to and from this remote
        self.bucket = bucket
        self.prefix = prefix or ""
        self.endpoint = endpoint
        self.request_checksum = request_checksum
        self.where = endpoint or "AWS S3"
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": 2, "mode": "standard"},
            # botocore keeps 10 connections; uploads at once times parts at once can need more, and
            # a full pool throws connections away and opens new ones
            max_pool_connections=64,
            request_checksum_calculation=request_checksum,
            response_checksum_validation=request_checksum,
            s3={"addressing_style": "path"} if endpoint else None,
        )
        # A session per remote: credentials and region of one remote never leak to another.
        session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region or ("us-east-1" if endpoint else None),
        )
        self.client = session.client("s3", endpoint_url=endpoint, config=config)
        self._session = session  # the credentials of the batch PUTs (refreshed as the client's are)
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=True,
            preferred_transfer_client="classic",
        )
        self._cleanup_lock = threading.Lock()
        self._next_cleanup = 0.0
        self._batch_lock = threading.Lock()
        self._batch_pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._put_url: tuple[str, str] | None = None  # the batch PUTs' URL, split around the hash
        self.region = self.client.meta.region_name or "us-east-1"
        self._direct = _direct_connections(endpoint, config, connect_timeout, read_timeout)

    def key(self, h: str) -> str:
        return f"{self.prefix}{h}"

    def url(self, h: str) -> str:
        return f"s3://{self.bucket}/{self.key(h)}"

    # -- errors --------------------------------------------------------------------------

    def _error(self, exc: BaseException, what: str) -> RemoteError:
        """A boto3/botocore/s3transfer exception as a one-line RemoteError of the right kind."""
        cancelled = _find_cancelled(exc)
        if cancelled is not None:  # raised by our callback in a worker thread, maybe wrapped by
            return Cancelled(str(cancelled))  # botocore (HTTPClientError): a fresh one, without frames
        if isinstance(exc, RemoteError):
            return exc
        if isinstance(exc, botocore.exceptions.ClientError):
            return self._client_error(exc, what)
        if isinstance(exc, (botocore.exceptions.NoCredentialsError,
                            botocore.exceptions.PartialCredentialsError)):
            return RemoteError("no credentials: set access_key_id and secret_access_key_file "
                               "(or configure the standard AWS credential chain)", REMOTE)
        if isinstance(exc, botocore.exceptions.CredentialRetrievalError):
            return RemoteError(f"cannot get credentials: {_one_line(exc)}", REMOTE)
        if isinstance(exc, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
            return RemoteError(self._connection_problem(exc), TRANSIENT)  # refused, closed, timeouts, TLS
        if isinstance(exc, botocore.exceptions.ParamValidationError):
            return RemoteError(f"{what}: {_one_line(exc)} (check bucket and prefix)", REMOTE)
        if isinstance(exc, botocore.exceptions.NoRegionError):
            return RemoteError("no region: set region", REMOTE)
        last = getattr(exc, "last_exception", None)  # s3transfer's RetriesExceededError
        if isinstance(last, BaseException):
            return self._error(last, what)
        if isinstance(exc, OSError):
            return RemoteError(f"{what}: {exc.strerror or _one_line(exc)}", TRANSIENT)
        if isinstance(exc, FutureCancelled):
            return Cancelled(f"{what}: cancelled")
        return RemoteError(f"{what}: {type(exc).__name__}: {_one_line(exc)}", TRANSIENT)

    def _connection_problem(self, exc: BaseException) -> str:
        if isinstance(exc, botocore.exceptions.ReadTimeoutError):
            return f"{self.where} did not answer in time"
        if isinstance(exc, botocore.exceptions.ConnectionClosedError):
            return f"{self.where} closed the connection before answering"
        if isinstance(exc, botocore.exceptions.ConnectTimeoutError):
            return f"cannot connect to {self.where}: timed out (is the server up? check endpoint)"
        if isinstance(exc, botocore.exceptions.SSLError):
            return f"TLS error with {self.where}: {_one_line(exc)}"
        if isinstance(exc, botocore.exceptions.EndpointConnectionError):
            return f"cannot connect to {self.where} (is the server up? check endpoint)"
        return f"cannot reach {self.where}: {_one_line(exc)}"

    def _client_error(self, exc: botocore.exceptions.ClientError, what: str) -> RemoteError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = _one_line(error.get("Message") or exc)
        if code in _NO_BUCKET:
            return self._no_bucket()
        if code in _DENIED or status == 403:
            return RemoteError(f"access denied by {self.where} to bucket {self.bucket} "
                               f"({code or status}: check the credentials and what they are allowed)", REMOTE)
        if code in _WRONG_REGION or status == 301:
            return RemoteError(f"bucket {self.bucket} is in another region ({code}: set region)", REMOTE)
        if code == "InvalidBucketName":
            return RemoteError(f"{self.bucket!r} is not a valid bucket name (fix bucket)", REMOTE)
        if code in _FILE_CODES:
            return RemoteError(f"{what}: {self.where} refuses an object this large ({code})", FILE)
        if code in _NOT_FOUND or status == 404:
            return RemoteError(f"{what}: not found", MISSING)
        text = f"{what}: {code or status}: {message}"
        if code in _CHECKSUM_HINT_CODES and self.request_checksum == "when_supported":
            text += " (if the server rejects boto3's checksums, set request_checksum: when_required)"
        return RemoteError(text, TRANSIENT)  # 5xx, SlowDown, throttling, and anything unknown

    def _no_bucket(self) -> RemoteError:
        return RemoteError(f"bucket {self.bucket} does not exist at {self.where} (create it)", REMOTE)

    def _missing(self, h: str, what: str) -> RemoteError:
        """A 404 for the object: the copy is gone, unless it is the whole bucket that is."""
        try:
            self._call(f"bucket {self.bucket}", self.client.head_bucket, Bucket=self.bucket)
        except RemoteError as error:
            return self._no_bucket() if error.kind == MISSING else error
        return RemoteError(f"copy {self.url(h)} is missing", MISSING)

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(...)`, its boto3/botocore/s3transfer/OS errors turned into a RemoteError.

        The RemoteError keeps no reference to the original exception, whose traceback is
        dropped too: its frames hold HTTP responses, and a response's socket file keeps the
        connection open even after client.close(). s3transfer stores a failed transfer's
        exception in its future, whose frames refer back to it, so without this the socket
        would stay open until the garbage collector finds the cycle.
        """
        try:
            return fn(*args, **kwargs)
        except _EXPECTED as exc:
            error = self._error(exc, what)
            _forget(exc)
        raise error

    def _transfer_call(self, what: str, transfer: Transfer | None, fn: Callable[..., T], *args: Any) -> T:
        """`_call` for a transfer: any error after the uploader cancelled it is that cancellation."""
        try:
            return self._call(what, fn, *args)
        except RemoteError as error:
            if transfer is not None and transfer.cancelled and not isinstance(error, Cancelled):
                raise Cancelled(transfer.reason or "cancelled") from None
            raise

    # -- the Remote protocol -------------------------------------------------------------

    def put(self, h: str, src_fd: int, size: int, transfer: Transfer | None = None) -> str:
        if transfer is not None:
            transfer.check()
        what = f"upload to {self.url(h)}"
        checked = size < SMALL_PUT and self.request_checksum == "when_supported"
        if checked:
            # by the batch PUTs' pool, whose watch ends a cancelled PUT that no read timeout would end
            [result] = self._watched([self._pool().submit(self._put_item, h, src_fd, size, transfer)])
            if isinstance(result, RemoteError):
                raise result
            # the server verified the SHA-256 of what it received against the object's own hash
            self._maybe_cleanup()
            return result
        self._transfer_call(what, transfer, self._upload, self.key(h), src_fd, transfer)
        stored = self._stored_size(h, what)
        if stored != size:
            # Something changed the object or the source on the way; leave nothing that
            # looks complete under the key (same hash, same bytes: a concurrent writer of the
            # same object cannot have produced another size).
            with contextlib.suppress(RemoteError):
                self._call(what, self.client.delete_object, Bucket=self.bucket, Key=self.key(h))
            raise RemoteError(f"{what}: the server holds {stored} bytes, expected {size}", TRANSIENT)
        self._maybe_cleanup()  # now that the server has shown it answers
        return self.url(h)

    def put_many(self, items: Sequence[tuple[str, int, int, Transfer | None]]) -> list[str | RemoteError]:
        """Many objects, BATCH_CONCURRENCY PUTs in flight at once (see the module doc). Each transfer
        is begun as its PUT starts; each answer is the object's URL once the server has taken and
        checked it, or the error of that object alone."""
        if not items:
            return []
        pool = self._pool()
        results = self._watched([pool.submit(self._put_item, h, fd, size, transfer) for h, fd, size, transfer in items])
        if any(isinstance(r, str) for r in results):
            self._maybe_cleanup()  # now that the server has shown it answers
        return results

    def _watched(self, futures: list[Future[str | RemoteError]]) -> list[str | RemoteError]:
        """The results of `_put_item`s in the pool, awaited by a thread that meanwhile shuts the
        connection of any whose transfer was cancelled: a PUT may sit in a read that no timeout ends
        (a server dribbling its answer a byte at a time)."""
        waiting = set(futures)
        while waiting:
            waiting = wait(waiting, timeout=CANCEL_CHECK).not_done
            if waiting and self._direct is not None:
                self._direct.abort_cancelled()
        return [f.result() for f in futures]

    def _pool(self) -> ThreadPoolExecutor:
        with self._batch_lock:
            if self._closed:  # a pool made now would never be shut down: its threads would outlive us
                raise RemoteError(f"remote {self.name} is closed (the daemon is stopping or reloading)", TRANSIENT)
            if self._batch_pool is None:
                self._batch_pool = ThreadPoolExecutor(max_workers=BATCH_CONCURRENCY,
                                                      thread_name_prefix=f"s3-{self.name}")
            return self._batch_pool

    def _put_item(self, h: str, src_fd: int, size: int, transfer: Transfer | None) -> str | RemoteError:
        try:
            if transfer is not None:
                transfer.begin()
            if size >= SMALL_PUT or self.request_checksum != "when_supported":
                return self.put(h, src_fd, size, transfer)  # no checksum the server checks: put's HEAD
            self._transfer_call(f"upload to {self.url(h)}", transfer, self._put_signed, h, src_fd, size, transfer)
        except RemoteError as error:
            return error
        return self.url(h)

    def _put_signed(self, h: str, src_fd: int, size: int, transfer: Transfer | None) -> None:
        """One PUT carrying the object's SHA-256 (its name) as the checksum the server must match (small
        files cost most of their upload in CPU: a transfer manager per file and a HEAD afterwards doubled
        it, and the server's check is stronger than a size check), signed by botocore's S3 SigV4 (`_NamedPayloadAuth`) and sent without
        the client's pipeline: over `_Connections` to a plain-http endpoint with no proxy, else through
        botocore's HTTP session (the client's pool, TLS and proxy settings). A request on a kept-alive
        connection the server had closed is sent once more."""
        actual = os.fstat(src_fd).st_size
        if actual != size:  # the PUT would wait for bytes that never come
            raise RemoteError(f"upload to {self.url(h)}: the source holds {actual} bytes, expected {size}",
                              TRANSIENT)
        head, tail = self._batch_url()
        credentials = self._session.get_credentials()
        if credentials is None:
            raise botocore.exceptions.NoCredentialsError()
        url = head + h + tail
        parts = urlsplit(url)
        signed = AWSRequest("PUT", url, headers={
            "x-amz-checksum-sha256": base64.b64encode(bytes.fromhex(h)).decode()})
        signed.context["payload_sha256"] = h
        _NamedPayloadAuth(credentials.get_frozen_credentials(), "s3", self.region).add_auth(signed)
        # no Host of ours: http.client and urllib3 send the one the signer signed (the host in lower
        # case, no default port), where the URL's own spelling may differ and fail the signature
        headers = dict(signed.headers)
        headers["Content-Length"] = str(size)
        for attempt in (1, 2):
            last = attempt == 2 or (transfer is not None and transfer.cancelled)
            with _ProgressReader(os.dup(src_fd), transfer, self.limit) as body:
                if self._direct is not None and parts.netloc == self._direct.netloc:
                    answer = self._send_direct(self._direct, f"upload to {self.url(h)}", parts.path, headers,
                                               body, size, transfer, attempt == 2, last)
                    if answer is None:
                        continue
                    status, content = answer
                else:
                    try:
                        response = self.client._endpoint.http_session.send(
                            AWSRequest("PUT", url, data=body, headers=headers).prepare())
                    except botocore.exceptions.ConnectionClosedError:
                        if last:
                            raise
                        continue
                    status, content = response.status_code, response.content
            if 200 <= status < 300:
                return
            raise self._response_error(status, content)

    @staticmethod
    def _send_direct(direct: _Connections, what: str, path: str, headers: dict[str, str], body: _ProgressReader,
                     size: int, transfer: Transfer | None, fresh: bool, last: bool) -> tuple[int, bytes] | None:
        """One PUT over a kept-alive connection (a new one if `fresh`): (status, body of the answer), or
        None when a reused connection turned out closed by the server and `last` is false (send again)."""
        conn, reused = direct.take(transfer, fresh)
        keep = False
        try:
            conn.putrequest("PUT", path, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            data = body.read(min(PUT_CHUNK, size))
            sent = 0
            try:
                conn.endheaders(data)  # the headers and the first bytes in one segment
                sent = len(data)
                while sent < size:
                    data = body.read(min(PUT_CHUNK, size - sent))
                    if not data:
                        raise RemoteError(f"{what}: the source ended after {sent} bytes of {size}", TRANSIENT)
                    conn.send(data)
                    sent += len(data)
            except ConnectionError:
                # A server may answer before it has read the body (access denied) and close: its
                # answer says why, where the reset alone would be taken for a connection problem.
                pass
            response = conn.getresponse()
            content = response.read(ANSWER_LIMIT)  # an answer's first bytes name its error: no more in memory
            if sent < size and 200 <= response.status < 300:
                # a success for bytes the server never had: no check of the hash can stand behind it
                raise botocore.exceptions.ConnectionClosedError(endpoint_url=direct.endpoint)
            keep = response.isclosed() and not response.will_close  # isclosed: the answer was read whole
            return response.status, content
        except socket.timeout as exc:
            raise botocore.exceptions.ReadTimeoutError(endpoint_url=direct.endpoint, error=exc) from None
        except (http.client.HTTPException, ConnectionError) as exc:
            if reused and not last:
                return None  # most likely closed by the server while idle
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=direct.endpoint) from exc
        finally:
            direct.give(conn, keep)  # not kept: half a request, an answer unread, or the server's "close"

    def _batch_url(self) -> tuple[str, str]:
        """The URL of an object as the client addresses it (path or virtual host style, the
        endpoint of the region), split around the hash: taken once from a presigned URL."""
        if self._put_url is None:
            url = self.client.generate_presigned_url(
                "put_object", Params={"Bucket": self.bucket, "Key": self.key(_TEMPLATE_HASH)}, ExpiresIn=60)
            parts = urlsplit(url)
            path = parts.path
            at = path.rindex(_TEMPLATE_HASH)
            base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
            self._put_url = (base + path[:at], path[at + len(_TEMPLATE_HASH):])
        return self._put_url

    @staticmethod
    def _response_error(status: int, content: bytes) -> botocore.exceptions.ClientError:
        """An S3 error response as the ClientError the client would have raised."""
        text = content.decode("utf-8", "replace") if content else ""
        found = {name: (m.group(1) if (m := re.search(f"<{name}>(.*?)</{name}>", text, re.S)) else "")
                 for name in ("Code", "Message")}
        code = found["Code"] or str(status)
        return botocore.exceptions.ClientError(
            {"Error": {"Code": code, "Message": found["Message"] or text[:200]},
             "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    def _upload(self, key: str, src_fd: int, transfer: Transfer | None) -> None:
        os.lseek(src_fd, 0, os.SEEK_SET)  # a fd that cannot seek is no cache object: fail early
        subscribers = [ProgressCallbackInvoker(_Progress(transfer, self.limit))]
        with contextlib.ExitStack() as stack:
            if os.path.isdir("/proc/self/fd"):
                # By name, so that s3transfer streams each part from disk (see the module doc).
                source: Any = f"/proc/self/fd/{src_fd}"
            else:  # no /proc: a file object (s3transfer then holds up to ten parts in memory)
                source = stack.enter_context(open(os.dup(src_fd), "rb"))
            manager = stack.enter_context(create_transfer_manager(self.client, self.transfer_config))
            future = manager.upload(source, self.bucket, key, subscribers=subscribers)
            future.result()  # raises Cancelled from the progress callback; the manager aborts

    def _head(self, h: str) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=self.key(h))["ContentLength"])

    def _stored_size(self, h: str, what: str) -> int | None:
        try:
            return self._call(what, self._head, h)
        except RemoteError as error:
            if error.kind == MISSING:
                return None
            raise

    def get(self, h: str, url: str, dst_fd: int, transfer: Transfer | None = None) -> None:
        if transfer is not None:
            transfer.check()
        what = f"download of {self.url(h)}"
        # Our own HEAD first: a 404 is told apart from a missing bucket here, and s3transfer,
        # given the size, does not send its own.
        size = self._stored_size(h, what)
        if size is None:
            raise self._missing(h, what)
        self._transfer_call(what, transfer, self._download, h, size, dst_fd, transfer)

    def _download(self, h: str, size: int, dst_fd: int, transfer: Transfer | None) -> None:
        """GET_STREAMS ranged GETs of GET_PART bytes at once, each written where it belongs, the parts
        taken in order so that the prefix on disk grows behind them (a pipe: one GET, in order)."""
        try:
            base: int | None = os.lseek(dst_fd, 0, os.SEEK_CUR)
        except OSError:
            base = None
        prefix = _Prefix(size, GET_PART if base is not None else max(size, 1), transfer)
        parts = len(prefix.filled)
        if parts <= 1 or base is None:
            if size:
                self._get_part(h, 0, size, dst_fd, base, prefix, threading.Event())
            return
        stop = threading.Event()
        next_part = iter(range(parts))
        lock = threading.Lock()

        def worker() -> None:
            while not stop.is_set():
                with lock:
                    index = next(next_part, None)
                if index is None:
                    return
                try:
                    self._get_part(h, index, size, dst_fd, base, prefix, stop)
                except BaseException:
                    stop.set()  # the other streams stop at their next read
                    raise

        with ThreadPoolExecutor(max_workers=min(GET_STREAMS, parts), thread_name_prefix=f"s3get-{self.name}") as pool:
            futures = [pool.submit(worker) for _ in range(min(GET_STREAMS, parts))]
        errors = [f.exception() for f in futures if f.exception() is not None]
        cancelled = [e for e in errors if _find_cancelled(e) is not None]
        if cancelled or errors:
            raise (cancelled or errors)[0]

    def _get_part(self, h: str, index: int, size: int, dst_fd: int, base: int | None, prefix: _Prefix,
                  stop: threading.Event) -> None:
        start = index * prefix.part
        end = min(size, start + prefix.part)
        response = self.client.get_object(Bucket=self.bucket, Key=self.key(h), Range=f"bytes={start}-{end - 1}")
        body = response["Body"]
        try:
            offset = start
            while offset < end and not stop.is_set():
                data = body.read(min(READ_CHUNK, end - offset))
                self.limit.take(len(data), prefix.transfer)
                if not data:
                    raise RemoteError(f"download of {self.url(h)}: the server sent {offset} bytes of {size}")
                view = memoryview(data)
                while view:
                    n = os.write(dst_fd, view) if base is None else os.pwrite(dst_fd, view, base + offset)
                    view = view[n:]
                    offset += n
                prefix.wrote(index, len(data))
        finally:
            body.close()

    def exists(self, h: str, url: str) -> int | None:
        what = f"check of {self.url(h)}"
        try:
            return self._call(what, self._head, h)
        except RemoteError as error:
            if error.kind != MISSING:
                raise
        error = self._missing(h, what)
        if error.kind != MISSING:
            raise error
        return None

    def delete(self, h: str, url: str) -> None:
        try:
            self._call(f"delete of {self.url(h)}", self.client.delete_object, Bucket=self.bucket,
                       Key=self.key(h))
        except RemoteError as error:
            if error.kind != MISSING:
                raise

    def probe(self) -> None:
        try:
            self._call(f"bucket {self.bucket}", self.client.head_bucket, Bucket=self.bucket)
        except RemoteError as error:
            if error.kind != MISSING:
                raise
            raise self._no_bucket() from None
        self._maybe_cleanup()

    def close(self) -> None:
        with self._batch_lock:
            self._closed = True
            pool, self._batch_pool = self._batch_pool, None
        if self._direct is not None:
            self._direct.close()  # first: PUTs in flight end now, and those queued fail at once
        if pool is not None:
            pool.shutdown(wait=True)
        # client.close() only drops urllib3's connection pools, and urllib3 2 closes a pool's
        # connections when the pool object is freed; a failed transfer leaves exceptions in
        # reference cycles (s3transfer's futures, botocore's frames) that still point at it,
        # so the sockets would stay open until the garbage collector runs. Close the pools
        # first (botocore keeps them in private attributes; if those change, collect).
        try:
            session = self.client._endpoint.http_session
            managers = [session._manager, *session._proxy_managers.values()]
            pools = [manager.pools[key] for manager in managers for key in manager.pools.keys()]
        except (AttributeError, KeyError, TypeError):
            pools = None
        for pool in pools or ():
            pool.close()
        self.client.close()
        if pools is None:
            gc.collect()

    # -- the reserved namespace: catalog snapshots, and the listing restore adopts from ------------

    def put_snapshot(self, rel: str, src_fd: int, size: int, transfer: Transfer | None = None) -> None:
        """One PUT carrying the SHA-256 the transfer's check expects (snapshots.py names each snapshot
        by it), or a managed transfer for a large one: either is invisible under its key until whole."""
        key = self.prefix + "/".join(reserved_parts(rel))
        what = f"upload to s3://{self.bucket}/{key}"
        digest = getattr(getattr(transfer, "source", None), "h", None)
        if size < SMALL_PUT and digest and self.request_checksum == "when_supported":
            def send() -> None:
                with _ProgressReader(os.dup(src_fd), transfer, self.limit) as body:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentLength=size,
                                           ChecksumSHA256=base64.b64encode(bytes.fromhex(digest)).decode())
            self._transfer_call(what, transfer, send)
        else:  # streamed from disk part by part, as an object's (see the module doc)
            self._transfer_call(what, transfer, self._upload, key, src_fd, transfer)
        try:
            if transfer is not None:
                transfer.confirm_source()
        except RemoteError:
            self.delete_snapshot(rel)  # the server has it already: a copy of a wrong source goes again
            raise
        stored = self._call(what, lambda: int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]))
        if stored != size:
            with contextlib.suppress(RemoteError):
                self._call(what, self.client.delete_object, Bucket=self.bucket, Key=key)
            raise RemoteError(f"{what}: the server holds {stored} bytes, expected {size}", TRANSIENT)

    def list_snapshots(self, rel_dir: str) -> list[tuple[str, int]]:
        prefix = self.prefix + "/".join(reserved_parts(rel_dir)) + "/"
        found = []
        for key, size in self._list(prefix, f"list of s3://{self.bucket}/{prefix}"):
            name = key[len(prefix):]
            if name and "/" not in name:
                found.append((name, size))
        return found

    def list_snapshot_folders(self, rel_dir: str) -> list[str]:
        prefix = self.prefix + "/".join(reserved_parts(rel_dir)) + "/"
        pages = self._call(f"list of s3://{self.bucket}/{prefix}", lambda: list(
            self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/")))
        return [p["Prefix"][len(prefix):].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])]

    def _list(self, prefix: str, what: str) -> Iterator[tuple[str, int]]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=prefix))
        while True:
            page = self._call(what, next, pages, None)
            if page is None:
                return
            for item in page.get("Contents", []):
                yield item["Key"], int(item["Size"])

    def get_snapshot(self, rel: str, dst_fd: int, transfer: Transfer | None = None) -> None:
        key = self.prefix + "/".join(reserved_parts(rel))
        what = f"download of s3://{self.bucket}/{key}"

        def download() -> None:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                done = 0
                while data := body.read(READ_CHUNK):
                    fsutil.write_all(dst_fd, data)
                    done += len(data)
                    if transfer is not None:
                        transfer.update(done)
            finally:
                body.close()
        self._transfer_call(what, transfer, download)

    def delete_snapshot(self, rel: str) -> None:
        key = self.prefix + "/".join(reserved_parts(rel))
        try:
            self._call(f"delete of s3://{self.bucket}/{key}", self.client.delete_object, Bucket=self.bucket, Key=key)
        except RemoteError as error:
            if error.kind != MISSING:
                raise

    def list_objects(self) -> Iterator[tuple[str, int]]:
        """Every object under the prefix named by a hash (the reserved folder is no object)."""
        for key, size in self._list(self.prefix, f"list of s3://{self.bucket}/{self.prefix}"):
            name = key[len(self.prefix):]
            if OBJECT_NAME.fullmatch(name):
                yield name, size

    def object_url(self, h: str) -> str:
        return self.url(h)

    # -- leftovers of killed uploads -----------------------------------------------------

    def cleanup_incomplete(self, older_than: float = INCOMPLETE_AGE) -> int:
        """Abort multipart uploads under the prefix started more than `older_than` seconds ago.

        They are what a daemon killed in the middle of a multipart upload leaves behind:
        parts that are stored (and billed) but never visible as an object. Returns how many
        were aborted.
        """
        cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=older_than)
        aborted = 0
        what = f"clean-up of incomplete uploads in bucket {self.bucket}"
        pages = self._call(what, lambda: list(self.client.get_paginator("list_multipart_uploads")
                                              .paginate(Bucket=self.bucket, Prefix=self.prefix)))
        for page in pages:
            for upload in page.get("Uploads", []):
                initiated = upload.get("Initiated")
                if initiated is not None and initiated > cutoff:
                    continue
                self._call(what, self.client.abort_multipart_upload, Bucket=self.bucket, Key=upload["Key"],
                           UploadId=upload["UploadId"])
                aborted += 1
        if aborted:
            log.info("remote %s: aborted %d incomplete multipart upload(s) older than %.0fs",
                     self.name, aborted, older_than)
        return aborted

    def _maybe_cleanup(self) -> None:
        with self._cleanup_lock:
            now = time.monotonic()
            if now < self._next_cleanup:
                return
            self._next_cleanup = now + CLEANUP_INTERVAL
        try:
            self.cleanup_incomplete()
        except RemoteError as exc:  # e.g. a key allowed to put but not to list uploads
            log.debug("remote %s: %s", self.name, exc)


def from_config(rc: RemoteConfig) -> S3Remote:
    secret = rc.get("secret_access_key")
    secret_file = rc.get("secret_access_key_file")
    if secret_file:
        try:
            with open(str(secret_file), encoding="utf-8") as f:
                secret = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or _one_line(exc)
            raise RemoteError(f"remote {rc.name}: cannot read secret_access_key_file {secret_file}: "
                              f"{reason}", REMOTE) from None
        if not secret:
            raise RemoteError(f"remote {rc.name}: secret_access_key_file {secret_file} is empty", REMOTE)
    return S3Remote(
        rc.name,
        bucket=str(rc.get("bucket")),
        prefix=str(rc.get("prefix") or ""),
        endpoint=_opt(rc.get("endpoint")),
        region=_opt(rc.get("region")),
        access_key_id=_opt(rc.get("access_key_id")),
        secret_access_key=_opt(secret),
        request_checksum=str(rc.get("request_checksum") or "when_supported"),
        rate_limit=float(rc.get("rate_limit", 0.0)),
    )


def _direct_connections(endpoint: str | None, config: Config, connect_timeout: float,
                        read_timeout: float) -> _Connections | None:
    """`_Connections` for the batch PUTs when the endpoint is plain http with no proxy on the way
    (a server on the LAN, where CPU per PUT is what limits small files); None: botocore's session."""
    parts = urlsplit(endpoint or "")
    if parts.scheme != "http" or not parts.hostname or config.proxies:
        return None
    if botocore.utils.get_environ_proxies(str(endpoint)).get("http"):
        return None
    return _Connections(str(endpoint), parts.netloc, parts.hostname, parts.port or 80, connect_timeout,
                        read_timeout)


def _opt(value: object) -> str | None:
    return None if value is None else str(value)
