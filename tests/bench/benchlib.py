"""Helpers shared by the benchmark scripts in this folder (not a test module; pytest ignores it).

The scripts run as ``.venv/bin/python tests/bench/X.py``, so this folder is ``sys.path[0]``
and ``import benchlib`` finds this file.

  - small helpers: sizes, logging, environments for peer tools, /proc figures, tables
  - Client: one persistent control-socket connection (JSON lines each way)
  - DaemonProcess: a `python -m cloudmanagerd` subprocess on its own folder, with an
    optional py-spy profiler and a stop() that sends SIGTERM, then SIGKILL after a grace
  - summarize_profile: where the time goes, from py-spy's raw (collapsed) output
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
PY_SPY = shutil.which("py-spy") or next(
    (str(p) for p in [Path(sys.executable).parent / "py-spy"] if p.exists()), None)


# -- small helpers ---------------------------------------------------------------------------

def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4096, 4KiB, 256MiB, 1GiB)")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    return int(float(m.group(1)) * scale)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:g} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def say(message: str, tag: str = "bench") -> None:
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peer_env(git_identity: bool = True) -> dict[str, str]:
    """The environment for peer tools: no AWS CA bundle; with git_identity, a git identity and no pager."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    if git_identity:
        env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost", GIT_COMMITTER_NAME="bench",
                   GIT_COMMITTER_EMAIL="bench@localhost", GIT_PAGER="cat", LC_ALL="C.UTF-8")
    return env


def rmtree(path: Path) -> None:
    """Remove a tree, including git-annex's read-only object folders."""
    def onerror(func, p, _exc):
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        with contextlib.suppress(OSError):
            func(p)
    if path.exists():
        shutil.rmtree(path, onerror=onerror)


def warm(path: Path) -> None:
    """Read a file once, so that the page cache holds it."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass


def proc_status_mb(pid: int, key: str) -> float | None:
    """A /proc/<pid>/status figure (VmRSS, VmHWM...) in MB (10^6 bytes)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


def vm_hwm_mb(pid: int) -> float | None:
    return proc_status_mb(pid, "VmHWM")


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=peer_env())
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def nearest_rank(sorted_values: list[float], pct: float) -> float:
    k = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[int(k) - 1]


def fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def table(rows: list[list[str]], header: list[str], right: set[int]) -> list[str]:
    """Aligned text columns: a header, a rule, the rows; the columns in `right` right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


# -- processes -------------------------------------------------------------------------------

def terminate(proc: subprocess.Popen, grace: float, sig: int = signal.SIGTERM,
              reap_timeout: float | None = None) -> None:
    """Send `sig`, wait `grace` seconds, then SIGKILL and reap (waiting at most reap_timeout)."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(reap_timeout)


def start_py_spy(pid: int, out: Path, rate: int = 250, extra: list[str] | tuple[str, ...] = (),
                 settle: float = 0.5, quiet: bool = False) -> subprocess.Popen | None:
    """py-spy record on `pid` into `out` (raw collapsed stacks); None if it did not start."""
    assert PY_SPY
    proc = subprocess.Popen(
        [PY_SPY, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
         "--threads", "--nonblocking", *extra, "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if quiet else subprocess.PIPE)
    if settle:
        time.sleep(settle)  # let it attach before the timed part (setup, not synchronisation of results)
    if settle and proc.poll() is not None:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        say(f"py-spy did not start: {err.strip()}")
        return None
    return proc


def stop_py_spy(proc: subprocess.Popen | None) -> None:
    """SIGINT (py-spy writes its output), SIGKILL if it takes over a minute."""
    if proc is None:
        return
    terminate(proc, 60, signal.SIGINT)
    if proc.stderr:
        proc.stderr.close()


class Client:
    """One persistent control connection: several requests on it, JSON lines each way.

    With skip_progress, replies carrying "progress" are read past (long commands send them)."""

    def __init__(self, path: str, timeout: float = 60, skip_progress: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.skip_progress = skip_progress

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("the daemon closed the control connection")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            reply = json.loads(line)
            if not self.skip_progress or "progress" not in reply:
                return reply

    def close(self) -> None:
        self.sock.close()


class DaemonProcess:
    """A cloudmanagerd on its own folder (config.yaml and daemon.log in it), run as a subprocess.

    Subclasses build the config; `start()` spawns the daemon and waits until its control socket
    answers on a persistent Client. With `reconnect`, request() opens a new connection when the
    daemon has closed the old one (it drops idle clients)."""

    reconnect = False
    grace = 120.0  # seconds between SIGTERM and SIGKILL in stop()
    reap_timeout: float | None = None  # then at most this long for the kill to take

    def __init__(self, folder: Path, config: dict[str, Any], cwd: Path = REPO) -> None:
        self.dir = folder
        self.config = config
        self.socket = str(config["control"]["socket"])
        self.cwd = cwd
        self.config_path = folder / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = folder / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self.client: Client | None = None
        self.profiler: subprocess.Popen | None = None

    def spawn(self, cmd: list[str] | None = None, log_mode: str = "wb") -> None:
        cmd = cmd or [sys.executable, "-m", "cloudmanagerd", "-c", str(self.config_path)]
        with open(self.log_path, log_mode) as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def start(self, timeout: float = 60):
        self.spawn()
        deadline = time.monotonic() + timeout
        while True:
            self.alive()
            try:
                self.client = Client(self.socket)
                if self.client.request({"cmd": "status"})["ok"]:
                    return self
            except OSError:
                if self.client is not None:
                    self.client.close()
                    self.client = None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon's socket did not answer within {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.client is not None:
            try:
                return self.client.request(message)
            except (OSError, ConnectionError):
                if not self.reconnect:
                    raise
                self.client.close()
                self.client = None
        if not self.reconnect:
            raise RuntimeError("the daemon is not started")
        self.client = Client(self.socket)
        return self.client.request(message)

    def status(self) -> dict[str, Any]:
        reply = self.request({"cmd": "status"})
        if not reply.get("ok"):
            raise RuntimeError(f"status failed: {reply}")
        return reply["result"]

    def peak_rss_mb(self) -> float | None:
        return vm_hwm_mb(self.proc.pid) if self.proc is not None else None

    def start_profiler(self, out: Path, rate: int = 250, extra: list[str] | tuple[str, ...] = (),
                       settle: float = 0.5) -> None:
        assert self.proc is not None
        self.profiler = start_py_spy(self.proc.pid, out, rate, extra, settle)

    def stop_profiler(self) -> None:
        stop_py_spy(self.profiler)
        self.profiler = None

    def stop(self) -> None:
        self.stop_profiler()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is not None:
            terminate(self.proc, self.grace, reap_timeout=self.reap_timeout)


class InboxDaemon(DaemonProcess):
    """A fresh cloudmanagerd in root/name: inbox, a 20 GiB cache, state, socket c.sock, settle 2 s.

    `sections` are further config sections (e.g. upload=...)."""

    def __init__(self, root: Path, name: str, remotes: list[dict[str, Any]], log_level: str,
                 cwd: Path = REPO, **sections: Any) -> None:
        folder = root / name
        folder.mkdir()
        self.inbox = folder / "inbox"
        self.inbox.mkdir()
        self.cache = folder / "cache"
        super().__init__(folder, {
            "inbox": str(self.inbox),
            "cache": {"path": str(self.cache), "capacity": "20GiB"},
            "state": str(folder / "state"),
            "control": {"socket": str(folder / "c.sock")},
            "ingest": {"settle": "2s"},
            **sections,
            "remotes": remotes,
            "log": {"level": log_level},
        }, cwd=cwd)

    def object_path(self, h: str) -> Path:
        return self.cache / h[:2] / h


# -- the bench scripts' frame ----------------------------------------------------------------

def add_json_arg(p: argparse.ArgumentParser) -> None:
    """--json FILE: the figures, machine-readable (tests/bench/report.py reads them)."""
    p.add_argument("--json", metavar="FILE", help="also write the raw figures to FILE as JSON (for report.py)")


def write_json(path: str | None, figures: Any) -> None:
    """Write `figures` (a dataclass, dicts, lists; Paths and other objects as text) to `path`, if given."""
    if not path:
        return
    if dataclasses.is_dataclass(figures):
        figures = dataclasses.asdict(figures)
    Path(path).write_text(json.dumps(figures, indent=1, default=str))


def process_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds process `pid` has used so far, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def process_cpu(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far."""
    return sum(process_cpu_split(pid))


def write_small_files(folder: Path, count: int, size: int) -> list[str]:
    """`count` files of `size` random bytes in a new folder; their names."""
    folder.mkdir()
    names = [f"f{i:05d}" for i in range(count)]
    say(f"writing {count} files of {human_bytes(size)} (random content)")
    for name in names:
        with open(folder / name, "wb") as f:
            f.write(os.urandom(size))
    return names


def check_profile_arg(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--profile DIR: py-spy must be there; DIR is made."""
    if args.profile:
        if not PY_SPY:
            p.error("--profile needs py-spy on PATH or beside this python (pip install py-spy)")
        os.makedirs(args.profile, exist_ok=True)


def profile_sections(profiles: dict[str, Path], what: str = "") -> list[str]:
    """The report's tail: where each profiled daemon's time went."""
    out: list[str] = []
    for name, path in profiles.items():
        out.append("")
        out.append(f"profile of the daemon, {what}{name} (py-spy, 250 Hz, {path}):")
        out += summarize_profile(path)
    return out


def run_bench(args: argparse.Namespace, prefix: str, make_bench: Callable[[argparse.Namespace, Path], Any],
              run: Callable[[Any], None], report: Callable[[Any, argparse.Namespace, float], tuple[str, int]],
              what: str = "", finish: Callable[[Any], None] | None = None) -> int:
    """A bench in a fresh temp folder under --tmp: run(bench), then print report(bench, args, seconds).

    Whatever happens, bench.daemons are stopped, finish(bench) runs, and the folder is removed
    (unless --keep). The exit code: 130 on ^C; 1 with --strict when report() counts misses."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=args.tmp))
    root.chmod(0o755)
    bench = make_bench(args, root)
    started = time.monotonic()
    say(f"data in {root}{what}")
    try:
        run(bench)
        text, misses = report(bench, args, time.monotonic() - started)
        write_json(getattr(args, "json", None), {**dataclasses.asdict(bench.r), "args": vars(args)})
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        for d in bench.daemons:
            with contextlib.suppress(Exception):
                d.stop()
        if finish is not None:
            finish(bench)
        if args.keep:
            say(f"kept {root}")
        else:
            rmtree(root)
    print(text, flush=True)
    return 1 if misses and args.strict else 0


# -- profiles --------------------------------------------------------------------------------

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


Counts = collections.Counter


def read_profile(path: Path, name_of: Callable[[str], str],
                 keep: Callable[[str, list[str]], bool] | None = None
                 ) -> tuple[int, Counts[str], Counts[str], Counts[str]] | None:
    """Sample counts from py-spy's raw (collapsed) output: total, self (leaf frame), inclusive
    and per thread; None when the file cannot be read. keep(thread, frames) picks the stacks;
    name_of(frame) names a frame."""
    self_t: Counts[str] = collections.Counter()
    incl: Counts[str] = collections.Counter()
    threads: Counts[str] = collections.Counter()
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0] if frames and frames[0].startswith("thread (") else ""
        if thread:
            frames = frames[1:]
        if keep is not None and not keep(thread, frames):
            continue
        if thread:
            threads[thread] += n
        if not frames:
            continue
        total += n
        names = [name_of(fr) for fr in frames]
        self_t[names[-1]] += n
        for name in set(names):
            incl[name] += n
    return total, self_t, incl, threads


def frame_name(fr: str) -> str:
    m = FRAME.match(fr)
    return f"{m['func']} ({short_path(m['file'])})" if m else fr


def summarize_profile(path: Path, top: int = 12) -> list[str]:
    """Self and inclusive sample shares from py-spy's raw (collapsed) output."""
    counts = read_profile(path, frame_name)
    if counts is None:
        return [f"  (no profile at {path})"]
    total, self_t, incl, threads = counts
    if not total:
        return ["  (no samples)"]
    out = [f"  {total} samples; busiest threads: "
           + ", ".join(f"{t} {100 * n / total:.0f}%" for t, n in threads.most_common(4))]
    out.append("  self time (leaf frames):")
    out += [f"    {100 * n / total:5.1f}%  {name}" for name, n in self_t.most_common(top)]
    out.append("  inclusive, cloudmanagerd frames:")
    ours = [(name, n) for name, n in incl.most_common() if "cloudmanagerd/" in name]
    out += [f"    {100 * n / total:5.1f}%  {name}" for name, n in ours[:top]]
    return out


def short_path(file: str, markers: tuple[str, ...] = ("site-packages/", "cloudmanagerd/", "lib/python3")) -> str:
    """A frame's file without the interpreter's prefix (from cloudmanagerd/ on, for ours)."""
    for marker in markers:
        i = file.find(marker)
        if i >= 0:
            return file[i:] if marker == "cloudmanagerd/" else file[i + len(marker):]
    return file
