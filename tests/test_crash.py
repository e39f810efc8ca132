"""Crash safety of a running daemon: SIGKILL storms, the durable syscall order, cross-mount ingest.

The daemon runs as a subprocess on real folders; each test checks what a user would see
after the crash: every dropped file registered with its true SHA-256 (or still in the
inbox, whole), no temp files, no half-done catalog rows, every object backed by a row.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cloudmanagerd.remotes import directory
from conftest import CI, Daemon, sha256_of, wait_for

MiB = 1 << 20


# -- helpers -----------------------------------------------------------------------------------

def inbox_files(inbox: Path) -> dict[str, Path]:
    """Every non-directory entry under the inbox, by its relative name."""
    found = {}
    for folder, _dirs, names in os.walk(inbox):
        for name in names:
            path = Path(folder) / name
            found[str(path.relative_to(inbox))] = path
    return found


def cache_objects(cache: Path) -> dict[str, Path]:
    """Every object under <cache>/<h[:2]>/, by name (the tmp folder excluded)."""
    found = {}
    for folder in cache.iterdir():
        if folder.name == "tmp" or not folder.is_dir():
            continue
        for obj in folder.iterdir():
            found[obj.name] = obj
    return found


def catalog_rows(d: Daemon) -> dict[str, list]:
    """The catalog tables that matter here, read straight from the SQLite file (daemon stopped)."""
    path = Path(d.config["state"]) / "catalog.sqlite3"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {
            "ingests": conn.execute("SELECT hash, name FROM ingests").fetchall(),
            "files": conn.execute("SELECT hash, name, size FROM files").fetchall(),
            "cache_entries": conn.execute("SELECT hash FROM cache_entries").fetchall(),
            "copies": conn.execute("SELECT hash, remote FROM copies WHERE bad=0").fetchall(),
        }
    finally:
        conn.close()


def registered(d: Daemon) -> dict[str, dict]:
    return {f["hash"]: f for f in d.files()}


def check_nothing_half_done(d: Daemon) -> dict[str, list]:
    """After a stop: no ingest rows, no temp files, every object has its row and its true bytes."""
    rows = catalog_rows(d)
    assert rows["ingests"] == [], f"half-done ingests left in the catalog: {rows['ingests']}"
    assert list((d.cache / "tmp").iterdir()) == [], "temp files left in the cache"
    objects = cache_objects(d.cache)
    for name, path in objects.items():
        assert sha256_of(path) == name, f"cache object {name} does not hold the bytes of its name"
    in_catalog = {h for h, _n, _s in rows["files"]}
    in_cache = {h for (h,) in rows["cache_entries"]}
    assert set(objects) == in_cache, (f"objects without rows: {sorted(set(objects) - in_cache)}; "
                                      f"rows without objects: {sorted(in_cache - set(objects))}")
    assert in_cache <= in_catalog
    return rows


@dataclass
class Feeder:
    """Drops files into the inbox continuously, the ways users do, and records what it dropped."""

    inbox: Path
    staging: Path
    seed: int
    produced: dict[str, str] = field(default_factory=dict)  # relative name -> sha256
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._stop = threading.Event()
        self._quota = 0  # files it may still drop: bounds the work, however slow the machine
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="feeder")

    def allow(self, n: int) -> None:
        with self._cond:
            self._quota += n
            self._cond.notify()

    def __enter__(self) -> Feeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the feeder thread did not stop"

    def _run(self) -> None:
        try:
            i = 0
            while not self._stop.is_set():
                with self._cond:
                    self._cond.wait_for(lambda: self._quota > 0 or self._stop.is_set())
                    if self._stop.is_set():
                        return
                    self._quota -= 1
                self._drop(i)
                i += 1
                # pacing only (a steady stream rather than a flood), not synchronization
                self._stop.wait(self.rng.uniform(0.005, 0.04))
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def _drop(self, i: int) -> None:
        big = i % 9 == 4
        size = self.rng.randint(1 * MiB, 4 * MiB) if big else self.rng.randint(0, 64 << 10)
        data = os.urandom(size) if size else b""
        if size == 0:
            data = b"empty-%d" % i  # keep every content unique
        rel = f"f{i:05d}.bin"
        if i % 7 == 3:
            rel = f"sub{i % 3}/{rel}"
        kind = i % 2
        target = self.inbox / rel
        target.parent.mkdir(exist_ok=True)
        if kind == 0:   # written in place, as `cp` does
            with open(target, "wb") as f:
                f.write(data)
        else:           # renamed in from a staging folder on the same mount, as `mv` does
            staged = self.staging / f"s{i}"
            staged.write_bytes(data)
            os.rename(staged, target)
        self.produced[rel] = hashlib.sha256(data).hexdigest()


# -- 1. SIGKILL storm ------------------------------------------------------------------------------

def test_sigkill_storm_loses_nothing_and_leaves_nothing_half_done(daemon_factory, workdir: Path) -> None:
    seed = int(os.environ.get("CM_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    why = f"(CM_CRASH_SEED={seed})"
    d = daemon_factory(remotes=2)
    staging = workdir / "staging"
    staging.mkdir()
    kills = []

    with Feeder(d.inbox, staging, seed) as feeder:
        for round_ in range(8):
            how = rng.choice(["registered", "registered", "jitter", "at-start"])
            base = d.status()["catalog"]["files"]
            feeder.allow(20)
            if how == "registered":
                wait_for(lambda: d.status()["catalog"]["files"] > base, timeout=30,
                         message=f"one more file registered before kill {round_} {why}")
            elif how == "jitter":
                threading.Event().wait(rng.uniform(0.0, 0.5))  # a random instant to kill at, on purpose
            d.kill()
            kills.append(how)
            d.start()
        assert feeder.error is None, feeder.error
    produced = dict(feeder.produced)
    assert len(produced) > 50, f"the feeder produced only {len(produced)} files {why}"

    # Let it drain: every file registered with its true hash, the inbox empty, two copies each.
    wanted = set(produced.values())
    wait_for(lambda: wanted <= set(registered(d)), timeout=60, interval=0.25,
             message=f"all {len(wanted)} dropped files registered {why}")
    wait_for(lambda: not inbox_files(d.inbox), timeout=30, interval=0.1, message=f"the inbox emptied {why}")
    files = wait_for(lambda: (lambda fs: fs if all(len(f["copies"]) == 2 for f in fs.values()) else None)(
        registered(d)), timeout=60, interval=0.25, message=f"every file with 2 copies {why}")
    assert d.stop() == 0

    assert set(files) == wanted, f"registered files that nobody dropped: {sorted(set(files) - wanted)} {why}"
    rows = check_nothing_half_done(d)
    names = {h: bytes(n) for h, n, _s in rows["files"]}
    objects = cache_objects(d.cache)
    for rel, h in produced.items():
        assert names[h] == rel.encode(), f"{rel} registered under the name {names[h]!r} {why}"
        assert h in objects, f"{rel} ({h}) is registered but not in the cache {why}"
    copies = {}
    for h, remote in rows["copies"]:
        copies.setdefault(h, set()).add(remote)
    for h in wanted:
        assert copies.get(h) == {"r0", "r1"}, f"{h}: copies on {copies.get(h)} {why}"
        for remote in d.config["remotes"]:
            assert sha256_of(Path(remote["path"]) / h[:2] / h) == h
    assert not list(staging.iterdir())
    print(f"SIGKILL storm: {len(produced)} files, kills: {kills} {why}")


# -- 2. the durable order, recorded with strace --------------------------------------------------------

TRACED = "fsync,fdatasync,rename,renameat,renameat2,syncfs,unlink,unlinkat"
LINE = re.compile(r"^(?P<tid>\d+)\s+(?P<time>[\d:.]+)\s+(?P<rest>.*)$")
CALL = re.compile(r"^(?P<name>\w+)\((?P<args>.*?)(?:\)\s+=\s+(?P<ret>-?\d+).*| <unfinished \.\.\.>)$")
RESUMED = re.compile(r"^<\.\.\. (?P<name>\w+) resumed>.*\)\s+=\s+(?P<ret>-?\d+).*$")


@dataclass
class Syscall:
    tid: int
    name: str
    args: str
    start: int            # line index where the call began
    end: int | None = None  # line index where it returned
    ret: int | None = None

    def fd_path(self) -> str | None:
        m = re.match(r"\d+<(.*?)>", self.args)
        return m.group(1) if m else None


def parse_strace(text: str) -> list[Syscall]:
    calls: list[Syscall] = []
    open_calls: dict[tuple[int, str], Syscall] = {}
    for index, raw in enumerate(text.splitlines()):
        m = LINE.match(raw)
        if not m:
            continue
        tid, rest = int(m["tid"]), m["rest"]
        if r := RESUMED.match(rest):
            call = open_calls.pop((tid, r["name"]), None)
            if call is not None:
                call.end, call.ret = index, int(r["ret"])
            continue
        c = CALL.match(rest)
        if not c:
            continue  # signals, exits
        call = Syscall(tid, c["name"], c["args"], index)
        if c["ret"] is None:
            open_calls[(tid, call.name)] = call
        else:
            call.end, call.ret = index, int(c["ret"])
        calls.append(call)
    return [c for c in calls if c.end is not None]


def require_strace() -> str:
    path = shutil.which("strace")
    if path is None:
        message = "strace is not installed (Debian package strace; `make test` installs it)"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def children_of(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


@contextlib.contextmanager
def traced(d: Daemon, trace: Path, syscalls: str = TRACED) -> Iterator[None]:
    """Run the daemon under `strace -f` (into `trace`) for the block; then stop it with SIGTERM."""
    strace = require_strace()
    plain = d.command
    d.command = lambda *extra: [strace, "-f", "-tt", "-y", "-e", f"trace={syscalls}", "-o", str(trace),
                                *plain(*extra)]
    d.start()
    daemon_pid = wait_for(lambda: children_of(d.proc.pid), message="the traced daemon process")[0]
    try:
        yield
        os.kill(daemon_pid, signal.SIGTERM)  # the daemon itself, so that strace records to the end
        assert d.proc.wait(60) == 0, d.log()[-2000:]
    finally:
        # A killed strace would detach and leave the daemon running: kill the daemon first.
        if d.proc.poll() is None:
            os.kill(daemon_pid, signal.SIGKILL)
            d.proc.wait(30)
        d._close_log()


def test_ingest_follows_the_durable_order(daemon_factory, workdir: Path) -> None:
    trace = workdir / "strace.log"
    d = daemon_factory(remotes=1, start=False)
    with traced(d, trace):
        data = os.urandom(300_000)
        h = hashlib.sha256(data).hexdigest()
        (d.inbox / "drop.bin").write_bytes(data)
        wait_for(lambda: h in registered(d) and registered(d)[h]["cached"], message="drop.bin registered")

    calls = parse_strace(trace.read_text(errors="replace"))
    inbox, cache_dir = str(d.inbox), str(d.cache / h[:2])
    wal = str(Path(d.config["state"]) / "catalog.sqlite3-wal")
    renames = [c for c in calls if c.name.startswith("rename") and '"drop.bin"' in c.args and f'"{h}"' in c.args]
    assert len(renames) == 1, f"expected one rename of drop.bin into the cache, got {renames}"
    rename = renames[0]
    assert rename.ret == 0 and rename.fd_path() == inbox and f"{cache_dir}>" in rename.args, rename.args
    ingest = [c for c in calls if c.tid == rename.tid]  # the ingest thread's own calls, in order

    def syncs_of(path: str, calls_: list[Syscall]) -> list[Syscall]:
        return [c for c in calls_ if c.name in ("fsync", "fdatasync") and c.fd_path() == path and c.ret == 0]

    before = [c for c in ingest if c.end < rename.start]
    after = [c for c in ingest if c.start > rename.end]
    assert syncs_of(wal, before), "no fsync of the catalog WAL (the 'ingesting' row) before the rename"

    obj = str(d.cache / h[:2] / h)
    file_sync = syncs_of(obj, after) + [c for c in after if c.name == "syncfs" and c.ret == 0]
    inbox_sync = syncs_of(inbox, after)
    folder_sync = syncs_of(cache_dir, after)
    assert file_sync, f"the moved file was not fsynced after the rename: {[(c.name, c.args) for c in after]}"
    assert inbox_sync, "the inbox folder was not fsynced after the rename"
    assert folder_sync, f"the cache folder {cache_dir} was not fsynced after the rename"
    durable = max(file_sync[0].end, inbox_sync[0].end, folder_sync[0].end)
    assert syncs_of(wal, [c for c in after if c.start > durable]), \
        "no WAL fsync (the 'cached' commit) after the object and both folders were made durable"
    assert not [c for c in calls if c.name.startswith("unlink") and '"drop.bin"' in c.args], \
        "a same-mount ingest must be a rename, not a copy and unlink"
    check_nothing_half_done(d)


# -- 3. cross-mount ingest (EXDEV) ------------------------------------------------------------------

@pytest.fixture
def other_mount(workdir: Path) -> Iterator[Path]:
    """A small tmpfs, so that the cache lives on another filesystem than the inbox."""
    mnt = workdir / "othermount"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        message = f"cannot mount a tmpfs (needs root): {done.stderr.strip()}"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_cross_mount_ingest_copies_fsyncs_and_unlinks(other_mount: Path, daemon_factory, workdir: Path) -> None:
    d = daemon_factory(remotes=1, cache={"path": str(other_mount / "cache"), "capacity": "100MiB"})
    assert os.stat(d.inbox).st_dev != os.stat(d.cache).st_dev
    staging = workdir / "staging"
    staging.mkdir()
    dropped = {}
    for i in range(6):
        data = os.urandom(i * 200_000 + 1)
        rel = f"x{i}.bin" if i % 3 else f"deep/x{i}.bin"
        (d.inbox / rel).parent.mkdir(exist_ok=True)
        if i % 2:
            (staging / "s").write_bytes(data)
            os.rename(staging / "s", d.inbox / rel)
        else:
            (d.inbox / rel).write_bytes(data)
        dropped[rel] = hashlib.sha256(data).hexdigest()

    wait_for(lambda: set(dropped.values()) <= {h for h, f in registered(d).items() if f["cached"]},
             message="the cross-mount files registered")
    wait_for(lambda: not inbox_files(d.inbox), message="the inbox emptied after the copies")
    files = registered(d)
    for rel, h in dropped.items():
        assert files[h]["name"] == rel
    assert d.stop() == 0
    check_nothing_half_done(d)
    assert set(cache_objects(d.cache)) == set(dropped.values())


def test_sigkill_during_a_cross_mount_copy(other_mount: Path, daemon_factory, workdir: Path) -> None:
    d = daemon_factory(remotes=1, cache={"path": str(other_mount / "cache"), "capacity": "100MiB"})
    tmp = d.cache / "tmp"
    data = os.urandom(48 * MiB)
    h = hashlib.sha256(data).hexdigest()
    staged = workdir / "big.bin"
    staged.write_bytes(data)
    os.rename(staged, d.inbox / "big.bin")

    # Kill the moment the copy's temp file appears (or, if the copy was too quick to see, at once).
    deadline = time.monotonic() + 30
    mid_copy = False
    while time.monotonic() < deadline:
        if any(os.scandir(tmp)):
            mid_copy = True
            break
        if not (d.inbox / "big.bin").exists():
            break
        time.sleep(0.0005)
    d.kill()

    in_inbox = (d.inbox / "big.bin").exists()
    if in_inbox:
        assert sha256_of(d.inbox / "big.bin") == h, "the inbox file was damaged by the interrupted copy"
    assert in_inbox or (d.cache / h[:2] / h).exists(), "the file is neither in the inbox nor in the cache"

    d.start()
    wait_for(lambda: h in registered(d) and registered(d)[h]["cached"], timeout=30,
             message="the big file registered after the restart")
    wait_for(lambda: not inbox_files(d.inbox), message="the inbox emptied")
    assert d.stop() == 0
    rows = check_nothing_half_done(d)
    assert [(hh, bytes(n), s) for hh, n, s in rows["files"]] == [(h, b"big.bin", 48 * MiB)]
    print(f"killed {'during the copy' if mid_copy else 'after the copy'}")


# -- 4. copies made durable in batches (issue 12) ----------------------------------------------------

def drop_many(d: Daemon, staging: Path, count: int, size: int = 3000) -> set[str]:
    """`count` small files staged, then renamed into the inbox at once (so that uploads batch); their hashes."""
    staging.mkdir()
    hashes = set()
    for i in range(count):
        data = os.urandom(size)
        (staging / f"b{i:04d}").write_bytes(data)
        hashes.add(hashlib.sha256(data).hexdigest())
    for i in range(count):
        os.rename(staging / f"b{i:04d}", d.inbox / f"b{i:04d}")
    return hashes


def remote_entries(path: Path) -> tuple[dict[str, Path], list[str]]:
    """A folder remote's copies by name, and the names of its temp files."""
    copies, temps = {}, []
    for sub in path.iterdir():
        if sub.is_dir() and len(sub.name) == 2:  # not the reserved catalog-snapshot folder
            for p in sub.iterdir():
                if p.name.startswith("."):
                    temps.append(p.name)
                else:
                    copies[p.name] = p
    return copies, temps


def test_batched_uploads_record_no_copy_before_it_is_durable(daemon_factory, workdir: Path) -> None:
    """strace: in the upload thread that renames a copy to its final name, its bytes were synced
    after that thread's previous catalog write, and its folder is synced before the next one."""
    trace = workdir / "strace.log"
    d = daemon_factory(remotes=1, start=False)
    with traced(d, trace, f"{TRACED},pwrite64"):
        wanted = drop_many(d, workdir / "staging", 40)
        wait_for(lambda: all(h in (fs := registered(d)) and fs[h]["copies"] for h in wanted), timeout=60,
                 interval=0.25, message="40 files with their copy")

    calls = parse_strace(trace.read_text(errors="replace"))
    wal = str(Path(d.config["state"]) / "catalog.sqlite3-wal")
    remote = d.config["remotes"][0]["path"]

    def is_sync(c: Syscall, paths: tuple[str, ...] = ()) -> bool:
        return c.ret == 0 and (c.name == "syncfs" or (c.name in ("fsync", "fdatasync")
                                                       and (not paths or c.fd_path() in paths)))

    renames = {}
    for c in calls:
        m = re.search(r'"\.([0-9a-f]{64})\.[0-9a-f]{8}\.tmp", \d+<[^>]*>, "([0-9a-f]{64})"', c.args)
        if c.name.startswith("rename") and m and m[1] == m[2] and m[1] in wanted and c.ret == 0:
            renames[m[1]] = c
    assert set(renames) == wanted, f"{len(wanted - set(renames))} copies were not renamed from a temp file"
    assert len({c.tid for c in renames.values()}) < len(wanted), "no two copies were sent in one batch"
    for h, rename in renames.items():
        mine = [c for c in calls if c.tid == rename.tid]
        wal_writes = [c for c in mine if c.name == "pwrite64" and c.fd_path() == wal]
        last_write = max((c.end for c in wal_writes if c.end < rename.start), default=-1)
        assert [c for c in mine if last_write < c.start and c.end < rename.start and is_sync(c)], \
            f"copy {h[:12]} renamed to its final name before its bytes were synced"
        record = min((c.start for c in wal_writes if c.start > rename.end), default=None)
        assert record is not None, f"copy {h[:12]}: no catalog write after its rename"
        folder = os.path.join(remote, h[:2])
        assert [c for c in mine if rename.end < c.start and c.end < record and is_sync(c, (folder,))], \
            f"copy {h[:12]} recorded before its folder was synced"


def test_sigkill_during_batched_uploads_records_only_complete_copies(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(remotes=1)
    remote = Path(d.config["remotes"][0]["path"])
    wanted = drop_many(d, workdir / "staging", 400)
    rng = random.Random()
    for _ in range(3):
        wait_for(lambda: d.status()["uploads"]["copies"] > 0 or d.status()["uploads"]["active"], timeout=60,
                 message="uploads under way")
        threading.Event().wait(rng.uniform(0.0, 0.3))  # a random instant to kill at, on purpose
        d.kill()
        recorded = {h for h, _ in catalog_rows(d)["copies"]}
        copies, temps = remote_entries(remote)
        assert recorded <= set(copies), f"{len(recorded - set(copies))} copies recorded but not on the remote"
        for h in recorded:
            assert sha256_of(copies[h]) == h
        assert all(directory.LEFTOVER.fullmatch(t) for t in temps), temps
        d.start()
    wait_for(lambda: d.status()["uploads"]["copies"] >= len(wanted), timeout=120, interval=0.25,
             message="every file with its copy")
    assert d.stop() == 0
    check_nothing_half_done(d)
    copies, temps = remote_entries(remote)
    assert set(copies) == wanted and all(sha256_of(p) == h for h, p in copies.items())
    # the temp files killed uploads left are what the hourly clean-up removes once an hour old
    assert directory.DirectoryRemote("r0", str(remote)).clean_leftovers(time.time() + 3601, 3600) == len(temps)
    assert remote_entries(remote)[1] == []
