#!/usr/bin/env python3
"""The ingest benchmark of issue 3: cloudmanagerd side by side with its peers, in one run.

Run from the repository root (``make bench`` does):

    .venv/bin/python tests/bench/ingest_bench.py            # the issue's sizes
    .venv/bin/python tests/bench/ingest_bench.py --quick    # small sizes, a minute or so
    .venv/bin/python tests/bench/ingest_bench.py --only latency --latency-count 50

Phases (select with --only, comma separated or repeated):
  mv           N small files renamed into the inbox of a running daemon (as `mv` does)
  cp           the same files copied in by a real `cp -r staging/. inbox/`
  annex        `git annex add .` on the same files in a fresh git-annex repository
  rclone-copy  `rclone copy SRC DST` to a local folder
  rclone-move  `rclone move SRC DST` to a local folder (same filesystem: a rename each)
  rename       a bare os.rename per file: the floor of any move-based ingest
  big          one big file renamed into the inbox, next to `openssl dgst -sha256` on it
  latency      single files dropped one at a time: drop-to-registered p50/p99
  (`files` = mv,cp,annex,rclone-copy,rclone-move,rename)

Each daemon phase starts a fresh daemon, so its VmHWM (peak RSS) is that phase's alone.
The daemon has no remotes, so uploads do not compete with ingest. All data lives in one
temp folder under --tmp (default /tmp, the filesystem the daemon's folders are on) and is
deleted at the end. Not collected by pytest (the name does not match test_*.py).

--profile DIR attaches py-spy (``pip install py-spy``) to the daemon during each daemon
phase, writes DIR/<phase>.txt (collapsed stacks) and prints where the time goes.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    Client,
    InboxDaemon,
    add_json_arg,
    check_profile_arg,
    fmt,
    human_bytes,
    nearest_rank,
    parse_size,
    peer_env,
    profile_sections,
    rmtree,
    run_bench,
    say,
    table,
    tool_version,
    warm,
    write_small_files,
)

FILE_PHASES = ["mv", "cp", "annex", "rclone-copy", "rclone-move", "rename"]
ALL_PHASES = FILE_PHASES + ["big", "latency"]
DAEMON_PHASES = {"mv", "cp", "big", "latency"}
RSS_TARGET_MB = 100.0
RCLONE_FLAGS = ["--transfers", "4", "--checkers", "8", "-q"]  # rclone's defaults, said out loud


# -- small helpers ---------------------------------------------------------------------------

def copy_tree(src: Path, dst: Path) -> None:
    """A fresh copy of the source files (untimed setup)."""
    dst.mkdir(parents=True)
    subprocess.run(["cp", "-r", f"{src}/.", f"{dst}/"], check=True)


def cpu_seconds(d: BenchDaemon) -> float:
    """The daemon's CPU time so far (user + system, all threads): less sensitive to a busy machine than
    wall time."""
    assert d.proc is not None
    fields_ = open(f"/proc/{d.proc.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def inbox_empty(path: Path) -> bool:
    """Cheap, client-side: stops at the first entry."""
    with os.scandir(path) as it:
        for _ in it:
            return False
    return True


# -- the daemon ------------------------------------------------------------------------------

class BenchDaemon(InboxDaemon):
    """A fresh cloudmanagerd on its own folders, run as a subprocess: no remotes, or (with_remote)
    as users run it: one folder remote (`remote/` in its folder), redundancy 1, log level info."""

    def __init__(self, root: Path, name: str, with_remote: bool = False) -> None:
        if not with_remote:
            super().__init__(root, name, remotes=[], log_level="warning")
            return
        remote = root / f"{name}-remote"
        remote.mkdir()
        super().__init__(root, name, remotes=[{"name": "nas", "type": "directory", "path": str(remote)}],
                         log_level="info", upload={"redundancy": 1})
        self.remote = remote


# -- results ---------------------------------------------------------------------------------

@dataclass
class Results:
    files: int = 0
    file_size: int = 0
    big_size: int = 0
    seconds: dict[str, float] = field(default_factory=dict)   # file phases
    notes: dict[str, str] = field(default_factory=dict)
    rss: dict[str, float | None] = field(default_factory=dict)
    big_ingest_runs: list[float] = field(default_factory=list)
    big_openssl_runs: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    latency_load: int = 0              # files uploading while the drops were timed (--latency-load)
    latency_during_load: int = 0       # drops timed before that upload had finished
    latency_load_safe: float | None = None  # seconds from the load's first rename until all its copies
    remote: bool = False               # the daemon had one folder remote (--remote)
    profiles: dict[str, Path] = field(default_factory=dict)
    daemon_log: dict[str, str] = field(default_factory=dict)  # warnings and errors, per phase
    load: dict[str, float] = field(default_factory=dict)    # 1-min load average as each phase began
    cpu: dict[str, float] = field(default_factory=dict)     # the daemon's CPU seconds (user+system) in a phase

    @property
    def big_ingest(self) -> float | None:
        return min(self.big_ingest_runs, default=None)

    @property
    def big_openssl(self) -> float | None:
        return min(self.big_openssl_runs, default=None)

    def rate(self, phase: str) -> float | None:
        s = self.seconds.get(phase)
        return self.files / s if s else None


# -- the phases ------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.r = Results(files=args.files, file_size=args.file_size, big_size=args.big_size, remote=args.remote)
        self.daemons: list[BenchDaemon] = []
        self.master: Path | None = None
        self.cp_alone = 0.0
        self.names: list[str] = []
        self.env = peer_env()

    # setup

    def make_master(self) -> Path:
        if self.master is None:
            self.master = self.root / "master"
            self.names = write_small_files(self.master, self.args.files, self.args.file_size)
        return self.master

    def staging(self, name: str) -> Path:
        path = self.root / name
        master = self.make_master()
        os.sync()
        t0 = time.perf_counter()
        copy_tree(master, path)
        self.cp_alone = time.perf_counter() - t0  # the same cp -r, with no daemon running
        os.sync()  # the files were written before the drop: none of their writeback is timed
        return path

    def daemon(self, name: str, phase: str) -> BenchDaemon:
        d = BenchDaemon(self.root, name, self.args.remote)
        self.daemons.append(d)
        d.start()
        if self.args.profile:
            out = Path(self.args.profile) / f"{phase}.txt"
            d.start_profiler(out)
            if d.profiler is not None:
                self.r.profiles[phase] = out
        return d

    def finish_daemon(self, d: BenchDaemon, phase: str | None) -> None:
        if phase is not None:
            self.r.rss[phase] = d.peak_rss_mb()
        d.stop()
        if getattr(d, "remote", None) is not None:
            rmtree(d.remote)
        lines = [line for line in d.log_tail(1 << 20).splitlines()
                 if " WARNING " in line or " ERROR " in line or "Traceback" in line]
        if lines:
            # without the timestamp, so that repeats of one message count together
            kinds = collections.Counter(line.split(" ", 2)[-1][:160] for line in lines)
            summary = "; ".join(f"{n}x {text}" for text, n in kinds.most_common(3))
            self.r.daemon_log[phase or d.dir.name] = f"{len(lines)} warning/error line(s): {summary}"
            say(f"{phase or 'daemon'}: the daemon logged {len(lines)} warning/error line(s), e.g. {lines[0]}")
        rmtree(d.dir)

    def wait_all_registered(self, d: BenchDaemon, n: int, started: float) -> float:
        """Poll cheaply until n files are registered and cached; the elapsed seconds."""
        deadline = started + self.args.timeout
        next_report = time.monotonic() + 10
        while True:
            d.alive()
            now = time.monotonic()
            if inbox_empty(d.inbox) or now >= next_report:
                st = d.status()
                done = time.perf_counter()
                if st["catalog"]["files"] >= n and st["cache"]["files"] >= n:
                    return done - started
                if now >= next_report:
                    say(f"  ... {st['catalog']['files']}/{n} registered, {st['cache']['files']} cached, "
                        f"{st['inbox']['pending']} pending, {st['inbox']['rejected']} rejected, "
                        f"problems {st['problems']}")
                    next_report = now + 10
            if time.perf_counter() > deadline:
                raise RuntimeError(f"not all {n} files were registered within {self.args.timeout} s")
            time.sleep(0.05)

    # phases

    def phase_mv(self) -> None:
        stage = self.staging("s_mv")
        d = self.daemon("d_mv", "mv")
        say(f"mv: renaming {len(self.names)} files into the daemon's inbox")
        inbox = str(d.inbox)
        src = str(stage)
        cpu0 = cpu_seconds(d)
        t0 = time.perf_counter()
        for name in self.names:
            os.rename(f"{src}/{name}", f"{inbox}/{name}")
        renamed = time.perf_counter() - t0
        self.r.seconds["mv"] = self.wait_all_registered(d, len(self.names), t0)
        self.r.cpu["mv"] = cpu_seconds(d) - cpu0
        self.r.notes["mv"] = f"renames took {renamed:.3f} s of it; daemon CPU {self.r.cpu['mv']:.2f} s"
        self.finish_daemon(d, "mv")
        rmtree(stage)

    def phase_cp(self) -> None:
        stage = self.staging("s_cp")
        d = self.daemon("d_cp", "cp")
        say(f"cp: cp -r of {len(self.names)} files into the daemon's inbox")
        cpu0 = cpu_seconds(d)
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", f"{stage}/.", f"{d.inbox}/"], check=True)
        copied = time.perf_counter() - t0
        self.r.seconds["cp"] = self.wait_all_registered(d, len(self.names), t0)
        self.r.cpu["cp"] = cpu_seconds(d) - cpu0
        self.r.notes["cp"] = (f"cp itself took {copied:.3f} s of it "
                              f"(the same cp with no daemon running: {self.cp_alone:.3f} s); "
                              f"daemon CPU {self.r.cpu['cp']:.2f} s")
        self.finish_daemon(d, "cp")
        rmtree(stage)

    def phase_annex(self) -> None:
        if not shutil.which("git-annex"):
            self.r.notes["annex"] = "git-annex not installed"
            return
        repo = self.root / "annex"
        repo.mkdir()
        run = lambda *cmd: subprocess.run(cmd, cwd=repo, env=self.env, check=True,  # noqa: E731
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        run("git", "init", "-q")
        run("git", "annex", "init", "-q", "bench")
        subprocess.run(["cp", "-r", f"{self.make_master()}/.", f"{repo}/"], check=True)
        os.sync()
        say(f"annex: git annex add . on {len(self.names)} files")
        t0 = time.perf_counter()
        run("git", "annex", "add", "-q", ".")
        self.r.seconds["annex"] = time.perf_counter() - t0
        self.r.notes["annex"] = "git annex add -q . (SHA256E backend)"
        rmtree(repo)

    def _rclone(self, verb: str) -> None:
        phase = f"rclone-{verb}"
        if not shutil.which("rclone"):
            self.r.notes[phase] = "rclone not installed"
            return
        src = self.staging(f"s_r{verb}")
        dst = self.root / f"t_r{verb}"
        dst.mkdir()
        conf = self.root / "rclone.conf"
        conf.touch()
        env = {**self.env, "RCLONE_CONFIG": str(conf)}
        say(f"{phase}: rclone {verb} of {len(self.names)} files to a local folder")
        t0 = time.perf_counter()
        subprocess.run(["rclone", verb, str(src), str(dst), *RCLONE_FLAGS], env=env, check=True)
        self.r.seconds[phase] = time.perf_counter() - t0
        count = sum(1 for _ in os.scandir(dst))
        if count != len(self.names):
            raise RuntimeError(f"rclone {verb} left {count} of {len(self.names)} files")
        self.r.notes[phase] = "rclone " + verb + " SRC DST " + " ".join(RCLONE_FLAGS)
        rmtree(src)
        rmtree(dst)

    def phase_rclone_copy(self) -> None:
        self._rclone("copy")

    def phase_rclone_move(self) -> None:
        self._rclone("move")

    def phase_rename(self) -> None:
        src = self.staging("s_ren")
        dst = self.root / "t_ren"
        dst.mkdir()
        say(f"rename: os.rename of {len(self.names)} files")
        s, t = str(src), str(dst)
        t0 = time.perf_counter()
        for name in self.names:
            os.rename(f"{s}/{name}", f"{t}/{name}")
        self.r.seconds["rename"] = time.perf_counter() - t0
        self.r.notes["rename"] = "Python os.rename loop"
        rmtree(src)
        rmtree(dst)

    def phase_big(self) -> None:
        size = self.args.big_size
        folder = self.root / "big"
        folder.mkdir()
        path = folder / "big.bin"
        say(f"big: writing {human_bytes(size)} of random content")
        digest = hashlib.sha256()
        chunk = 8 << 20
        with open(path, "wb") as f:
            left = size
            while left:
                block = os.urandom(min(chunk, left))
                digest.update(block)
                f.write(block)
                left -= len(block)
            f.flush()
            os.fsync(f.fileno())
        h = digest.hexdigest()
        # Interleaved runs, best of each: the machine may be shared, and the best run is the
        # one least disturbed. Each daemon run is a fresh daemon (fresh catalog), and the file
        # is moved back out of its cache for the next run, so every run does the full work.
        for i in range(self.args.big_repeat):
            if shutil.which("openssl"):
                warm(path)  # read once: both runs see a warm page cache
                say(f"big: openssl dgst -sha256 (run {i + 1}/{self.args.big_repeat})")
                t0 = time.perf_counter()
                out = subprocess.run(["openssl", "dgst", "-sha256", str(path)], capture_output=True, text=True,
                                     check=True, env=self.env)
                self.r.big_openssl_runs.append(time.perf_counter() - t0)
                if h not in out.stdout:
                    raise RuntimeError(f"openssl disagrees on the hash: {out.stdout!r} vs {h}")
            d = self.daemon(f"d_big{i}", "big" if i == 0 else f"big{i + 1}")
            warm(path)
            say(f"big: renaming the file into the daemon's inbox (run {i + 1}/{self.args.big_repeat})")
            client = Client(d.socket)
            try:
                t0 = time.perf_counter()
                os.rename(path, d.inbox / "big.bin")
                self.r.big_ingest_runs.append(wait_cached(d, client, h, t0, self.args.timeout) - t0)
            finally:
                client.close()
            self.r.rss["big"] = max(filter(None, [self.r.rss.get("big"), d.peak_rss_mb()]), default=None)
            d.stop()
            os.rename(d.object_path(h), path)
            self.finish_daemon(d, None)  # (with --remote, the copy it was making is dropped with it)
        rmtree(folder)

    def phase_latency(self) -> None:
        count = self.args.latency_count
        stage = self.root / "s_lat"
        stage.mkdir()
        d = self.daemon("d_lat", "latency")
        load = self.args.latency_load if self.args.remote else 0
        upload_done = None
        if load:
            # a load of `load` files renamed in and registered (untimed), so that their upload is
            # running while the single drops are timed; drops stop counting once it is done
            lstage = self.root / "s_latload"
            write_small_files(lstage, load, self.args.file_size)
            os.sync()
            say(f"latency: {load} files dropped first; timing single drops while they upload")
            t_load = time.perf_counter()
            for name in sorted(os.listdir(lstage)):
                os.rename(lstage / name, d.inbox / name)
            self.wait_all_registered(d, load, t_load)
            self.r.latency_load = load
        say(f"latency: {count} single {human_bytes(self.args.file_size)} drops, one at a time")
        client = Client(d.socket)
        try:
            for i in range(count):
                if load and upload_done is None:
                    if d.status()["uploads"]["copies"] >= load:  # untimed, between drops
                        upload_done = time.perf_counter()
                        self.r.latency_load_safe = upload_done - t_load
                        say(f"latency: the {load}-file upload finished after {i} drops")
                        break
                data = os.urandom(self.args.file_size)
                h = hashlib.sha256(data).hexdigest()
                src = stage / f"drop{i:05d}"
                fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, data)
                os.fsync(fd)
                os.close(fd)
                t0 = time.perf_counter()
                os.rename(src, d.inbox / src.name)
                t1 = wait_cached(d, client, h, t0, 60)
                self.r.latencies_ms.append((t1 - t0) * 1000)
            self.r.latency_during_load = len(self.r.latencies_ms) if load else 0
            if load and upload_done is None:
                while d.status()["uploads"]["copies"] < load + count:
                    d.alive()
                    time.sleep(0.05)
                self.r.latency_load_safe = time.perf_counter() - t_load
        finally:
            client.close()
        self.finish_daemon(d, "latency")
        rmtree(stage)


def wait_cached(d: BenchDaemon, client: Client, h: str, started: float, timeout: float) -> float:
    """perf_counter() when the daemon says `h` is registered and cached.

    First a client-side stat of the cache object path (no load on the daemon) until the
    rename into the cache has happened, then an `info` request on the one persistent
    connection every millisecond until the reply says cached=true.
    """
    obj = d.object_path(h)
    deadline = started + timeout
    while not obj.exists():
        now = time.perf_counter()
        if now > deadline:
            d.alive()
            raise RuntimeError(f"{h} did not reach the cache within {timeout} s")
        # 0.5 ms while a small file could be done; slower (at most 5 ms, under 0.5% of the
        # elapsed time) for a big one, so the poller takes no CPU from the daemon's hashing
        time.sleep(min(0.005, max(0.0005, (now - started) * 0.002)))
    while True:
        reply = client.request({"cmd": "info", "hash": h})
        now = time.perf_counter()
        if reply.get("ok") and reply["result"].get("cached"):
            return now
        if now > deadline:
            d.alive()
            raise RuntimeError(f"{h} was not registered within {timeout} s: {reply}")
        time.sleep(0.001)


# -- profiles --------------------------------------------------------------------------------

# -- the table -------------------------------------------------------------------------------

def verdict(value: float | None, goal: float | None, higher: bool) -> str:
    if value is None:
        return "n/a"
    if goal is None:
        return "info"
    return "PASS" if (value >= goal if higher else value <= goal) else "MISS"


def report(b: Bench, args: argparse.Namespace, elapsed: float) -> tuple[str, int]:
    r = b.r
    out: list[str] = []
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", args.tmp], capture_output=True,
                        text=True).stdout.strip() or "?"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    out.append("cloudmanagerd ingest benchmark (issue 3) — all figures from this one run on this machine")
    ram = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30
    out.append(f"machine: {os.cpu_count()} CPU ({cpu}), {ram:.0f} GiB RAM, "
               f"Linux {platform.release()}, Python {platform.python_version()}, data on {args.tmp} ({fs})")
    out.append(f"peers: {tool_version(['git', 'annex', 'version', '--raw'])} (git-annex), "
               f"{tool_version(['rclone', 'version'])}, {tool_version(['openssl', 'version'])}")
    if r.remote:
        out.append("daemon: a fresh `python -m cloudmanagerd` per phase, as users run it: one folder remote, "
                   "upload.redundancy 1, default concurrency, log.level info; ingest.settle 2s; cache capacity 20GiB")
    else:
        out.append("daemon: a fresh `python -m cloudmanagerd` per phase; NO remotes (uploads off, so they do not "
                   "compete with ingest); log.level warning; ingest.settle 2s; cache capacity 20GiB; inotify observer")
    out.append("setup: staged files are written and sync'ed before each timed run (no earlier writeback is timed); "
               "the daemon's own fsync/syncfs is timed")
    busy = max(r.load.values(), default=0.0) > 1.5
    out.append("1-min load average as each phase began: "
               + ", ".join(f"{p} {v:.1f}" for p, v in r.load.items())
               + (" -- the machine was busy with other work: the figures are noisy" if busy else ""))
    out.append("")

    if any(p in r.seconds or p in r.notes for p in FILE_PHASES):
        out.append(f"1. {r.files:,} files of {human_bytes(r.file_size)}: seconds until all are registered and cached "
                   "(daemon) or the tool exits (peers)")
        rows = []
        labels = {"mv": "cloudmanagerd, mv (a rename each) into inbox",
                  "cp": "cloudmanagerd, cp -r staging/. inbox/",
                  "annex": "git annex add . (fresh repo)",
                  "rclone-copy": "rclone copy SRC DST (local folder)",
                  "rclone-move": "rclone move SRC DST (local folder)",
                  "rename": "bare os.rename per file (floor)"}
        for p in FILE_PHASES:
            if p not in r.seconds and p not in r.notes:
                continue
            rows.append([labels[p], fmt(r.seconds.get(p), ".3f"), fmt(r.rate(p), ",.0f"),
                         fmt(r.rss.get(p), ".1f", " MB") if p in DAEMON_PHASES else "",
                         r.notes.get(p, "")])
        out += table(rows, ["run", "seconds", "files/s", "daemon peak RSS", "notes"], {1, 2, 3})
        out.append("")

    if "big" in r.rss or r.big_openssl is not None:
        gib = r.big_size / 2**30
        out.append(f"2. one {human_bytes(r.big_size)} file (random content; page cache warm for both: "
                   f"the file was read once before each run; best of {args.big_repeat} interleaved runs each)")
        rows = [["cloudmanagerd, mv into inbox -> registered+cached", fmt(r.big_ingest, ".3f"),
                 fmt(gib / r.big_ingest if r.big_ingest else None, ".3f"), fmt(r.rss.get("big"), ".1f", " MB"),
                 " ".join(f"{x:.3f}" for x in r.big_ingest_runs)],
                ["openssl dgst -sha256 (same file)", fmt(r.big_openssl, ".3f"),
                 fmt(gib / r.big_openssl if r.big_openssl else None, ".3f"), "",
                 " ".join(f"{x:.3f}" for x in r.big_openssl_runs)]]
        out += table(rows, ["run", "best s", "GiB/s", "daemon peak RSS", "all runs (s)"], {1, 2, 3})
        out.append("")

    lat = r.latencies_ms
    p50 = p99 = None
    if lat:
        s = sorted(lat)
        p50 = nearest_rank(s, 50)
        p99 = nearest_rank(s, 99)
        out.append(f"3. {len(lat)} single {human_bytes(r.file_size)} files dropped one at a time (rename into the "
                   "inbox; registered = an `info` reply with cached=true on one persistent connection, polled every "
                   "1 ms after the cache object appears)"
                   + (f"; {r.latency_load:,} files registered just before were uploading: {r.latency_during_load} "
                      f"of the drops were timed before that upload finished "
                      f"({fmt(r.latency_load_safe, '.1f')} s after its first rename)" if r.latency_load else ""))
        rows = [["drop -> registered", f"{p50:.1f}", f"{nearest_rank(s, 90):.1f}", f"{p99:.1f}",
                 f"{statistics.mean(s):.1f}", f"{s[0]:.1f}", f"{s[-1]:.1f}", fmt(r.rss.get("latency"), ".1f", " MB")]]
        out += table(rows, ["ms", "p50", "p90", "p99", "mean", "min", "max", "daemon peak RSS"], {1, 2, 3, 4, 5, 6, 7})
        out.append("")

    targets: list[list[str]] = []

    def ratio_row(label: str, a: float | None, b_: float | None, goal: float | None) -> None:
        value = a / b_ if a and b_ else None
        targets.append([label, fmt(value, ".2f", "x"), "report" if goal is None else f">= {goal:g}x",
                        verdict(value, goal, True)])

    for ours in ("mv", "cp"):
        if ours not in r.seconds:
            continue
        ratio_row(f"{ours}: cloudmanagerd files/s / git-annex files/s", r.rate(ours), r.rate("annex"), 20)
        ratio_row(f"{ours}: cloudmanagerd files/s / rclone copy files/s", r.rate(ours), r.rate("rclone-copy"), 1)
        ratio_row(f"{ours}: cloudmanagerd files/s / rclone move files/s", r.rate(ours), r.rate("rclone-move"), None)
        ratio_row(f"{ours}: cloudmanagerd files/s / bare rename files/s", r.rate(ours), r.rate("rename"), None)
    if r.big_ingest is not None or r.big_openssl is not None:
        ratio_row("1 file: cloudmanagerd GiB/s / openssl GiB/s",
                  1 / r.big_ingest if r.big_ingest else None, 1 / r.big_openssl if r.big_openssl else None, 0.9)
    if lat:
        targets.append(["drop-to-registered p50", f"{p50:.1f} ms", "<= 20 ms", verdict(p50, 20, False)])
        targets.append(["drop-to-registered p99", f"{p99:.1f} ms", "<= 100 ms", verdict(p99, 100, False)])
    for phase in ("mv", "cp", "big", "latency"):
        if phase in r.rss:
            targets.append([f"daemon peak RSS (VmHWM), {phase} phase", fmt(r.rss[phase], ".1f", " MB"),
                            f"<= {RSS_TARGET_MB:g} MB", verdict(r.rss[phase], RSS_TARGET_MB, False)])
    misses = sum(1 for t in targets if t[3] == "MISS")
    if targets:
        out.append("targets")
        out += table(targets, ["measure", "measured", "target", "result"], {1})
        out.append("")
    if r.daemon_log:
        out.append("the daemon's log (level warning) during each phase:")
        out += [f"  {phase}: {text}" for phase, text in r.daemon_log.items()]
        out.append("")
    out.append(f"{sum(1 for t in targets if t[3] == 'PASS')} targets passed, {misses} missed "
               f"(bench wall time {elapsed:.0f} s; MB = 10^6 bytes)")

    out += profile_sections(r.profiles, "phase ")
    return "\n".join(out), misses


# -- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=10_000, help="small files in the file phases (default 10000)")
    p.add_argument("--file-size", type=parse_size, default=4096, help="size of each small file (default 4KiB)")
    p.add_argument("--big-size", type=parse_size, default=1 << 30, help="size of the big file (default 1GiB)")
    p.add_argument("--big-repeat", type=int, default=3,
                   help="interleaved runs of openssl and of the daemon on the big file; best of each (default 3)")
    p.add_argument("--latency-count", type=int, default=300, help="single drops in the latency phase (default 300)")
    p.add_argument("--remote", action="store_true",
                   help="run each daemon as users run it: one folder remote, redundancy 1, log level info")
    p.add_argument("--latency-load", type=int, default=10_000, metavar="N",
                   help="with --remote: drop N files first and time the single drops while they upload "
                        "(default 10000; 0: none)")
    p.add_argument("--only", action="append", default=[],
                   help=f"phases to run, comma separated: {','.join(ALL_PHASES)} or files (default all)")
    p.add_argument("--quick", action="store_true", help="small sizes: 1000 files, 128MiB, 50 drops")
    p.add_argument("--tmp", default="/tmp", help="where the temp data folder goes (default /tmp)")
    p.add_argument("--timeout", type=float, default=1800, help="give up on one phase after this many seconds")
    p.add_argument("--profile", metavar="DIR", help="record the daemon with py-spy during each daemon phase")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--keep", action="store_true", help="keep the temp data folder")
    add_json_arg(p)
    args = p.parse_args(argv)
    if args.quick:
        args.files = min(args.files, 1000)
        args.big_size = min(args.big_size, 128 << 20)
        args.latency_count = min(args.latency_count, 50)
        args.latency_load = min(args.latency_load, 5000)
    chosen: list[str] = []
    for item in args.only or ["all"]:
        for name in filter(None, (s.strip() for s in item.split(","))):
            expanded = ALL_PHASES if name == "all" else FILE_PHASES if name == "files" else [name]
            for phase in expanded:
                if phase not in ALL_PHASES:
                    p.error(f"--only: unknown phase {phase!r}; choose from {', '.join(ALL_PHASES)}, files, all")
                if phase not in chosen:
                    chosen.append(phase)
    args.phases = [ph for ph in ALL_PHASES if ph in chosen]
    check_profile_arg(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench(args, "cmb-", Bench, run_phases, report, f"; phases: {', '.join(args.phases)}")


def run_phases(bench: Bench) -> None:
    for phase in bench.args.phases:
        bench.r.load[phase] = os.getloadavg()[0]
        getattr(bench, "phase_" + phase.replace("-", "_"))()
        os.sync()  # nothing a phase left dirty is flushed during the next one


if __name__ == "__main__":
    sys.exit(main())
