#!/usr/bin/env python3
"""The status benchmark of issue 6: `status` with 1,000,000 files in the catalog, while the daemon ingests.

Run from the repository root:

    .venv/bin/python tests/bench/status_bench.py                  # 1,000,000 files, 1,000 calls
    .venv/bin/python tests/bench/status_bench.py --files 100000 --calls 300
    .venv/bin/python tests/bench/status_bench.py --reuse --profile /tmp/prof

What it does:
  1. fabricates a catalog of N files through the real schema: Catalog.open() creates it (every
     migration, triggers and counters), then one transaction drops the triggers, bulk-inserts N
     files, each with two good copies (remotes r0 and r1) and two `done` upload rows, recounts the
     counters table with the migrations' own recount statements, and puts the triggers back. All
     files are evicted (no cache entries): a long-lived node keeps most of its files on remotes.
     With --reuse the fabricated catalog is kept in --tmp and copied for the next run.
  2. starts `python -m cloudmanagerd` on it (two empty directory remotes, scrub off, log level
     warning) and times the start until the control socket answers.
  3. starts a feeder: small files (4 KiB) written as dotfiles and renamed into the inbox at
     --feed-rate per second, so the daemon ingests and uploads them to both remotes during the
     measurement.
  4. `status` round trip on ONE open connection: a few warm-up calls, then --calls timed calls,
     one every --interval ms (back to back, 1,000 calls take under a second, shorter than one ingest
     batch); p50, p90, p99, max (nearest rank).
  5. `cloudmanagerctl -c CONFIG status` as a user runs it: hyperfine if installed, else --ctl-runs
     timed subprocess runs (interpreter start-up included: that is what the user waits for).
  6. the daemon's VmRSS and VmHWM from /proc/<pid>/status.

Targets (issue 6): status p99 <= 5 ms; daemon RSS <= 100 MB (10^6 bytes).
--profile DIR runs py-spy (in .venv) on the daemon during step 4 and prints where the time goes.
Not collected by pytest (tests/bench/conftest.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import (
    PY_SPY,
    REPO,
    Client,
    DaemonProcess,
    add_json_arg,
    nearest_rank,
    proc_status_mb,
    process_cpu,
    process_cpu_split,
    read_profile,
    short_path,
    table,
    write_json,
)
from benchlib import say as _say

sys.path.insert(0, str(REPO))

from cloudmanagerd.catalog import MIGRATIONS, Catalog, split_statements  # noqa: E402

P99_TARGET_MS = 5.0
RSS_TARGET_MB = 100.0
NODE = "bench-node"
REMOTES = ("r0", "r1")
CTL = Path(sys.executable).parent / "cloudmanagerctl"
CTL_CMD = [str(CTL)] if CTL.exists() else [sys.executable, "-m", "cloudmanagerd.ctl"]
say = functools.partial(_say, tag="status-bench")


# -- 1. the catalog ----------------------------------------------------------------------------

def fabricate(path: Path, n: int) -> None:
    """N files with two good copies each, through the real schema, in one transaction."""
    Catalog.open(f"sqlite:///{path}", NODE).close()  # every migration: tables, indexes, triggers, counters
    # every migration's own recount of the trigger-kept counters (3: files, copies, uploads...; 4: per remote)
    recount = [s for m in MIGRATIONS for s in split_statements(m) if s.startswith("INSERT INTO counters")]
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-262144")
        triggers = db.execute("SELECT name, sql FROM sqlite_master WHERE type='trigger'").fetchall()
        now = time.time()
        year = 365 * 86400.0
        started = time.monotonic()
        db.execute("BEGIN")
        for name, _ in triggers:
            db.execute(f"DROP TRIGGER {name}")

        def files():
            for i in range(n):
                h = hashlib.sha256(b"status-bench %d" % i).hexdigest()
                yield (h, b"archive/%04d/file-%07d.bin" % (i // 1000, i), 1024 + (i * 7919) % (8 << 20),
                       now - year + year * i / n, 2)

        db.executemany("INSERT INTO files(hash, name, size, added, good) VALUES (?, ?, ?, ?, ?)", files())
        say(f"  {n:,} files inserted ({time.monotonic() - started:.0f} s)")
        for remote in REMOTES:
            db.execute("INSERT INTO copies(hash, remote, url, created, verified) "
                       "SELECT hash, ?, ? || '/' || substr(hash, 1, 2) || '/' || hash, added, added FROM files",
                       (remote, f"/srv/{remote}"))
            db.execute("INSERT INTO uploads(hash, remote, state, attempts, next_attempt, updated) "
                       "SELECT hash, ?, 'done', 1, added, added FROM files", (remote,))
            say(f"  copies and uploads on {remote} ({time.monotonic() - started:.0f} s)")
        db.execute("INSERT INTO remote_stats(remote, successes) VALUES (?, ?), (?, ?)",
                   (REMOTES[0], n, REMOTES[1], n))
        total = db.execute("SELECT COALESCE(SUM(size), 0) FROM files").fetchone()[0]
        db.execute("INSERT INTO transfer(node, month, incoming, outgoing) VALUES (?, ?, ?, ?)",
                   (NODE, time.strftime("%Y-%m", time.gmtime(now)), total, 2 * total))
        db.execute("DELETE FROM counters")
        for statement in recount:  # the counters the triggers keep from now on
            db.execute(statement)
        for _, sql in triggers:
            db.execute(sql)
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        counters = dict(db.execute("SELECT name, value FROM counters"))
        assert counters["files"] == n and counters["copies"] == 2 * n, counters
        say(f"  catalog ready: {path.stat().st_size / 1e6:.0f} MB ({time.monotonic() - started:.0f} s)")
    finally:
        db.close()


# -- 2. the daemon -------------------------------------------------------------------------------

class BenchDaemon(DaemonProcess):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.inbox.mkdir()
        for r in REMOTES:
            (root / "remotes" / r).mkdir(parents=True)
        self.state = root / "state"
        self.state.mkdir()
        super().__init__(root, {
            "inbox": str(self.inbox),
            "cache": {"path": str(root / "cache"), "capacity": "20GiB", "scrub": 0},
            "state": str(self.state),
            "node": NODE,
            "control": {"socket": str(root / "c.sock")},
            "ingest": {"settle": "1s"},
            "remotes": [{"name": r, "type": "directory", "path": str(root / "remotes" / r)} for r in REMOTES],
            "log": {"level": "warning"},
        })

    @property
    def catalog(self) -> Path:
        return self.state / "catalog.sqlite3"

    def start(self, switch_interval: float | None = None) -> float:
        """Seconds until the control socket answers (on throwaway connections)."""
        started = time.monotonic()
        cmd = [sys.executable, "-m", "cloudmanagerd", "-c", str(self.config_path)]
        if switch_interval:  # a diagnosis: how much of the tail is threads queueing for the GIL?
            cmd[1:3] = ["-c", f"import sys; sys.setswitchinterval({switch_interval}); sys.argv[0] = 'cloudmanagerd'; "
                              "from cloudmanagerd.daemon import main; sys.exit(main())"]
        self.spawn(cmd)
        while True:
            self.alive()
            with contextlib.suppress(OSError):
                c = connect(self.socket)
                try:
                    if c.request({"cmd": "status"})["ok"]:
                        return time.monotonic() - started
                finally:
                    c.close()
            if time.monotonic() - started > 300:
                raise RuntimeError(f"no answer on the control socket in 300 s:\n{self.log_tail()}")
            time.sleep(0.05)


def connect(path: str) -> Client:
    """One persistent control connection (status sends no progress lines)."""
    return Client(path, timeout=120, skip_progress=False)


# -- 3. the feeder -------------------------------------------------------------------------------

class Feeder(threading.Thread):
    """Small files renamed into the inbox at a steady rate until stopped."""

    def __init__(self, inbox: Path, rate: float, size: int = 4096) -> None:
        super().__init__(name="feeder", daemon=True)
        self.inbox = inbox
        self.rate = rate
        self.size = size
        self.dropped = 0
        self._halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._halt.is_set():
            due = start + self.dropped / self.rate
            wait = due - time.monotonic()
            if wait > 0 and self._halt.wait(wait):
                break
            i = self.dropped
            tmp = self.inbox / f".feed-{i}.tmp"
            tmp.write_bytes(os.urandom(16) + b"f" * (self.size - 16))
            os.rename(tmp, self.inbox / f"feed-{i:07d}.bin")
            self.dropped += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


# -- 5. cloudmanagerctl as a user runs it ----------------------------------------------------------

def wall_times(cmd: list[str], runs: int) -> tuple[str, list[float]]:
    """Wall time of a command in ms: hyperfine if installed, else timed subprocess runs."""
    hyperfine = shutil.which("hyperfine")
    if hyperfine:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run([hyperfine, "-N", "--warmup", "3", "--runs", str(runs), "--export-json", out.name,
                            " ".join(cmd)], check=True, capture_output=True)
            data = json.loads(Path(out.name).read_text())
        return "hyperfine", [t * 1000 for t in data["results"][0]["times"]]
    times = []
    for _ in range(runs + 2):
        started = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True)
        times.append((time.perf_counter() - started) * 1000)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.decode()}")
    return f"{runs} subprocess runs (2 warm-up runs dropped)", times[2:]


# -- profile -------------------------------------------------------------------------------------

OURS_FIRST = ("cloudmanagerd/", "site-packages/", "lib/python3")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def frame_name(fr: str) -> str:
    m = FRAME.match(fr)
    return f"{m['func']} ({short_path(m['file'], OURS_FIRST)}{':' + m['line'] if m['line'] else ''})" if m else fr


def control_threads(thread: str, frames: list[str]) -> bool:
    """Only the threads that serve the control socket."""
    return bool(frames) and ("control-client" in thread or any("control.py" in f for f in frames))


def summarize_profile(path: Path, top: int = 14) -> list[str]:
    counts = read_profile(path, frame_name, control_threads)
    if counts is None:
        return [f"  (no profile at {path})"]
    total, self_t, incl, _ = counts
    if not total:
        return ["  (no samples in the control threads)"]
    out = [f"  {total} samples in the control-socket threads", "  self time (leaf frames):"]
    out += [f"    {100 * n / total:5.1f}%  {name}" for name, n in self_t.most_common(top)]
    out.append("  inclusive, cloudmanagerd frames:")
    out += [f"    {100 * n / total:5.1f}%  {name}" for name, n in incl.most_common() if "cloudmanagerd/" in name][:top]
    return out


# -- the run ---------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="cm-status-bench-", dir=args.tmp))
    d = BenchDaemon(root)
    feeder: Feeder | None = None
    try:
        cached = Path(args.tmp) / f"cm-status-bench-catalog-{args.files}.sqlite3"
        if args.reuse and cached.exists():
            say(f"copying the fabricated catalog {cached}")
            shutil.copyfile(cached, d.catalog)
        else:
            say(f"fabricating a catalog of {args.files:,} files")
            fabricate(d.catalog, args.files)
            if args.reuse:
                shutil.copyfile(d.catalog, cached)
        say("starting the daemon")
        startup = d.start(args.switch_interval)
        pid = d.proc.pid
        rss_idle = proc_status_mb(pid, "VmRSS")
        say(f"  control socket answers after {startup:.1f} s; RSS {rss_idle:.0f} MB")

        client = connect(d.socket)
        first = client.request({"cmd": "status"})["result"]
        files_before = first["catalog"]["files"]
        if args.feed_rate > 0:
            feeder = Feeder(d.inbox, args.feed_rate)
            feeder.start()
            deadline = time.monotonic() + 60  # the feeder's files must be flowing before the timed part
            while client.request({"cmd": "status"})["result"]["catalog"]["files"] == files_before:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nothing ingested within 60 s:\n{d.log_tail()}")
                time.sleep(0.05)
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            profile_path = args.profile / "status.txt"
            if PY_SPY:
                d.start_profiler(profile_path, rate=500, settle=1.0)  # let py-spy attach before the timed part
            else:
                say("py-spy not found; no profile")
        for _ in range(5):
            client.request({"cmd": "status"})
        quiet = None
        if args.feed_rate <= 0:
            # an idle daemon: its CPU over a window as long as the timed one, without calls, is taken
            # off the calls' CPU, leaving status's own cost per call
            say(f"measuring the idle daemon's CPU over {args.calls * args.interval / 1000:g} s without calls")
            quiet = process_cpu(pid)
            time.sleep(args.calls * args.interval / 1000)  # a measured window, not a synchronisation
            quiet = process_cpu(pid) - quiet
        say(f"timing {args.calls} status calls on one connection while ingesting")
        load_before = os.getloadavg()[0]
        lat = []
        during_start = client.request({"cmd": "status"})
        if not during_start.get("ok"):
            raise RuntimeError(f"status failed: {during_start}")
        during_start = during_start["result"]
        split = process_cpu_split(pid)
        cpu = sum(split)
        window = time.monotonic()
        for i in range(args.calls):
            started = time.perf_counter()
            reply = client.request({"cmd": "status"})
            lat.append((time.perf_counter() - started) * 1000)
            if not reply.get("ok"):
                raise RuntimeError(f"status failed: {reply}")
            # paced, so that the calls spread over ingest batches, fsyncs and uploads (untimed pause)
            pause = window + (i + 1) * args.interval / 1000 - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        window = time.monotonic() - window
        split = tuple(b - a for a, b in zip(split, process_cpu_split(pid)))
        cpu = process_cpu(pid) - cpu
        during_end = reply["result"]
        d.stop_profiler()
        ingested = during_end["catalog"]["files"] - during_start["catalog"]["files"]
        copies = during_end["uploads"]["copies"] - during_start["uploads"]["copies"]

        say("timing cloudmanagerctl status")
        how, ctl_ms = wall_times([*CTL_CMD, "-c", str(d.config_path), "status"], args.ctl_runs)
        _, ctl_s_ms = wall_times([*CTL_CMD, "-s", d.socket, "status"], args.ctl_runs)
        _, floor_ms = wall_times([sys.executable, "-c", "pass"], args.ctl_runs)
        if feeder is not None:
            feeder.stop()
        client.close()
        rss = proc_status_mb(pid, "VmRSS")
        hwm = proc_status_mb(pid, "VmHWM")
        final = connect(d.socket)
        files_now = final.request({"cmd": "status"})["result"]["catalog"]["files"]
        final.close()

        lat.sort()
        p50, p90, p99 = (nearest_rank(lat, p) for p in (50, 90, 99))
        rows = [
            ("status p50, one connection", f"{p50:.2f} ms", "", ""),
            ("status p90", f"{p90:.2f} ms", "", ""),
            ("status p99", f"{p99:.2f} ms", f"<= {P99_TARGET_MS:g} ms", "PASS" if p99 <= P99_TARGET_MS else "MISS"),
            ("status max", f"{lat[-1]:.2f} ms", "", ""),
            # less sensitive to the machine's load than the latencies; with --feed-rate 0, the status calls' own cost
            ("daemon CPU during the timed calls", f"{cpu:.2f} s", "", ""),
            ("  of which user, system", f"{split[0]:.2f} s, {split[1]:.2f} s", "", ""),
            ("  the same per status call", f"{1000 * cpu / args.calls:.2f} ms", "", ""),
            *([("daemon CPU over as long without calls", f"{quiet:.2f} s", "", ""),
               ("  status's own CPU per call (the difference)", f"{1000 * (cpu - quiet) / args.calls:.2f} ms", "", "")]
              if quiet is not None else []),
            ("cloudmanagerctl -c CONFIG status wall, median", f"{statistics.median(ctl_ms):.0f} ms", "", ""),
            ("cloudmanagerctl -c CONFIG status wall, min..max", f"{min(ctl_ms):.0f}..{max(ctl_ms):.0f} ms", "", ""),
            ("cloudmanagerctl -s SOCKET status wall, median", f"{statistics.median(ctl_s_ms):.0f} ms", "", ""),
            ("python -c pass wall, median (the floor)", f"{statistics.median(floor_ms):.0f} ms", "", ""),
            ("daemon VmRSS at the end", f"{rss:.1f} MB", f"<= {RSS_TARGET_MB:g} MB",
             "PASS" if rss is not None and rss <= RSS_TARGET_MB else "MISS"),
            ("daemon VmHWM (peak RSS)", f"{hwm:.1f} MB", f"<= {RSS_TARGET_MB:g} MB",
             "PASS" if hwm is not None and hwm <= RSS_TARGET_MB else "MISS"),
            ("daemon start until the socket answers", f"{startup:.1f} s", "", ""),
        ]
        out = [f"cloudmanagerd status benchmark (issue 6): {files_before:,} files in the catalog "
               f"({2 * args.files:,} copies, all evicted), {os.cpu_count()} CPUs, "
               f"1-min load {load_before:.1f} before the timed calls, {os.getloadavg()[0]:.1f} at the end",
               f"{args.calls} status calls, one every {args.interval:g} ms, over {window:.1f} s on one connection "
               f"while the feeder dropped {args.feed_rate:g} files/s of 4 KiB: {ingested} files ingested and "
               f"{copies} copies made meanwhile",
               f"cloudmanagerctl: {how}; catalog at the end: {files_now:,} files", ""]
        out += table(rows, ["measure", "value", "target", "verdict"], {1})
        if args.profile and PY_SPY:
            out += ["", f"profile of the control threads during the timed calls ({args.profile / 'status.txt'}):"]
            out += summarize_profile(args.profile / "status.txt")
        problems = [line for line in d.log_tail(100_000).splitlines() if " ERROR " in line or "Traceback" in line]
        if problems:
            out += ["", f"daemon log errors ({len(problems)}), first: {problems[0]}"]
        print("\n".join(out))
        write_json(args.json, {"files": files_before, "calls": args.calls, "p50_ms": p50, "p90_ms": p90,
                               "p99_ms": p99, "max_ms": lat[-1], "ctl_median_ms": statistics.median(ctl_ms),
                               "rss_mb": rss, "hwm_mb": hwm, "startup_s": startup, "ingested": ingested,
                               "daemon_cpu_s": cpu, "daemon_idle_cpu_s": quiet,
                               "copies": copies})
        misses = sum(r[3] == "MISS" for r in rows)
        return 1 if misses and args.strict else 0
    finally:
        try:
            if feeder is not None:
                feeder.stop()
        finally:
            d.stop()  # whatever failed above, never leave the daemon running
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=1_000_000, help="files in the fabricated catalog (default 1000000)")
    p.add_argument("--calls", type=int, default=1000, help="timed status calls (default 1000)")
    p.add_argument("--feed-rate", type=float, default=200.0,
                   help="files per second dropped meanwhile (default 200; 0: an idle daemon, for comparison)")
    p.add_argument("--interval", type=float, default=10.0,
                   help="ms from one call's start to the next (default 10: 1000 calls span 10 s of ingest)")
    p.add_argument("--ctl-runs", type=int, default=20, help="timed cloudmanagerctl runs (default 20)")
    p.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the daemon during the timed calls")
    p.add_argument("--switch-interval", type=float, metavar="SECONDS",
                   help="run the daemon with sys.setswitchinterval(SECONDS) (default Python's 0.005): a diagnosis")
    p.add_argument("--reuse", action="store_true",
                   help="keep the fabricated catalog in --tmp and reuse it next time (it is large)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--tmp", default="/tmp", help="where the temp folder goes (default /tmp)")
    add_json_arg(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(parse_args(None)))
