"""cloudmanagerctl: ask the running daemon over its control socket."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import secrets
import signal
import socket
import stat
import sys
import textwrap
import time
from typing import Any, TextIO

from .names import show
from .protocol import (EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, HEARTBEAT, LineReader, ProtocolError,
                       decode, encode)
from . import __version__
from .status import human_duration, human_size

DEFAULT_CONFIG = "/etc/cloudmanagerd/config.yaml"
DEFAULT_SOCKET = "/run/cloudmanagerd/control.sock"


class Failed(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED, errno_name: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.errno_name = errno_name  # the daemon's errno, when writing to our descriptor failed


def socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    config = args.config or os.environ.get("CLOUDMANAGERD_CONFIG") or DEFAULT_CONFIG
    if not os.path.exists(config):
        if args.config:
            raise Failed(f"config {config} does not exist", EXIT_FAILED)
        return DEFAULT_SOCKET
    if not args.config and not os.access(config, os.R_OK):
        # the default config is readable by the service's group only; anyone else may still
        # try the default socket (and learns from its permissions whether they may use it)
        return DEFAULT_SOCKET
    from .config import ConfigError, load_config
    try:
        return load_config(config).control.socket
    except ConfigError:
        # a config being edited must not cut the operator off from the running daemon
        return lenient_socket(config)


def lenient_socket(config: str) -> str:
    import yaml
    try:
        with open(config, "rb") as f:
            data = yaml.safe_load(f)
        path = data["control"]["socket"]
    except (OSError, yaml.YAMLError) as exc:
        raise Failed(f"{config}: cannot read control.socket from it ({str(exc).splitlines()[0]}); "
                     "give the socket with -s") from None
    except (KeyError, TypeError):
        return os.path.join(os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0], "control.sock") \
            if os.environ.get("RUNTIME_DIRECTORY") else DEFAULT_SOCKET
    return os.path.join(os.path.dirname(os.path.abspath(config)), str(path))


DEFAULT_TIMEOUT = 10.0
# Requests that may take long: they wait as long as the daemon keeps saying it is working (a
# progress line at least every protocol.HEARTBEAT seconds); the others must finish in --timeout.
LONG = frozenset({"get", "verify", "backup", "pin", "rm", "export", "import"})


class Client:
    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)  # a stopped daemon's full backlog makes connect() wait
        try:
            self.sock.connect(path)
        except TimeoutError:
            self.sock.close()
            raise self._timed_out() from None
        except OSError as exc:
            self.sock.close()
            raise Failed(f"cannot reach cloudmanagerd at {path}: {exc.strerror} (is it running?)",
                         EXIT_UNREACHABLE) from None
        self.reader = LineReader(self.sock, limit=1 << 30)

    def _timed_out(self) -> Failed:
        return Failed(f"cloudmanagerd at {self.path} did not answer within {self.timeout:g}s (is it stopped or "
                      "overloaded? --timeout SECONDS waits longer)", EXIT_UNREACHABLE)

    def call(self, request: dict[str, Any], fds: list[int] | None = None, progress=None) -> Any:
        """The result of one request; Failed with the daemon's error, or exit 3 when it does not answer
        within the timeout (for a long request: when it stops sending progress for that long)."""
        data = encode(request)
        long = request.get("cmd") in LONG
        deadline = time.monotonic() + self.timeout
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.sendall(data)
            while True:
                line = self.reader.next_line()
                while line is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._timed_out()
                    self.sock.settimeout(remaining)
                    if not self.reader.fill():
                        raise Failed("cloudmanagerd closed the connection without answering", EXIT_UNREACHABLE)
                    line = self.reader.next_line()
                reply = decode(line)
                if "progress" in reply:
                    if long:  # heartbeats come every HEARTBEAT: a timeout shorter than a few would race them
                        deadline = time.monotonic() + max(self.timeout, 4 * HEARTBEAT)
                    if progress and isinstance(reply["progress"], dict):
                        progress(reply["progress"])
                    continue
                if not reply.get("ok"):
                    raise Failed(str(reply.get("error", "the daemon said no")), errno_name=reply.get("errno"))
                return reply.get("result")
        except TimeoutError:
            raise self._timed_out() from None
        except (ProtocolError, OSError) as exc:
            raise Failed(f"lost the connection to cloudmanagerd: {exc}", EXIT_UNREACHABLE) from None

    def close(self) -> None:
        self.sock.close()


AT_FDCWD, AT_SYMLINK_FOLLOW = -100, 0x400


def _link_fd(fd: int, path: str) -> None:
    """Give an O_TMPFILE file a name: linkat() through /proc with AT_SYMLINK_FOLLOW, which Python's
    os.link does not pass (before 3.13 it links the /proc symlink itself: EXDEV)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), AT_FDCWD, os.fsencode(path), AT_SYMLINK_FOLLOW):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


class Output:
    """Where `get -o` and `backup -o` write, so that FILE changes only once the daemon has the bytes.

    A regular FILE (or a new one) is written as an anonymous temp file in FILE's folder (O_TMPFILE:
    nothing is left behind if ctl is killed), then linked and renamed over FILE, keeping its mode;
    on failure the temp goes and FILE is untouched. A symlink is followed (the link stays a link).
    Anything else (/dev/null, /dev/full, a FIFO) is written directly, as there is nothing to replace.
    """

    def __init__(self, path: str, mode: int) -> None:
        self.path = path
        self.target = os.path.realpath(path)
        self.folder = os.path.dirname(self.target)
        self.tmp: str | None = None
        self.direct = False
        try:
            st: os.stat_result | None = os.stat(self.target)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise Failed(f"cannot write to {path}: {exc.strerror}") from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise Failed(f"cannot write to {path}: it is a folder; give a file name")
        if st is not None and not stat.S_ISREG(st.st_mode):
            self.direct = True
            self.fd = self._open(self.target, os.O_WRONLY | os.O_CLOEXEC, 0)
            return
        if st is not None and not os.access(self.target, os.W_OK):
            raise Failed(f"cannot write to {path}: {os.strerror(errno.EACCES)}")
        if not os.path.isdir(self.folder):
            raise Failed(f"cannot write to {path}: folder {self.folder} does not exist")
        keep = stat.S_IMODE(st.st_mode) if st is not None else None
        try:
            self.fd = os.open(self.folder, os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, mode if keep is None else 0o600)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise Failed(f"cannot write to {path}: no permission to create a file in {self.folder} (FILE is "
                             "replaced only once it is complete, from a temp file beside it; write elsewhere and "
                             "copy it)") from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise Failed(f"cannot write to {path}: {exc.strerror}") from None
            self.tmp = self._hidden_name()  # no O_TMPFILE on this filesystem: a hidden temp name
            self.fd = self._open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 mode if keep is None else 0o600)
        if keep is not None:
            os.fchmod(self.fd, keep)
            if os.geteuid() == 0:
                with contextlib.suppress(OSError):
                    os.fchown(self.fd, st.st_uid, st.st_gid)

    def _open(self, path: str, flags: int, mode: int) -> int:
        try:
            return os.open(path, flags, mode)
        except OSError as exc:
            raise Failed(f"cannot write to {self.path}: {exc.strerror}") from None

    def _hidden_name(self) -> str:
        return os.path.join(self.folder, f".{os.path.basename(self.target)}.{secrets.token_hex(6)}.tmp")

    def commit(self) -> None:
        """The daemon has written everything: make it FILE."""
        try:
            if self.direct:
                return
            os.fsync(self.fd)
            if self.tmp is None:
                # a link cannot replace a file: give the anonymous file a hidden name, then rename it
                tmp = self._hidden_name()
                _link_fd(self.fd, tmp)
                self.tmp = tmp
            os.rename(self.tmp, self.target)
            self.tmp = None
            with contextlib.suppress(OSError):
                dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise Failed(f"cannot write to {self.path}: {exc.strerror}") from None
        finally:
            self.close()

    def close(self) -> None:
        """Done or failed: a temp that was not renamed goes, FILE is untouched."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


# -- human output ---------------------------------------------------------------------------

def ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


def print_json(value: Any, file: TextIO | None = None) -> None:
    """Every --json output has this one style (`file`: stderr when stdout carries a file's bytes)."""
    print(json.dumps(value, indent=2), file=file or sys.stdout)


class Progress:
    """Progress of a long request on stderr, drawn only when stderr is a terminal, with rate and ETA,
    and cleared before anything else is printed (a context manager), so that it never runs into
    the result."""

    def __init__(self, what: str, unit: str = "bytes") -> None:
        self.what = what
        self.unit = unit
        self.on = sys.stderr.isatty()
        self.started = time.monotonic()
        self.drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()

    def __call__(self, p: dict[str, int]) -> None:
        done, total = p.get("done"), p.get("total")
        if not self.on or not isinstance(done, int) or not isinstance(total, int) or total <= 0:
            return
        size = human_size if self.unit == "bytes" else (lambda n: f"{n:.0f} {self.unit}")
        line = f"{self.what}: {size(done)} of {size(total)} ({min(done / total, 1):.0%})"
        elapsed = time.monotonic() - self.started
        if elapsed >= 1 and done:
            rate = done / elapsed
            line += f", {size(rate)}/s, {human_duration((total - done) / rate)} left"
        sys.stderr.write("\r\033[K" + line)
        sys.stderr.flush()
        self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.drawn = False


def print_status(s: dict[str, Any]) -> None:
    cache, up, safety = s["cache"], s["uploads"], s["safety"]
    print(f"cloudmanagerd {s['version']} on {s['node']}: {s['state']} (pid {s['pid']}, "
          f"up {human_duration(s['uptime'])})")
    findings = s.get("findings") or [{"level": "problem", "line": p} for p in s["problems"]]
    for f in sorted(findings, key=lambda f: f["level"] != "critical"):  # the worst first, as --check
        print(f"  {f['level']}: {f['line']}")
    print(f"inbox    {s['inbox']['path']}: {s['inbox']['pending']} pending, {s['inbox']['rejected']} rejected")
    print(f"cache    {cache['path']}: {human_size(cache['used'])} of {human_size(cache['capacity'])} "
          f"({cache['usage_ratio']:.1%}), {cache['files']} files")
    print(f"catalog  {s['catalog']['files']} files, {human_size(s['catalog']['bytes'])}")
    # queued_bytes counts the queued, active and retrying pairs: said after them, not after "queued"
    print(f"uploads  {up['queued']} queued, {up['active']} active, {up['retrying']} retrying "
          f"({human_size(up['queued_bytes'])} to send), {up['failed']} failed; {up['copies']} copies")
    oldest = f", oldest {ago(safety['oldest_below_min'])}" if safety["oldest_below_min"] is not None else ""
    print(f"safety   {safety['below_min']} files below min_redundancy ({human_size(safety['below_min_bytes'])})"
          f"{oldest}, {safety['below_redundancy']} below redundancy")
    for r in s["remotes"]:
        health = "healthy" if r["healthy"] else "UNHEALTHY"
        err = f", last error: {r['last_error']}" if r["last_error"] else ""
        snap = r.get("catalog_snapshot")
        if snap is not None:  # None: the remote cannot hold catalog snapshots (or they are off)
            err += (f", catalog snapshot {ago(snap['age'])}" if snap["age"] is not None
                    else ", no catalog snapshot yet")
        print(f"remote   {r['name']} ({r['type']}): {health}, {r['copies']} copies, {r['errors']} errors{err}")
    t = s["transfer"]
    print(f"transfer {t['month']}: in {human_size(t['incoming'])}, out {human_size(t['outgoing'])}")


FILES_HEADER = f"{'HASH':<14} {'SIZE':>10} {'ADDED':>9} {'CACHED':<6} {'COPIES':<6} NAME"


def file_row(f: dict[str, Any], now: float) -> str:
    return (f"{f['hash'][:12]:<14} {human_size(f['size']):>10} {ago(now - f['added']):>9} "
            f"{'yes' if f['cached'] else 'no':<6} {len(f['copies']):<6} {show(f['name'])}")


def print_info(f: dict[str, Any]) -> None:
    print(f"hash     {f['hash']}")
    print(f"name     {show(f['name'])}")
    print(f"size     {human_size(f['size'])} ({f['size']} bytes)")
    print(f"added    {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(f['added']))}")
    print(f"cached   {'yes' if f['cached'] else 'no'}{', pinned' if f['pinned'] else ''}")
    for c in f["copies"]:
        print(f"copy     {c['remote']}: {c['url']}")
    pairs = f.get("uploads")
    if pairs is None:  # a daemon from before `uploads` was in `info`
        for r in f["pending"]:
            print(f"pending  {r}")
        for r in f["failed"]:
            print(f"failed   {r['remote']} after {r['attempts']} attempts: {r['error']}")
        return
    now = time.time()
    for p in pairs:
        line = f"{p['state']:<8} {p['remote']}: {p['attempts']} attempt(s)"
        if p["next_attempt"] is not None:
            wait = p["next_attempt"] - now
            line += f", next {'in ' + human_duration(wait) if wait > 1 else 'now'}"
        elif p["state"] == "failed":
            line += ", given up (retry revives it)"
        if p["last_error"]:
            line += f"; last error {ago(now - p['updated'])}: {p['last_error']}"
        print(line)


def print_nodes(nodes: list[dict[str, Any]]) -> None:
    print(f"{'NODE':<20} {'STATE':<8} {'HEARTBEAT':>10} {'CACHE':>22} {'CLAIMS':>16}  PID@HOST")
    for n in nodes:
        cache = f"{n['cache_files']} files {human_size(n['cache_bytes'])}"
        claims = f"{n['claims']} ({human_size(n['claims_bytes'])})"
        mark = " (this node)" if n.get("this") else ""
        print(f"{n['node']:<20} {n['state']:<8} {ago(n['age']):>10} {cache:>22} {claims:>16}  "
              f"{n['pid'] or '?'}@{n['host'] or '?'}{mark}")


# -- commands --------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    client = Client(socket_path(args), args.timeout)
    try:
        return COMMANDS[args.command](client, args)
    finally:
        client.close()


# `status --check`: the Nagios plugin convention (exit code and one line), for Nagios, Icinga,
# Zabbix's and Sensu's plugin runners, and anything else that runs check_* commands.
NAGIOS = {"ok": (0, "OK"), "warning": (1, "WARNING"), "critical": (2, "CRITICAL")}
NAGIOS_UNKNOWN = 3


def check_line(s: dict[str, Any]) -> tuple[int, str]:
    """(exit code, the one line) from a status object whose findings carry the daemon's levels."""
    findings = s["findings"]
    level = s["level"]
    code, word = NAGIOS[level]
    if findings:
        # the worst first: a monitoring system shows the start of the line
        ordered = sorted(findings, key=lambda f: f["level"] != "critical")
        reason = "; ".join(str(f["line"]) for f in ordered)
    else:
        reason = (f"{s['catalog']['files']} file(s), {s['safety']['below_min']} below min_redundancy, "
                  f"cache {human_size(s['cache']['used'])} of {human_size(s['cache']['capacity'])}")
    cache, up, safety = s["cache"], s["uploads"], s["safety"]
    perf = (f"files={s['catalog']['files']} cache_used={cache['used']}B;;{cache['capacity']};0;{cache['capacity']} "
            f"below_min={safety['below_min']} pending={up['queued'] + up['active'] + up['retrying']} "
            f"failed={up['failed']} unhealthy_remotes={sum(not r['healthy'] for r in s['remotes'])}")
    return code, f"CLOUDMANAGERD {word} - {' '.join(reason.split())} | {perf}"


def check(args: argparse.Namespace) -> int:
    """`status --check`: never a usage or connection error code, as a plugin must: 3 UNKNOWN."""
    try:
        client = Client(socket_path(args), args.timeout)
        try:
            s = client.call({"cmd": "status"})
        finally:
            client.close()
        code, line = check_line(s)
    except Failed as exc:
        code, line = NAGIOS_UNKNOWN, f"CLOUDMANAGERD UNKNOWN - {exc}"
    except (KeyError, TypeError, ValueError, AttributeError):
        code, line = NAGIOS_UNKNOWN, "CLOUDMANAGERD UNKNOWN - the daemon's status reply is not what this " \
            f"cloudmanagerctl {__version__} understands (a different version?)"
    else:
        if args.json:
            print_json(s)
            return code
    print(line)
    return code


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    s = client.call({"cmd": "status"})
    if args.json:
        print_json(s)
    else:
        print_status(s)
    return EXIT_OK


LS_PAGE = 1000
LS_TERMINAL = 100  # on a terminal without --limit: a screenful, not a million lines


def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    """Page through the daemon's list (`after` cursor): neither side ever holds every file."""
    limit = args.limit
    capped = limit is None and sys.stdout.isatty() and not (args.json or args.ndjson)
    if capped:
        limit = LS_TERMINAL + 1  # one more tells whether there are more
    shown, after, now = 0, None, time.time()
    if args.json:
        sys.stdout.write("[")
    while limit is None or shown < limit:
        want = LS_PAGE if limit is None else min(LS_PAGE, limit - shown)
        request = {"cmd": "ls", "state": args.state, "name": args.name, "limit": want}
        if after is not None:
            request["after"] = after
        page = client.call(request)
        for f in page:
            if capped and shown == LS_TERMINAL:
                print("... more files: --limit N shows N of them, or pipe the output", file=sys.stderr)
                return EXIT_OK
            if args.json:
                sys.stdout.write(("," if shown else "") + "\n" + textwrap.indent(json.dumps(f, indent=2), "  "))
            elif args.ndjson:
                print(json.dumps(f))
            else:
                if not shown:
                    print(FILES_HEADER)
                print(file_row(f, now))
            shown += 1
        if len(page) < want:
            break
        after = [page[-1]["added"], page[-1]["hash"]]
    if args.json:
        sys.stdout.write("\n]\n" if shown else "]\n")
    return EXIT_OK


def cmd_info(client: Client, args: argparse.Namespace) -> int:
    f = client.call({"cmd": "info", "hash": args.hash})
    if args.json:
        print_json(f)
    else:
        print_info(f)
    return EXIT_OK


def _call_writing(client: Client, request: dict[str, Any], output: str | None, mode: int, progress=None) -> Any:
    """A request whose bytes the daemon writes into a descriptor: a FILE (changed only once the daemon
    has written everything, see Output) or stdout. A reader of stdout that went away is EPIPE."""
    if output not in (None, "-"):
        out = Output(output, mode)
        try:
            result = client.call(request, fds=[out.fd], progress=progress)
            out.commit()
        finally:
            out.close()
        return result
    # bytes the daemon writes into a pipe cannot be taken back: if it then finds them wrong, it says so
    # and this exits 1 (a regular file behind stdout is cut back by the daemon itself)
    sys.stdout.flush()
    fd = os.dup(sys.stdout.fileno())
    try:
        return client.call(request, fds=[fd], progress=progress)
    except Failed as exc:
        if exc.errno_name == "EPIPE":
            raise BrokenPipeError(errno.EPIPE, "the reader of stdout went away") from None
        raise
    finally:
        os.close(fd)


def cmd_get(client: Client, args: argparse.Namespace) -> int:
    to_file = args.output not in (None, "-")
    if args.output is None and sys.stdout.isatty():
        raise Failed("get: stdout is a terminal; give -o PATH or redirect the output", EXIT_USAGE)
    with Progress("get") as progress:
        result = _call_writing(client, {"cmd": "get", "hash": args.hash}, args.output, 0o666, progress)
    if args.json:
        print_json(result, sys.stdout if to_file else sys.stderr)
    elif to_file:
        print(f"{result['hash'][:12]}: {human_size(result['size'])} written to {args.output}")
    return EXIT_OK


def cmd_retry(client: Client, args: argparse.Namespace) -> int:
    if not args.hashes and not args.all:
        raise Failed("retry: name one or more hashes, or pass --all", EXIT_USAGE)
    result = client.call({"cmd": "retry", "hashes": args.hashes, "all": args.all, "dry_run": args.dry_run})
    if args.json:
        print_json(result)
    elif args.dry_run:
        print(f"would requeue {result['given_up']} given-up and {result['waiting']} waiting pairs")
    else:
        print(f"requeued {result['given_up']} given-up and {result['waiting']} waiting pairs")
    return EXIT_OK


def cmd_pin(client: Client, args: argparse.Namespace) -> int:
    with Progress("fetching back") as progress:
        result = client.call({"cmd": args.command, "hash": args.hash}, progress=progress)
    if args.json:
        print_json(result)
    else:
        print(f"{result['hash'][:12]}: {'pinned in the cache' if result['pinned'] else 'may be evicted again'}")
    return EXIT_OK


def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    """Delete every copy of a file: say what goes, and ask on a terminal unless --yes."""
    f = client.call({"cmd": "info", "hash": args.hash})
    remotes = sorted(c["remote"] for c in f["copies"])
    where = (["the cache"] if f["cached"] else []) + \
        ([f"{len(remotes)} remote(s) ({', '.join(remotes)})"] if remotes else [])
    plan = (f"{f['hash'][:12]} ({show(f['name'])}, {human_size(f['size'])}): delete it from "
            f"{' and '.join(where) or 'nowhere (no copy left)'}, then from the catalog")
    if args.dry_run:
        if args.json:
            print_json({"hash": f["hash"], "removed": False, "cached": f["cached"], "remotes": remotes})
        else:
            print(f"would {plan}")
        return EXIT_OK
    if not args.yes:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise Failed("rm deletes every copy of the file, on every remote; confirm on a terminal or pass --yes",
                         EXIT_USAGE)
        sys.stderr.write(f"{plan}. This cannot be undone. Delete? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise Failed("rm: nothing deleted")
    result = client.call({"cmd": "rm", "hash": f["hash"]})
    if args.json:
        print_json(result)
    else:
        print(f"{result['hash'][:12]}: removed from the cache, every remote and the catalog")
    return EXIT_OK


def cmd_verify(client: Client, args: argparse.Namespace) -> int:
    if args.deep and not args.remotes:
        raise Failed("verify: --deep reads the remote copies back: give it with --remotes", EXIT_USAGE)
    with Progress("verify", unit="files") as progress:
        result = client.call({"cmd": "verify", "remotes": args.remotes, "deep": args.deep}, progress=progress)
    if args.json:
        print_json(result)
        return EXIT_OK
    c = result["cache"]
    print(f"cache: {c['checked']} checked, {c['corrupt']} corrupt, {c['missing']} missing, "
          f"{c['refetched']} fetched again, {c['lost']} lost")
    if "remotes" in result:
        r = result["remotes"]
        print(f"remotes: {r['checked']} copies checked, {r['bad']} bad (being replaced), "
              f"{r['unreachable']} could not be checked ({r['depth']}: {DEPTHS[r['depth']]})")
        for name, mine in sorted(r["per_remote"].items()):
            print(f"  {name} ({mine['depth']}): {mine['checked']} checked, {mine['bad']} bad, "
                  f"{mine['unreachable']} could not be checked")
    return EXIT_FAILED if c["lost"] else EXIT_OK


DEPTHS = {"quick": "exists with the right size", "deep": "read back and hashed"}


def cmd_backup(client: Client, args: argparse.Namespace) -> int:
    out = Output(args.output, 0o600)
    try:
        result = client.call({"cmd": "backup"}, fds=[out.fd])
        out.commit()
    finally:
        out.close()
    if args.json:
        print_json(result)
    else:
        print(f"catalog backed up to {args.output} ({human_size(result['bytes'])})")
    return EXIT_OK


def cmd_export(client: Client, args: argparse.Namespace) -> int:
    """The exchange text (format 0.2) of the files due for export, to FILE or stdout; marks them exported."""
    to_file = args.output not in (None, "-")
    result = _call_writing(client, {"cmd": "export", "limit": args.limit}, args.output, 0o644)
    report = sys.stdout if to_file else sys.stderr  # stdout carries the text itself
    if args.json:
        print_json(result, report)
    else:
        print(f"{result['files']} file(s) exported" + (f" to {args.output}" if to_file else ""), file=report)
    return EXIT_OK


def cmd_import(client: Client, args: argparse.Namespace) -> int:
    """Another node's exchange text, read by the daemon from a descriptor this command opened."""
    if args.file == "-":
        fd = os.dup(sys.stdin.fileno())
    else:
        try:
            fd = os.open(args.file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise Failed(f"cannot read {args.file}: {exc.strerror}") from None
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise Failed(f"cannot read {args.file}: it is a folder")
        request: dict[str, Any] = {"cmd": "import"}
        if args.source is not None:
            request["source"] = args.source
        result = client.call(request, fds=[fd])
    finally:
        os.close(fd)
    if args.json:
        print_json(result)
    else:
        print(f"imported {result['files']} file(s): {result['new']} new, {result['copies']} copies on this "
              "node's remotes")
    return EXIT_OK


def cmd_nodes(client: Client, args: argparse.Namespace) -> int:
    nodes = client.call({"cmd": "nodes"})
    if args.json:
        print_json(nodes)
    else:
        print_nodes(nodes)
    return EXIT_OK


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    result = client.call({"cmd": "reload"})
    if args.json:
        print_json(result)
    else:
        print("config reloaded")
    return EXIT_OK


def cmd_metrics(client: Client, args: argparse.Namespace) -> int:
    text = client.call({"cmd": "metrics"})["text"]
    if args.json:
        print_json({"text": text})
    else:
        sys.stdout.write(text)
    return EXIT_OK


COMMANDS = {"metrics": cmd_metrics,
            "status": cmd_status, "ls": cmd_ls, "info": cmd_info, "get": cmd_get, "retry": cmd_retry,
            "reload": cmd_reload, "pin": cmd_pin, "unpin": cmd_pin, "rm": cmd_rm, "verify": cmd_verify,
            "backup": cmd_backup, "export": cmd_export, "import": cmd_import, "nodes": cmd_nodes}

EPILOG = """exit codes: 0 done; 1 the command failed (the daemon said no, a local file could not be opened);
2 usage error; 3 the daemon could not be reached. `status --check` follows the Nagios plugin
convention instead: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."""

HASH_HELP = "the file's SHA-256, or a unique prefix of 6 or more hex digits"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cloudmanagerctl", description="Query and steer a running cloudmanagerd "
                                "over its control socket.", epilog=EPILOG)
    where = p.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", metavar="FILE",
                       help=f"find the socket in this config (default $CLOUDMANAGERD_CONFIG, else {DEFAULT_CONFIG})")
    where.add_argument("-s", "--socket", metavar="SOCKET", help="the control socket itself")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"give up (exit 3) when the daemon does not answer within this time (default "
                   f"{DEFAULT_TIMEOUT:g}); get, verify, backup, pin, rm, export and import wait as long as "
                   "progress comes")
    p.add_argument("--version", action="version", version=f"cloudmanagerctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="what to do; COMMAND --help says more")

    def command(name: str, text: str, more: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}.{' ' + more if more else ''}")

    s = command("status", "one screen of state: inbox, cache, catalog, uploads, safety, remotes",
                "Problems are listed first; `--check` turns them into a monitoring check.")
    s.add_argument("--check", action="store_true",
                   help="one line and the Nagios plugin exit code: 0 OK, 1 WARNING (a remote unhealthy, given-up "
                   "uploads), 2 CRITICAL (a file below min_redundancy past upload.grace, the cache over capacity, "
                   "ingest stalled), 3 UNKNOWN (daemon unreachable)")
    command("metrics", "the Prometheus metrics, as the metrics.listen endpoint serves them",
            "The same text as the metrics.listen endpoint and metrics.textfile (format 0.0.4), whether or not "
            "those are configured.")
    s = command("ls", "list files, newest first",
                "Streamed page by page: any number of files. On a terminal without --limit, the first 100.")
    s.add_argument("--state", choices=["cached", "evicted", "pending", "failed"],
                   help="only files in the cache, evicted from it, with uploads pending, or with given-up uploads")
    s.add_argument("--name", metavar="GLOB", help="only files whose original name matches this glob")
    s.add_argument("--limit", type=_count, metavar="N", help="at most N files")
    s.add_argument("--ndjson", action="store_true", help="one JSON object a line (--json gives one list)")
    s = command("info", "one file: its copies, and each pending upload's attempts, next attempt and last error")
    s.add_argument("hash", metavar="HASH", help=HASH_HELP)
    s = command("get", "write a file's verified bytes to PATH or stdout",
                "An evicted file is fetched back first (progress on a terminal). PATH changes only once "
                "every byte is written.")
    s.add_argument("hash", metavar="HASH", help=HASH_HELP)
    s.add_argument("-o", "--output", metavar="PATH", help="write here; - or nothing: stdout (not a terminal)")
    s = command("retry", "put given-up uploads, and those waiting out a backoff, back in the queue now")
    s.add_argument("hashes", nargs="*", metavar="HASH", help=HASH_HELP)
    s.add_argument("--all", action="store_true", help="every given-up or waiting upload")
    s.add_argument("-n", "--dry-run", action="store_true", help="say how many would be requeued, requeue nothing")
    command("reload", "re-read the config, like systemctl reload", "Keys that need a restart are named in the log.")
    s = command("pin", "keep a file in the cache (fetched back if needed)")
    s.add_argument("hash", metavar="HASH", help=HASH_HELP)
    s = command("unpin", "let a pinned file be evicted again")
    s.add_argument("hash", metavar="HASH", help=HASH_HELP)
    s = command("rm", "delete a file from the cache, from every remote, then from the catalog",
                "This cannot be undone: on a terminal it asks first; elsewhere it needs --yes.")
    s.add_argument("hash", metavar="HASH", help=HASH_HELP)
    s.add_argument("-y", "--yes", action="store_true", help="do not ask (needed when stdin is not a terminal)")
    s.add_argument("-n", "--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    s = command("backup", "a consistent copy of the catalog, while the daemon runs")
    s.add_argument("-o", "--output", metavar="FILE", required=True, help="write the copy here (mode 0600)")
    s = command("export", "the exchange text (format 0.2) of files not yet exported, for other nodes")
    s.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    s.add_argument("--limit", type=int, metavar="BYTES", help="at most this many bytes (whole entries)")
    s = command("import", "another node's exchange text: its files become known and fetchable here")
    s.add_argument("file", metavar="FILE", help="the exchange text, or - for stdin")
    s.add_argument("--source", metavar="LABEL", help="what confirms these entries (the original's block hash)")
    s = command("verify", "re-hash the cache; with --remotes, check every recorded copy")
    s.add_argument("--remotes", action="store_true", help="also check that every recorded copy exists with its size")
    s.add_argument("--deep", action="store_true", help="with --remotes: read each copy back and hash it")
    command("nodes", "the nodes sharing the catalog: state, last heartbeat, cache, claimed uploads")
    for sp in sub.choices.values():
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 1 << 63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, 0 or more")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = check(args) if args.command == "status" and args.check else run(args)
        sys.stdout.flush()  # here, not at exit: a reader gone by now is the quiet case below
        return code
    except Failed as exc:
        print(f"cloudmanagerctl: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        # whoever read our output went away (`status | head -1`): stop quietly, as Unix tools do.
        # stdout goes to /dev/null so that the interpreter's last flush does not fail again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
