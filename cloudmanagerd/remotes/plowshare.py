"""A file-locker host through plowshare (plowup, plowdown, plowprobe, plowdel).

Uploads and downloads go through the `plowshare` package (plowshare-wrapper 0.3.6), whose
class lives in `plowshare.plowshare` (`import plowshare` alone exposes nothing on Python 3).
Only `upload_to_host` and `download_from_host` are used: `upload()` and `download()` start a
multiprocessing.Manager process per call. The package runs the tools with
subprocess.check_output, throwing away stderr and the exit code and waiting without limit;
`_run_command` is its seam, and here it runs the tool through `subprocesses.run`: in its own
process group, killed as a whole when the Transfer is cancelled (the uploader times a
plowshare transfer as a whole: `reports_progress` is False) or a deadline passes, with its exit
code and the tail of its stderr kept for the error message.

- put: `plowup [auth] HOST /proc/self/fd/N:<h>`: the cache object's fd is inherited by plowup
  and its children (curl), and the copy is named by its hash on the host. The URL is plowup's
  last stdout line; anything that does not look like a URL is an error ("plowup printed no
  URL: ..."), never recorded as a copy. plowup skips empty files (exit 0, no URL): an empty
  file is a FILE error here, and goes to the other remotes.
- get: `plowdown URL -o TMPDIR --temp-rename` into a private temporary folder (under `tmp_dir`,
  else the system's), whose file is then copied into the destination fd; the folder is
  removed whatever happens. The path plowdown prints must name a file inside that folder.
- exists: `plowprobe --printf=%s%n URL`: the size the host reports; None when the link is dead
  (exit 13). When plowprobe is missing, or the host does not report sizes, whether the copy is
  there cannot be told: exists() raises RemoteError rather than answer None (which would call
  a live copy lost) or guess a size.
- delete: `plowdel URL`; a dead link (13) is already deleted, and a host whose module cannot
  delete (2), or no plowdel at all, leaves the file to the host's expiry: not an error. Most
  hosts delete through the separate "#DEL" link plowup prints, which is not recorded; plowdel
  is handed the download URL.
- probe: `plowup --modules` must list `host` (plowup installed, the module present), and the
  auth_file must be readable.

auth_file: either a plowshare.conf (INI, e.g. `1fichier/a = user:password` under
`[General]`), passed as `--plowsharerc=FILE`, or a file whose first line is
`USER:PASSWORD`, which is written as `<host>/a = ...` into a private temporary plowshare.conf
for the run. Either way the password stays out of the command line (readable by any local user
in /proc). `--plowsharerc` replaces plowshare's own ~/.config/plowshare/plowshare.conf.

Exit codes (plowshare's documented ones) become RemoteError kinds: 3 network, 5 wait timeout,
6 max tries, 7 captcha, 10 temporarily unavailable: transient; 2 no such module, 4 login
failed, 12 needs permissions, 15 bad command line: the remote is unhealthy, with what to fix;
11 password required and 14 file too big: this file cannot go to this host (FILE); 13 link
dead on a download: the copy is gone (MISSING); anything else: transient.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

from plowshare.plowshare import Plowshare

from .. import fsutil
from ..config import RemoteConfig
from .base import FILE, MISSING, REMOTE, TRANSIENT, RemoteError, Transfer
from .subprocesses import NotInstalled, Result, environment, one_line, run

OP_TIMEOUT = 120.0  # plowprobe, plowdel, plowup --modules
TRANSFER_TIMEOUT = 6 * 3600.0  # plowup or plowdown without a Transfer watching it

EXIT_MEANINGS = {
    1: "fatal error",
    2: "no such module",
    3: "network error",
    4: "login failed",
    5: "wait timeout",
    6: "max tries reached",
    7: "captcha error",
    8: "system failure",
    10: "temporarily unavailable",
    11: "password required",
    12: "needs permissions",
    13: "link dead",
    14: "file too big",
    15: "bad command line",
}
TRANSIENT_CODES = frozenset({3, 5, 6, 7, 10})
REMOTE_CODES = frozenset({2, 4, 12, 15})
FILE_CODES = frozenset({11, 14})
ERR_LINK_DEAD = 13
ERR_NOMODULE = 2

URL_RE = re.compile(r"(?:https?|ftp)://[^\s/$.?#][^\s]*", re.IGNORECASE)
_RC_LINE = re.compile(r"^\s*(?:\[[^\]]+\]\s*$|[^\s=#;]+/[^\s=]+\s*=)")


def classify(op: str, code: int) -> str:
    """The RemoteError kind for a plowshare tool's exit `code` in operation `op` (put, get, ...)."""
    if code == ERR_LINK_DEAD and op in ("get", "exists"):
        return MISSING
    if code in REMOTE_CODES:
        return REMOTE
    if code in FILE_CODES:
        return FILE
    return TRANSIENT  # TRANSIENT_CODES, and any code not named


class _Call(Plowshare):
    """One run of the package's upload_to_host/download_from_host through our runner."""

    def __init__(self, backend: PlowshareRemote, argv_options: list[str], transfer: Transfer | None,
                 timeout: float | None, pass_fds: tuple[int, ...] = (), download_dir: str | None = None) -> None:
        super().__init__([backend.host])
        self.backend = backend
        self.argv_options = argv_options
        self.transfer = transfer
        self.timeout = timeout
        self.pass_fds = pass_fds
        self.download_dir = download_dir
        self.result: Result | None = None

    def _run_command(self, command, **kwargs):
        stderr = kwargs.pop("stderr", None)
        if hasattr(stderr, "close"):
            stderr.close()  # the package opens /dev/null for every call and never closes it
        argv = [command[0], *self.argv_options, *command[1:]]
        self.result = self.backend._run(argv, transfer=self.transfer, timeout=self.timeout, pass_fds=self.pass_fds)
        if self.result.ok:
            return {"output": self.result.stdout}
        return {"error": f"{command[0]} exited with {self.result.code}"}

    def parse_output(self, hostname, output):
        tool = "plowdown" if self.download_dir else "plowup"
        try:
            last = super().parse_output(hostname, output)
        except IndexError:  # the package's split()[-1] on empty output
            said = self.result.last_stderr_line() if self.result else ""
            raise RemoteError(f"{tool} printed nothing" + (f": {one_line(said, 200)}" if said else ""),
                              TRANSIENT) from None
        line = self.result.stdout_lines()[-1] if self.result and self.result.stdout_lines() else last
        if self.download_dir is None:
            if not URL_RE.fullmatch(line):
                raise RemoteError(f"plowup printed no URL: {one_line(line, 200)}", TRANSIENT)
            return line
        # download_from_host renames this path into our folder: it must already be in it.
        folder = os.path.realpath(self.download_dir)
        path = os.path.realpath(os.path.join(folder, line))
        if os.path.dirname(path) != folder or not os.path.isfile(path):
            raise RemoteError(f"plowdown printed {one_line(line, 200)!r}, not the file it downloaded", TRANSIENT)
        return path


class PlowshareRemote:
    kind = "plowshare"
    reports_progress = False

    def __init__(self, name: str, host: str, auth_file: str | None = None, bin_dir: str | None = None,
                 tmp_dir: str | None = None, op_timeout: float = OP_TIMEOUT,
                 transfer_timeout: float = TRANSFER_TIMEOUT) -> None:
        self.name = name
        self.host = host
        self.auth_file = auth_file
        self.bin_dir = bin_dir
        self.tmp_dir = tmp_dir
        self.op_timeout = op_timeout
        self.transfer_timeout = transfer_timeout

    # -- running the tools -----------------------------------------------------------------

    def _run(self, argv: list[str], **kwargs) -> Result:
        return run(argv, env=environment(prepend_path=self.bin_dir), **kwargs)

    def _where(self) -> str:
        return f"in {self.bin_dir} or on PATH" if self.bin_dir else "on PATH"

    def _not_installed(self, tool: str) -> RemoteError:
        return RemoteError(f"{tool} is not installed ({self._where()}): install plowshare or set bin_dir", REMOTE)

    @contextlib.contextmanager
    def _auth_options(self) -> Iterator[list[str]]:
        """The options that give the tools the account in auth_file (see the module doc)."""
        if not self.auth_file:
            yield []
            return
        try:
            with open(self.auth_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise RemoteError(f"cannot read auth_file {self.auth_file}: {exc.strerror or exc}", REMOTE) from None
        if any(_RC_LINE.match(line) for line in text.splitlines()):
            yield [f"--plowsharerc={self.auth_file}"]
            return
        credentials = next((line.strip() for line in text.splitlines() if line.strip()), "")
        if ":" not in credentials:
            raise RemoteError(f"auth_file {self.auth_file} must hold USER:PASSWORD on its first line, "
                              "or be a plowshare.conf", REMOTE)
        fd, path = tempfile.mkstemp(prefix="cloudmanagerd-plowshare-", suffix=".conf", dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:  # mkstemp: mode 0600
                f.write(f'[General]\n{self.host}/a = "{credentials}"\n')
            yield [f"--plowsharerc={path}"]
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _error(self, op: str, tool: str, result: Result) -> RemoteError:
        code = result.code
        if code < 0:
            return RemoteError(f"{tool} was killed by signal {-code}", TRANSIENT)
        kind = classify(op, code)
        detail = one_line(result.last_stderr_line(), 200)
        meaning = EXIT_MEANINGS.get(code, "unknown exit code")
        if code == ERR_NOMODULE:
            message = (f"plowshare module {self.host!r} is not installed ({tool} exit 2): "
                       "fix `host:` or install the module")
        elif code == 4:
            fix = (f"check auth_file {self.auth_file}" if self.auth_file
                   else f"{self.host} wants an account: set auth_file")
            message = f"login failed on {self.host} ({tool} exit 4): {fix}"
        elif code == 12:
            message = (f"{self.host} refused: the account needs more permissions ({tool} exit 12): "
                       "check the account in auth_file")
        elif code == 15:
            message = f"{tool} rejected its command line (exit 15, plowshare too old or too new?)"
        elif code == 14:
            message = f"file too big for {self.host} ({tool} exit 14)"
        elif code == 11:
            message = f"{self.host} wants a password for this file ({tool} exit 11)"
        elif kind == MISSING:
            message = f"the copy on {self.host} is gone ({tool} exit 13, link dead)"
        else:
            message = f"{tool} failed (exit {code}, {meaning})"
        if detail and kind != MISSING:
            message += f": {detail}"
        return RemoteError(message, kind)

    # -- the Remote protocol ---------------------------------------------------------------

    def put(self, h: str, src_fd: int, size: int, transfer: Transfer | None = None) -> str:
        if transfer is not None:
            transfer.check()
        if size == 0:  # plowup skips them ("filesize is null") and exits 0 without a URL
            raise RemoteError(f"plowup does not upload empty files: this one cannot go to {self.host}", FILE)
        timeout = None if transfer is not None else self.transfer_timeout
        with self._auth_options() as options:
            call = _Call(self, options, transfer, timeout, pass_fds=(src_fd,))
            try:
                result = call.upload_to_host(f"/proc/self/fd/{src_fd}:{h}", self.host)
            except NotInstalled:
                raise self._not_installed("plowup") from None
        if "error" in result:
            assert call.result is not None
            raise self._error("put", "plowup", call.result)
        return result["url"]

    def get(self, h: str, url: str, dst_fd: int, transfer: Transfer | None = None) -> None:
        if transfer is not None:
            transfer.check()
        if not url:
            raise RemoteError(f"no URL recorded for {h} on {self.host}: the copy cannot be found", MISSING)
        timeout = None if transfer is not None else self.transfer_timeout
        folder = tempfile.mkdtemp(prefix="cloudmanagerd-plowdown-", dir=self.tmp_dir)
        try:
            with self._auth_options() as options:
                call = _Call(self, options, transfer, timeout, download_dir=folder)
                try:
                    result = call.download_from_host({"url": url, "host_name": self.host}, folder, h)
                except NotInstalled:
                    raise self._not_installed("plowdown") from None
            if "error" in result:
                assert call.result is not None
                raise self._error("get", "plowdown", call.result)
            src = os.open(result["filename"], fsutil.O_READ_FILE)
            try:
                fsutil.copy_fd(src, dst_fd, transfer.update if transfer is not None else None)
            except OSError as exc:
                raise RemoteError(f"cannot copy what plowdown downloaded: {exc.strerror or exc}", TRANSIENT) from None
            finally:
                os.close(src)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def exists(self, h: str, url: str) -> int | None:
        if not url:
            return None  # never uploaded: a copy only exists through the URL plowup printed
        with self._auth_options() as options:
            try:
                result = self._run(["plowprobe", *options, "--printf=%s%n", url], timeout=self.op_timeout)
            except NotInstalled:
                raise RemoteError(f"plowprobe is not installed ({self._where()}): copies on {self.host} "
                                  "cannot be checked", REMOTE) from None
        if not result.ok:
            error = self._error("exists", "plowprobe", result)
            if error.kind == MISSING:
                return None
            raise error
        lines = result.stdout_lines()
        if not lines or not lines[-1].isdigit():
            raise RemoteError(f"{self.host} does not report file sizes: whether {url} holds the whole copy "
                              "cannot be told", TRANSIENT)
        return int(lines[-1])

    def delete(self, h: str, url: str) -> None:
        if not url:
            return
        with self._auth_options() as options:
            try:
                result = self._run(["plowdel", *options, url], timeout=self.op_timeout)
            except NotInstalled:
                return  # no plowdel: the host's expiry deletes it
        if result.ok or result.code in (ERR_LINK_DEAD, ERR_NOMODULE):
            return  # gone already, or the module cannot delete: forget it
        raise self._error("delete", "plowdel", result)

    def probe(self) -> None:
        with self._auth_options():
            pass  # the auth_file is readable and well-formed
        try:
            result = self._run(["plowup", "--modules"], timeout=self.op_timeout)
        except NotInstalled:
            raise self._not_installed("plowup") from None
        if not result.ok:
            raise self._error("probe", "plowup", result)
        modules = {line.split()[0] for line in result.stdout_lines() if line.split()}
        if self.host not in modules:
            raise RemoteError(f"plowshare module {self.host!r} is not installed (plowup --modules does not "
                              "list it): fix `host:` or install the module", REMOTE)

    def close(self) -> None:
        pass


def from_config(rc: RemoteConfig) -> PlowshareRemote:
    auth_file = rc.get("auth_file")
    bin_dir = rc.get("bin_dir")
    return PlowshareRemote(rc.name, str(rc.get("host")), str(auth_file) if auth_file else None,
                           str(bin_dir) if bin_dir else None)


__all__ = ["PlowshareRemote", "classify", "from_config"]
