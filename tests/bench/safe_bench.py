"""Time until safe (issue 12): small files dropped into a daemon with one folder remote, as users run it.

In one run, on the same files (default 10,000 x 4 KiB, random content):

  daemon   a fresh `python -m cloudmanagerd` with one folder remote, redundancy 1 and every other
           setting at its default (log level info, upload.concurrency 4); the files are renamed
           one by one from a staging folder into its inbox (what `mv` does on one filesystem).
           "registered": from the first rename until `status` says catalog.files and cache.files
           are N. "safe": from the first rename until `status` says uploads.copies is N (a copy is
           recorded only once it is durable on the remote).
  rclone   `rclone copy SRC DST --transfers 4 --checkers 8 -q` to a local folder on the same
           filesystem (rclone's defaults), and the same followed by `sync` (what a user must add
           for the copies to be durable): the peer figures for "registered" and "safe".

Staged files are written and `sync`ed before each timed run, so no earlier writeback is timed; a
finished phase's files are put aside and deleted at the end, so no timed run pays for their deletion.
The daemon's own fsync/syncfs is timed. Ratios are the peer's seconds over the daemon's (higher is
better for the daemon), best of `--repeat` interleaved runs of each (default 2); targets (issue 12): registered >= 1x rclone copy, safe >= 1x rclone copy
&& sync. The machine may be shared: the 1-minute load average is printed with each phase.

    .venv/bin/python tests/bench/safe_bench.py                 # 10,000 x 4 KiB (about 2 minutes)
    .venv/bin/python tests/bench/safe_bench.py --quick         # 1,000 files
    .venv/bin/python tests/bench/safe_bench.py --profile /tmp/prof   # py-spy on the daemon
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cloudmanagerd.remotes.base import RESERVED

from benchlib import (
    InboxDaemon,
    add_json_arg,
    check_profile_arg,
    human_bytes,
    parse_size,
    peer_env,
    process_cpu_split,
    profile_sections,
    rmtree,
    run_bench,
    say,
    table,
    tool_version,
    write_small_files,
)

RCLONE_FLAGS = ["--transfers", "4", "--checkers", "8", "-q"]  # rclone's defaults, said out loud


@dataclass
class Results:
    runs: dict[str, list[float]] = field(default_factory=dict)  # "registered", "safe", "rclone copy", ...
    rss: float | None = None
    cpu: list[tuple[float, float]] = field(default_factory=list)  # the daemon's (user, system) s, each run
    load: dict[str, list[float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    profiles: dict[str, Path] = field(default_factory=dict)


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.r = Results()
        self.daemons: list[InboxDaemon] = []
        self.master: Path | None = None
        self.names: list[str] = []

    def make_master(self) -> Path:
        if self.master is None:
            self.master = self.root / "master"
            self.names = write_small_files(self.master, self.args.files, self.args.file_size)
        return self.master

    def staging(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        subprocess.run(["cp", "-r", f"{self.make_master()}/.", f"{path}/"], check=True)
        os.sync()  # none of the staged files' writeback is timed
        return path

    def discard(self, path: Path) -> None:
        """Put a finished phase's folder aside, to be removed with the rest at the end: 20,000 files
        deleted just before a timed phase made each file it created cost 0.2-0.7 ms of kernel time
        (ext4 skips inodes freed in the last 30 s, looking at each: perf showed a fifth of the
        daemon's CPU in recently_deleted), a cost of the bench, not of what it measures."""
        if self.args.delete_between:
            rmtree(path)
            return
        trash = self.root / "trash"
        trash.mkdir(exist_ok=True)
        os.rename(path, trash / str(len(os.listdir(trash))))

    def record(self, key: str, seconds: float) -> None:
        self.r.runs.setdefault(key, []).append(seconds)

    def best(self, key: str) -> float | None:
        return min(self.r.runs.get(key, []), default=None)

    def phase_daemon(self, rep: int) -> None:
        self.r.load.setdefault("daemon", []).append(os.getloadavg()[0])
        stage = self.staging("s_daemon")
        remote = self.root / "remote"
        remote.mkdir()
        remotes = [] if self.args.no_remote else [{"name": "nas", "type": "directory", "path": str(remote)}]
        d = InboxDaemon(self.root, f"d{rep}", remotes=remotes, log_level="info",
                        **({} if self.args.no_remote else {"upload": {"redundancy": 1}}))
        self.daemons.append(d)
        d.start()
        if self.args.profile and rep == 0:
            out = Path(self.args.profile) / "daemon.txt"
            d.start_profiler(out, extra=self.args.profile_flags.split())
            if d.profiler is not None:
                self.r.profiles["daemon"] = out
        n = len(self.names)
        say(f"daemon: renaming {n} files into the inbox (one folder remote, redundancy 1)")
        inbox, src = str(d.inbox), str(stage)
        assert d.proc is not None
        cpu0 = process_cpu_split(d.proc.pid)
        t0 = time.perf_counter()
        for name in self.names:
            os.rename(f"{src}/{name}", f"{inbox}/{name}")
        deadline = t0 + self.args.timeout
        next_report = time.monotonic() + 10
        registered = None
        while True:
            d.alive()
            st = d.status()
            now = time.perf_counter()
            if registered is None and st["catalog"]["files"] >= n and st["cache"]["files"] >= n:
                registered = now - t0
                self.record("registered", registered)
                say(f"  all {n} registered after {registered:.2f} s")
            if st["uploads"]["copies"] >= n or (self.args.no_remote and registered is not None):
                self.record("safe", now - t0)
                cpu1 = process_cpu_split(d.proc.pid)
                self.r.cpu.append((cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]))
                say(f"  all {n} safe after {now - t0:.2f} s; daemon CPU user {self.r.cpu[-1][0]:.2f} s, "
                    f"system {self.r.cpu[-1][1]:.2f} s")
                break
            if time.monotonic() >= next_report:
                say(f"  ... {st['catalog']['files']}/{n} registered, {st['uploads']['copies']} copies, "
                    f"{st['uploads']['active']} active, {st['uploads']['retrying']} retrying, "
                    f"problems {st['problems']}")
                next_report = time.monotonic() + 10
            if now > deadline:
                raise RuntimeError(f"not all {n} files were safe within {self.args.timeout} s")
            time.sleep(0.05)
        self.r.rss = max(self.r.rss or 0.0, d.peak_rss_mb() or 0.0)
        self.r.problems = st["problems"]
        d.stop_profiler()
        d.stop()
        # the hash folders only: the reserved folder holds the daemon's catalog snapshots
        copies = sum(1 for sub in remote.iterdir() if sub.name != RESERVED
                     for f in sub.iterdir() if not f.name.startswith("."))
        if copies != n and not self.args.no_remote:
            raise RuntimeError(f"the remote folder holds {copies} copies, not {n}")
        for path in (d.dir, stage, remote):
            self.discard(path)

    def phase_rclone(self, then_sync: bool) -> None:
        key = "rclone copy && sync" if then_sync else "rclone copy"
        if not shutil.which("rclone"):
            say("rclone is not installed: no peer figures")
            return
        self.r.load.setdefault(key, []).append(os.getloadavg()[0])
        src = self.staging("s_rclone")
        dst = self.root / "t_rclone"
        dst.mkdir()
        conf = self.root / "rclone.conf"
        conf.touch()
        env = {**peer_env(), "RCLONE_CONFIG": str(conf)}
        say(f"{key}: {len(self.names)} files to a local folder")
        t0 = time.perf_counter()
        subprocess.run(["rclone", "copy", str(src), str(dst), *RCLONE_FLAGS], env=env, check=True)
        if then_sync:
            subprocess.run(["sync"], check=True)
        self.record(key, time.perf_counter() - t0)
        count = sum(1 for _ in os.scandir(dst))
        if count != len(self.names):
            raise RuntimeError(f"rclone copy left {count} of {len(self.names)} files")
        self.discard(src)
        self.discard(dst)


def run(b: Bench) -> None:
    b.make_master()
    for rep in range(b.args.repeat):  # interleaved: a busy spell of the machine hits both sides
        say(f"round {rep + 1}/{b.args.repeat}")
        if "rclone" in b.args.only:
            b.phase_rclone(False)
            os.sync()
            b.phase_rclone(True)
            os.sync()
        if "daemon" in b.args.only:
            b.phase_daemon(rep)
            os.sync()


def report(b: Bench, args: argparse.Namespace, elapsed: float) -> tuple[str, int]:
    r = b.r
    n = args.files
    out = [f"safe_bench: {n} x {human_bytes(args.file_size)}, one folder remote, redundancy 1, default settings; "
           f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}; {elapsed:.0f} s in all",
           f"peer: {tool_version(['rclone', 'version'])}; best of {args.repeat} interleaved run(s) each; "
           "load (1 min) as each phase began: "
           + ", ".join(f"{k} {'/'.join(f'{v:.2f}' for v in vs)}" for k, vs in r.load.items()), ""]
    misses = 0
    rows = []

    def row(label: str, ours: float | None, peer: float | None, peer_label: str) -> None:
        nonlocal misses
        ratio = peer / ours if ours and peer else None
        verdict = "—" if ratio is None else "PASS" if ratio >= 1 else "MISS"
        misses += verdict == "MISS"
        rows.append([f"{ratio:.2f}x" if ratio else "—", verdict, label,
                     f"{ours:.2f} s ({n / ours:.0f} files/s)" if ours else "—",
                     f"{peer:.2f} s ({n / peer:.0f} files/s)" if peer else "—", peer_label])
    row("all registered", b.best("registered"), b.best("rclone copy"), "rclone copy")
    row("all safe", b.best("safe"), b.best("rclone copy && sync"), "rclone copy && sync")
    out += table(rows, ["ratio", "target >=1x", "figure", "cloudmanagerd", "peer", "peer is"], {0, 3, 4})
    out.append("")
    out += [f"runs, {key}: " + ", ".join(f"{v:.2f}" for v in vs) + " s" for key, vs in r.runs.items()]
    if r.cpu:
        out.append("daemon CPU until safe (user + system s), each run: "
                   + ", ".join(f"{u:.2f} + {s:.2f}" for u, s in r.cpu)
                   + " (less sensitive than seconds to other work on the machine)")
    out.append(f"daemon peak RSS: {r.rss:.1f} MB" if r.rss is not None else "daemon peak RSS: —")
    if r.problems:
        out.append(f"daemon problems at the end: {r.problems}")
    out += profile_sections(r.profiles)
    return "\n".join(out), misses


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=10_000, help="small files (default 10000)")
    p.add_argument("--file-size", type=parse_size, default=4096, help="size of each file (default 4KiB)")
    p.add_argument("--repeat", type=int, default=2, help="interleaved runs of each side; best counted (default 2)")
    p.add_argument("--quick", action="store_true", help="1000 files, one run")
    p.add_argument("--tmp", default="/tmp", help="where the temp data folder goes (default /tmp)")
    p.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    p.add_argument("--profile", metavar="DIR", help="record the daemon with py-spy")
    p.add_argument("--profile-flags", default="", metavar="FLAGS",
                   help="more py-spy record flags, e.g. '--idle' or '--gil' (one string)")
    p.add_argument("--only", default="rclone,daemon", type=lambda v: set(v.split(",")),
                   help="the sides to run, of rclone,daemon (default both)")
    p.add_argument("--no-remote", action="store_true",
                   help="the daemon with no remote at all (registered only): what uploads cost ingest")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--keep", action="store_true", help="keep the temp data folder")
    p.add_argument("--delete-between", action="store_true",
                   help="delete each phase's files when it ends (as before), not all at the end")
    add_json_arg(p)
    args = p.parse_args(argv)
    if args.quick:
        args.files = min(args.files, 1000)
        args.repeat = 1
    check_profile_arg(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench(args, "cms-", Bench, run, report)


if __name__ == "__main__":
    sys.exit(main())
