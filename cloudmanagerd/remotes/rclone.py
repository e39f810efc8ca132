"""A remote through the `rclone` binary, for any of its providers: copies at <remote>/<h>.

Each operation is one rclone command, run with `--retries 1 --low-level-retries 3` so that
the daemon's own retry loop (with its backoff and `max_attempts`) governs, and with JSON
logs on stderr, which give both the transfer's progress and its last error.

- put: `rclone copyto /proc/self/fd/N <remote>/<h> -L --no-check-dest`: the cache object's
  fd is inherited by rclone, which reads it through its own /proc/self/fd (`-L` follows that
  link; without it rclone takes the path for a folder). rclone checks the size and, where
  both ends share one, the hash of what it sent (MD5 for S3) before it exits 0: that is the
  verification of the copy. Progress: the `bytes` of the stats line rclone logs every second.
  rclone 1.60 writes some providers' objects (local, sftp...) in place, so a put that had
  to be killed deletes what it may have left under the final name.
- put_many (the uploader's batches of small objects): one `rclone copy STAGE <remote>
  --files-from-raw LIST -L --no-check-dest --transfers 8` for the whole batch, where STAGE is a
  private temp folder of symlinks `<h> -> /proc/self/fd/N` to the inherited cache objects (rclone
  reads the very files the uploader opened and checks, as put does, and names each copy <h>).
  rclone's JSON log says which objects were copied ("Copied ...", each checked as put's are) and
  which failed (an error line naming the object); its stats give each object's bytes, so every
  object is begun (`Transfer.begin`) when rclone starts it and watched for stalls on its own. A
  cancelled object (stalled, or the daemon stopping) stops the whole command: the objects already
  copied keep their URLs, the others are Cancelled and what they may have left is deleted.
- get: `rclone cat --error-on-no-transfer <remote>/<h>` straight into the destination fd
  (on S3 a missing object is an empty "folder" to cat, which only that flag turns into an
  error: exit 9).
- The URL recorded for a copy is `<remote>/<h>` without connection-string options (they may
  hold keys); get, exists and delete find the object from the configured remote and the hash,
  as the directory backend does.
- exists: `rclone lsjson --stat`; delete: `rclone deletefile`; probe: `rclone mkdir <remote>`
  (checks the config, the credentials and the bucket or folder without listing it; creates
  a missing one, as a put would).

Exit codes (rclone's documented ones): 5 temporary: retried; 7 fatal and 8 transfer limit:
the remote is unhealthy, with the reason; 3 directory not found and 4 file not found: the
object is missing on get/exists/delete, a bad remote path on put and probe; any other code
is transient, reported with rclone's last error line, unless that line names a problem only
the operator can fix (an unknown remote name, bad credentials, no such bucket, permission
denied, read-only or full filesystem), which marks the remote unhealthy.

AWS_CA_BUNDLE: Debian's rclone 1.60 fails every S3 request with LoadCustomCABundleError when
that variable is set, even towards a plain-http endpoint. It is removed from rclone's
environment when the remote's S3 endpoint (in the connection string, the RCLONE_* environment
or the remote's section of the rclone config file) is http://, where no CA is involved;
it is kept for https endpoints and for remotes whose endpoint cannot be read (an encrypted
config, or a remote wrapping another one).
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence

from ..config import RemoteConfig
from .base import MISSING, OBJECT_NAME, REMOTE, TRANSIENT, Cancelled, RemoteError, Transfer, reserved_parts
from .subprocesses import NotInstalled, Result, Timeout, environment, one_line, run

BASE_FLAGS = ("--retries", "1", "--low-level-retries", "3", "--use-json-log", "--ask-password=false")
PROGRESS_FLAGS = ("--stats", "1s", "--stats-log-level", "NOTICE")
OP_TIMEOUT = 120.0  # exists, delete, probe
TRANSFER_TIMEOUT = 6 * 3600.0  # a put or get without a Transfer watching it
CLEANUP_TIMEOUT = 5.0
BATCH_TRANSFERS = 8  # small objects in flight at once in one batch (rclone's default is 4)

EXIT_MEANINGS = {
    1: "error",
    2: "syntax or usage error",
    3: "directory not found",
    4: "file not found",
    5: "temporary error",
    6: "less serious error",
    7: "fatal error",
    8: "transfer limit reached",
    9: "no files transferred",
    10: "duration limit reached",
}

# Last error lines that no retry can fix until someone changes the remote or its config.
REMOTE_PATTERNS = re.compile(
    r"didn't find section in config file|didn't find backend called|couldn't find type field"
    r"|InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|NoSuchBucket|InvalidBucketName"
    r"|permission denied|read-only file system|no space left on device|disk quota exceeded"
    r"|not a directory|couldn't decrypt config|unable to decrypt configuration",
    re.IGNORECASE,
)
_LOG_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?:[A-Z]+\s*: )?")
_HTTP_ENDPOINT = re.compile(r"""(?:^|,)endpoint\s*=\s*['"]?http://""", re.IGNORECASE)


def join(remote: str, name: str) -> str:
    """`name` inside the rclone path `remote` ("gdrive:" + h is "gdrive:h", not "gdrive:/h")."""
    return remote + name if remote.endswith((":", "/")) else f"{remote}/{name}"


def split_remote(remote: str) -> tuple[str, str]:
    """("name,options" or ":backend,options", path) of an rclone path; quotes may hide colons."""
    start = 1 if remote.startswith(":") else 0
    quote = None
    for index in range(start, len(remote)):
        char = remote[index]
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == ":":
            return remote[:index], remote[index + 1:]
    return remote, ""


def remote_name(remote: str) -> str:
    """The config section an rclone path refers to ("" for an inline ":backend," remote)."""
    if remote.startswith(":"):
        return ""
    return split_remote(remote)[0].split(",", 1)[0]


def public_remote(remote: str) -> str:
    """`remote` without its connection-string options (which may hold keys): for URLs and logs."""
    head, path = split_remote(remote)
    return head.split(",", 1)[0] + ":" + path


def error_detail(result: Result) -> str:
    """rclone's own one-line reason: the final "Failed to ..." line, else the last error logged."""
    last_error = ""
    continues = False  # whether the last plain line may go on in the next ones
    for line in result.stderr_tail:
        text = line.strip()
        if not text:
            continue
        if text.startswith("{"):
            continues = False
            with contextlib.suppress(ValueError, AttributeError):
                entry = json.loads(text)
                if entry.get("level") in ("error", "critical", "fatal"):
                    last_error = str(entry.get("msg", ""))
            continue
        if continues and not _LOG_PREFIX.match(text):
            last_error += " " + text  # "Failed to copyto: AccessDenied: ...\n\tstatus code: 403"
            continue
        last_error = _LOG_PREFIX.sub("", text)
        continues = True
    return one_line(last_error or result.last_stderr_line() or "no message")


def classify(op: str, code: int, detail: str) -> tuple[str, str]:
    """(kind, what it means) for rclone's exit `code` of operation `op` (put, get, exists, delete, probe)."""
    meaning = EXIT_MEANINGS.get(code, "unknown exit code")
    if code == 9 and op == "get":
        return MISSING, "no such object"  # cat --error-on-no-transfer: S3 has no folders to miss
    if code in (3, 4):
        if op in ("get", "exists", "delete"):
            return MISSING, meaning
        if op in ("put", "probe") and code == 3:
            return REMOTE, "the remote path does not exist"
        return TRANSIENT, meaning
    if code == 5:
        return TRANSIENT, meaning
    if code == 7:
        return REMOTE, "fatal error, one that retrying will not fix"
    if code == 8:
        return REMOTE, "transfer limit reached (--max-transfer or the provider's quota)"
    if REMOTE_PATTERNS.search(detail):
        return REMOTE, meaning
    return TRANSIENT, meaning


class RcloneRemote:
    kind = "rclone"
    reports_progress = True

    def __init__(self, name: str, remote: str, config: str | None = None, binary: str = "rclone",
                 op_timeout: float = OP_TIMEOUT, transfer_timeout: float = TRANSFER_TIMEOUT,
                 rate_limit: float = 0.0) -> None:
        self.name = name
        self.remote = remote
        self.config = config
        self.rate_limit = rate_limit
        self.binary = binary
        self.op_timeout = op_timeout
        self.transfer_timeout = transfer_timeout

    # -- running rclone ------------------------------------------------------------------

    def _argv(self, *args: str) -> list[str]:
        argv = [self.binary, *BASE_FLAGS]
        if self.config:
            argv += ["--config", self.config]
        if self.rate_limit > 0:
            # rclone's own limiter, in bytes ("B": a bare number would be KiB); it holds per rclone
            # process, so concurrent transfers to this remote each get the whole rate (README)
            argv += ["--bwlimit", f"{max(1, int(self.rate_limit))}B"]
        return argv + list(args)

    def _env(self) -> dict[str, str]:
        drop = ("AWS_CA_BUNDLE",) if self._plain_http_endpoint() else ()
        return environment(drop=drop)

    def _config_path(self) -> str:
        if self.config:
            return self.config
        if os.environ.get("RCLONE_CONFIG"):
            return os.environ["RCLONE_CONFIG"]
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return os.path.join(base, "rclone", "rclone.conf")

    def _plain_http_endpoint(self) -> bool:
        """Whether this remote talks S3 to an http:// endpoint (see AWS_CA_BUNDLE above)."""
        head = split_remote(self.remote)[0]
        if _HTTP_ENDPOINT.search(head):
            return True
        section = remote_name(self.remote)
        if not section:
            return os.environ.get("RCLONE_S3_ENDPOINT", "").startswith("http://")
        env_key = f"RCLONE_CONFIG_{re.sub(r'[^A-Za-z0-9]', '_', section).upper()}_ENDPOINT"
        if env_key in os.environ:
            return os.environ[env_key].startswith("http://")
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            with open(self._config_path(), encoding="utf-8", errors="replace") as f:
                parser.read_file(f)
            endpoint = parser.get(section, "endpoint", fallback="")
        except (OSError, configparser.Error):
            return False
        return endpoint.strip().strip("'\"").startswith("http://")

    def _run(self, *args: str, transfer: Transfer | None = None, timeout: float | None = None,
             **kwargs) -> Result:
        try:
            return run(self._argv(*args), transfer=transfer, timeout=timeout, env=self._env(),
                       what=f"rclone {args[0]}", **kwargs)
        except NotInstalled as exc:
            raise RemoteError(f"{exc}: install rclone (apt-get install rclone)", REMOTE) from None

    def _error(self, op: str, result: Result) -> RemoteError:
        detail = self._scrub(error_detail(result))
        if result.code < 0:
            return RemoteError(f"rclone {op} was killed by signal {-result.code}", TRANSIENT)
        if "didn't find section in config file" in detail:
            return RemoteError(
                f"rclone has no remote named {remote_name(self.remote)!r} in {self._config_path()}: "
                "add it with `rclone config` or fix this remote's `remote:` option", REMOTE)
        kind, meaning = classify(op, result.code, detail)
        if kind == MISSING:
            return RemoteError(f"rclone {op}: the object is not in {public_remote(self.remote)} ({meaning})",
                               MISSING)
        return RemoteError(f"rclone {op} failed (exit {result.code}, {meaning}): {detail}", kind)

    def _scrub(self, text: str) -> str:
        """rclone echoes the remote it was given: keep connection-string options (keys) out of messages."""
        head = split_remote(self.remote)[0]
        return text.replace(self.remote, public_remote(self.remote)).replace(head, head.split(",", 1)[0])

    def _object(self, h: str) -> str:
        return join(self.remote, h)

    # -- the Remote protocol ---------------------------------------------------------------

    def put(self, h: str, src_fd: int, size: int, transfer: Transfer | None = None) -> str:
        if transfer is not None:
            transfer.check()
        target = self._object(h)
        try:
            result = self._run("copyto", f"/proc/self/fd/{src_fd}", target, "-L", "--no-check-dest",
                               *PROGRESS_FLAGS, transfer=transfer,
                               timeout=None if transfer is not None else self.transfer_timeout,
                               pass_fds=[src_fd], on_stderr_line=_progress(transfer))
        except (Cancelled, Timeout):
            self._discard(target)
            raise
        if not result.ok:
            if result.code < 0:
                self._discard(target)
            raise self._error("put", result)
        return join(public_remote(self.remote), h)

    def put_many(self, items: Sequence[tuple[str, int, int, Transfer | None]]) -> list[str | RemoteError]:
        """Many small objects by one `rclone copy` (see the module doc); in the items' order, each
        one's URL once rclone has copied and checked it, or the error of that object alone."""
        results: list[str | RemoteError | None] = [None] * len(items)
        batch = _Batch(self.op_timeout)
        for i, (h, fd, size, transfer) in enumerate(items):
            if transfer is not None and transfer.cancelled:
                results[i] = Cancelled(transfer.reason or "cancelled")
            elif h not in batch.index:
                batch.add(h, i, fd, size, transfer)
        if not batch.index:
            return [r if r is not None else RemoteError("not sent", TRANSIENT) for r in results]
        stage, listing = self._stage(batch)
        stopped: RemoteError | None = None
        try:
            result = self._run("copy", stage, self.remote, "--files-from-raw", listing, "-L", "--no-check-dest",
                               "--no-traverse", "-v", "--transfers", str(BATCH_TRANSFERS), "--checkers",
                               str(BATCH_TRANSFERS), *PROGRESS_FLAGS, transfer=batch,
                               timeout=self.transfer_timeout, pass_fds=sorted(set(batch.fds.values())),
                               on_stderr_line=batch.on_line)
        except (Cancelled, Timeout) as exc:
            stopped, result = exc, None
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        left = [h for h in batch.index if h not in batch.copied]
        if stopped is not None and left:
            self._discard_many(left)  # rclone 1.60 writes local (and sftp...) objects in place
        if result is not None and not result.ok and not batch.copied and not batch.errors:
            raise self._error("put", result)  # the whole command failed: no object was even tried
        for h, i in batch.index.items():
            if h in batch.copied:
                results[i] = join(public_remote(self.remote), h)
            elif stopped is not None:
                results[i] = stopped if isinstance(stopped, Timeout) else Cancelled(str(stopped))
            elif h in batch.errors:
                code = result.code if result is not None and result.code > 0 else 1
                detail = self._scrub(one_line(batch.errors[h]))
                kind, meaning = classify("put", code, detail)
                results[i] = RemoteError(f"rclone copy failed (exit {code}, {meaning}): {detail}",
                                         TRANSIENT if kind == MISSING else kind)
            else:
                results[i] = self._error("put", result) if result is not None and not result.ok else RemoteError(
                    "rclone copy exited without copying it (its source could not be read)", TRANSIENT)
        return [r if r is not None else RemoteError("not sent", TRANSIENT) for r in results]

    @staticmethod
    def _stage(batch: _Batch) -> tuple[str, str]:
        """A private temp folder of links <h> -> /proc/self/fd/N, and the list of their names in it."""
        try:
            stage = tempfile.mkdtemp(prefix="cloudmanagerd-rclone-")
        except OSError as exc:
            raise RemoteError(f"rclone batch: cannot make a temp folder in {tempfile.gettempdir()}: "
                              f"{exc.strerror or exc} (free space there, or set TMPDIR)", TRANSIENT) from None
        try:
            for h, fd in batch.fds.items():
                os.symlink(f"/proc/self/fd/{fd}", os.path.join(stage, h))
            listing = os.path.join(stage, ".files")  # not in itself, so never copied
            with open(listing, "w", encoding="ascii") as f:
                f.write("".join(h + "\n" for h in batch.index))
        except OSError as exc:
            shutil.rmtree(stage, ignore_errors=True)
            raise RemoteError(f"rclone batch: cannot write its list in {stage}: {exc.strerror or exc} "
                              "(free space there, or set TMPDIR)", TRANSIENT) from None
        return stage, listing

    def _discard_many(self, hashes: Sequence[str]) -> None:
        """Delete what a killed batch may have left under the final names (best effort, briefly)."""
        fd, listing = tempfile.mkstemp(prefix="cloudmanagerd-rclone-", suffix=".files")
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write("".join(h + "\n" for h in hashes))
            with contextlib.suppress(RemoteError):
                run(self._argv("delete", self.remote, "--files-from-raw", listing), timeout=CLEANUP_TIMEOUT,
                    env=self._env(), what="rclone delete")
        finally:
            with contextlib.suppress(OSError):
                os.unlink(listing)

    def _discard(self, target: str) -> None:
        """Delete what a killed put may have left under the final name (best effort, briefly)."""
        with contextlib.suppress(RemoteError):
            run(self._argv("deletefile", target), timeout=CLEANUP_TIMEOUT, env=self._env(),
                what="rclone deletefile")

    def get(self, h: str, url: str, dst_fd: int, transfer: Transfer | None = None) -> None:
        if transfer is not None:
            transfer.check()
        result = self._run("cat", "--error-on-no-transfer", self._object(h), *PROGRESS_FLAGS,
                           transfer=transfer, timeout=None if transfer is not None else self.transfer_timeout,
                           stdout=dst_fd, on_stderr_line=_progress(transfer))
        if not result.ok:
            raise self._error("get", result)

    def exists(self, h: str, url: str) -> int | None:
        result = self._run("lsjson", "--stat", "--no-mimetype", "--no-modtime", self._object(h),
                           timeout=self.op_timeout)
        if not result.ok:
            error = self._error("exists", result)
            if error.kind == MISSING:
                return None
            raise error
        entry = _json(result)
        if not isinstance(entry, dict) or entry.get("IsDir"):
            return None
        return int(entry.get("Size", -1))

    def delete(self, h: str, url: str) -> None:
        result = self._run("deletefile", self._object(h), timeout=self.op_timeout)
        if result.ok:
            return
        detail = error_detail(result)
        if "doesn't exist" in detail or "object not found" in detail:
            return
        error = self._error("delete", result)
        if error.kind != MISSING:
            raise error

    def probe(self) -> None:
        result = self._run("mkdir", self.remote, timeout=self.op_timeout)
        if not result.ok:
            error = self._error("probe", result)
            raise RemoteError(str(error), error.kind if error.kind != MISSING else REMOTE)

    # -- the reserved namespace: catalog snapshots, and the listing restore adopts from ------------

    def put_snapshot(self, rel: str, src_fd: int, size: int, transfer: Transfer | None = None) -> None:
        """As `put`; what a killed rclone leaves is caught by the SHA-256 in the snapshot's name."""
        target = join(self.remote, "/".join(reserved_parts(rel)))
        result = self._run("copyto", f"/proc/self/fd/{src_fd}", target, "-L", *PROGRESS_FLAGS, transfer=transfer,
                           timeout=None if transfer is not None else self.transfer_timeout,
                           pass_fds=[src_fd], on_stderr_line=_progress(transfer))
        if not result.ok:
            raise self._error("put", result)
        try:
            if transfer is not None:
                transfer.confirm_source()
        except RemoteError:
            self._discard(target)  # rclone cannot hold a copy back: a wrong source is deleted again
            raise

    def list_snapshot_folders(self, rel_dir: str) -> list[str]:
        return [e["Name"] for e in self._lsjson(join(self.remote, "/".join(reserved_parts(rel_dir))), "--dirs-only")]

    def _lsjson(self, path: str, only: str = "--files-only") -> list[dict]:
        result = self._run("lsjson", only, "--no-mimetype", "--no-modtime", path, timeout=self.op_timeout)
        if not result.ok:
            error = self._error("list", result)
            if error.kind == MISSING or "directory not found" in error_detail(result):
                return []
            raise error
        entries = _json(result)
        return [e for e in (entries if isinstance(entries, list) else []) if isinstance(e, dict) and isinstance(e.get("Name"), str)]

    def list_snapshots(self, rel_dir: str) -> list[tuple[str, int]]:
        return [(e["Name"], int(e.get("Size", -1)))
                for e in self._lsjson(join(self.remote, "/".join(reserved_parts(rel_dir))))]

    def get_snapshot(self, rel: str, dst_fd: int, transfer: Transfer | None = None) -> None:
        result = self._run("cat", "--error-on-no-transfer", join(self.remote, "/".join(reserved_parts(rel))),
                           timeout=self.transfer_timeout, stdout=dst_fd)
        if not result.ok:
            raise self._error("get", result)

    def delete_snapshot(self, rel: str) -> None:
        result = self._run("deletefile", join(self.remote, "/".join(reserved_parts(rel))), timeout=self.op_timeout)
        if not result.ok and self._error("delete", result).kind != MISSING:
            detail = error_detail(result)
            if "doesn't exist" not in detail and "object not found" not in detail:
                raise self._error("delete", result)

    def list_objects(self) -> list[tuple[str, int]]:
        return [(e["Name"], int(e.get("Size", -1))) for e in self._lsjson(self.remote)
                if OBJECT_NAME.fullmatch(e["Name"])]

    def object_url(self, h: str) -> str:
        return join(public_remote(self.remote), h)

    def close(self) -> None:
        pass


def _json(result: Result) -> object:
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise RemoteError("rclone lsjson printed no JSON: "
                          + one_line(result.stdout.decode("utf-8", "replace")), TRANSIENT) from None


class _Batch(Transfer):
    """What `run()` watches for a batch: it is cancelled when any object in flight is. Its stderr
    handler feeds each object's Transfer from rclone's JSON log."""

    def __init__(self, idle_limit: float) -> None:
        super().__init__(0)
        self.index: dict[str, int] = {}  # hash -> position in the batch
        self.fds: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.transfers: dict[str, Transfer] = {}
        self.copied: set[str] = set()
        self.errors: dict[str, str] = {}
        self.idle_limit = idle_limit  # no object started or moved this long: rclone is stuck
        self.last_event = time.monotonic()

    def add(self, h: str, i: int, fd: int, size: int, transfer: Transfer | None) -> None:
        self.index[h], self.fds[h], self.sizes[h] = i, fd, size
        if transfer is not None:
            self.transfers[h] = transfer

    @property
    def cancelled(self) -> bool:  # type: ignore[override]
        return self._event.is_set() or any(
            t.cancelled for h, t in self.transfers.items() if h not in self.copied)

    @property
    def reason(self) -> str | None:  # type: ignore[override]
        """Why the batch stops: that of the first object cancelled, else its own."""
        for h, t in self.transfers.items():
            if t.cancelled and h not in self.copied:
                return t.reason or "cancelled"
        return self._own_reason

    @reason.setter
    def reason(self, value: str | None) -> None:
        self._own_reason = value

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled(self.reason or "cancelled")

    def on_line(self, line: str) -> None:
        if not line.startswith("{"):
            return
        try:
            entry = json.loads(line)
        except ValueError:
            return
        if not isinstance(entry, dict):
            return
        h = entry.get("object")
        if h in self.index:
            if entry.get("level") in ("error", "critical", "fatal"):
                self.errors[h] = str(entry.get("msg", ""))
            elif str(entry.get("msg", "")).startswith("Copied"):
                self._moved(h, self.sizes[h])
                self.copied.add(h)
                transfer = self.transfers.get(h)
                if transfer is not None:
                    # copied: it only waits for its batch now, which is no stall of its own
                    transfer.pending = True
        stats = entry.get("stats")
        if isinstance(stats, dict):
            for item in stats.get("transferring") or ():
                with contextlib.suppress(TypeError, ValueError, AttributeError):
                    name = item.get("name")
                    if name in self.index and name not in self.copied:
                        self._moved(name, int(item.get("bytes", 0)))
            if time.monotonic() - self.last_event > self.idle_limit:
                self.cancel(f"stalled: rclone copy started or moved no object for {self.idle_limit:.0f}s")
        self.check()

    def _moved(self, h: str, done: int) -> None:
        transfer = self.transfers.get(h)
        if transfer is None:
            self.last_event = time.monotonic()
            return
        if transfer.pending:
            transfer.begin()  # rclone reached this object: its own stall clock starts
            self.last_event = time.monotonic()
        if done != transfer.done:
            self.last_event = time.monotonic()
        transfer.update(done)


def _progress(transfer: Transfer | None):
    """A stderr-line handler feeding rclone's stats `bytes` to the Transfer (None without one)."""
    if transfer is None:
        return None

    def on_line(line: str) -> None:
        if '"stats"' not in line:
            return
        try:
            stats = json.loads(line).get("stats")
            done = int(stats["bytes"])
        except (ValueError, TypeError, KeyError, AttributeError):
            return
        transfer.update(done)

    return on_line


def from_config(rc: RemoteConfig) -> RcloneRemote:
    config = rc.get("config")
    return RcloneRemote(rc.name, str(rc.get("remote")), str(config) if config else None,
                        rate_limit=float(rc.get("rate_limit", 0.0)))


__all__ = ["RcloneRemote", "classify", "error_detail", "from_config", "join"]
