"""The bounded cache end to end (issue 5): a real daemon, real directory remotes, cloudmanagerctl.

What a user would notice: the cache never holds more than its budget on disk, nothing is
evicted before it has its copies, files wait in the inbox while there is no room and come in
by themselves once there is, every byte `get` hands back is the true one (even when a remote
copy rotted), pins hold, and `verify` / `rm` / bad input behave as SPEC says.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from conftest import Daemon, wait_for

pytestmark = pytest.mark.e2e

SIZE = 400_000
FAST = {"ingest": {"settle": "0.1s"},
        "upload": {"redundancy": 2, "min_redundancy": 2, "retry": {"initial": "0.1s", "max": "0.5s"}}}


def content(tag: str, size: int = SIZE) -> bytes:
    seed = hashlib.sha256(tag.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def drop(d: Daemon, name: str, data: bytes) -> str:
    """Write a file beside the inbox and rename it in (as `mv` does); its hash."""
    staging = d.root / "staging"
    staging.mkdir(exist_ok=True)
    (staging / name).write_bytes(data)
    os.rename(staging / name, d.inbox / name)
    return hashlib.sha256(data).hexdigest()


def disk_usage(cache: Path) -> int:
    """Bytes of objects and temp files in the cache, as they are on disk right now."""
    total = 0
    for folder in list(os.scandir(cache)):
        if not (folder.name == "tmp" or len(folder.name) == 2):
            continue
        try:
            entries = list(os.scandir(folder.path))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
    return total


class BudgetWatch:
    """Samples the cache on disk at every poll of a wait; remembers the largest sample."""

    def __init__(self, cache: Path, capacity: int) -> None:
        self.cache = cache
        self.capacity = capacity
        self.peak = 0
        self.samples = 0

    def sample(self) -> None:
        used = disk_usage(self.cache)
        self.samples += 1
        self.peak = max(self.peak, used)
        assert used <= self.capacity, f"the cache holds {used} bytes on disk, over its {self.capacity}"

    def wait(self, predicate, timeout: float = 30.0, message: str = "condition"):
        def probe():
            self.sample()
            return predicate()
        return wait_for(probe, timeout=timeout, interval=0.01, message=message)


def info(d: Daemon, h: str) -> dict:
    reply = d.request({"cmd": "info", "hash": h})
    assert reply["ok"], reply
    return reply["result"]


def remote_copy(d: Daemon, remote: str, h: str) -> Path:
    return d.root / "remotes" / remote / h[:2] / h


def remote_named(status: dict, name: str) -> dict:
    return next(r for r in status["remotes"] if r["name"] == name)


def get(d: Daemon, h: str, out: Path) -> bytes:
    result = d.ctl("get", h, "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


def one_line_error(result) -> str:
    text = result.stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1, f"expected one line on stderr, got {text!r}"
    assert result.stdout == b""
    return text


def settled_copies(d: Daemon, hashes: set[str], copies: int = 2) -> bool:
    files = {f["hash"]: f for f in d.files()}
    return all(h in files and len(files[h]["copies"]) == copies and not files[h]["pending"] for h in hashes)


# -- the scenario -----------------------------------------------------------------------

def test_a_full_cache_holds_its_budget_pushes_back_and_drains_when_the_remote_returns(
        daemon_factory, workdir: Path) -> None:
    d = daemon_factory(start=False, cache={"capacity": "4MiB"}, **FAST)
    capacity = 4 << 20
    down = workdir / "remotes" / "r1"
    away = workdir / "r1-is-down"
    down.rename(away)  # the second remote is unreachable: its folder is missing
    d.start()
    watch = BudgetWatch(d.cache, capacity)

    data = {}
    for i in range(30):
        body = content(f"scenario-{i}")
        data[drop(d, f"f{i:02}.bin", body)] = body
        watch.sample()
    fits = capacity // SIZE  # 10 files of 400 KB fit in 4 MiB
    waiting = 30 - fits

    def stuck() -> bool:
        s = d.status()
        return (s["catalog"]["files"] == fits and len(os.listdir(d.inbox)) == waiting
                and f"cache full: {waiting} files waiting for uploads" in s["problems"]
                and s["remotes"][0]["copies"] == fits)

    watch.wait(stuck, message=f"{fits} files registered and {waiting} waiting in the inbox")
    for _ in range(20):  # it stays that way: nothing can be evicted below two copies
        watch.sample()
        assert d.status()["catalog"]["files"] == fits
    files = d.files()
    assert len(files) == fits
    assert all(f["cached"] for f in files), "a file with one copy was evicted"
    assert all([c["remote"] for c in f["copies"]] == ["r0"] and f["pending"] == ["r1"] for f in files)
    for f in files:
        assert (d.cache / f["hash"][:2] / f["hash"]).read_bytes() == data[f["hash"]]
    s = d.status()
    assert s["state"] == "degraded"
    assert s["inbox"]["pending"] == waiting
    assert s["safety"]["below_min"] == fits and s["safety"]["below_min_bytes"] == fits * SIZE
    assert s["cache"]["used"] == fits * SIZE <= s["cache"]["capacity"] == capacity
    check = d.ctl("status", "--check")
    assert check.returncode == 1, check
    assert f"cache full: {waiting} files waiting for uploads".encode() in check.stdout
    assert d.log().count("cache full: new files wait in the inbox") == 1, "said once, not once per file"

    away.rename(down)  # the remote is back: retries find it, copies let files go, ingest resumes

    def drained() -> bool:
        s = d.status()
        return (s["catalog"]["files"] == 30 and not os.listdir(d.inbox) and s["safety"]["below_min"] == 0
                and s["safety"]["below_redundancy"] == 0 and s["uploads"]["queued"] == 0
                and s["uploads"]["retrying"] == 0 and s["uploads"]["active"] == 0)

    watch.wait(drained, timeout=60, message="all 30 files registered with two copies each")
    files = {f["hash"]: f for f in d.files()}
    assert set(files) == set(data)
    for h, f in files.items():
        assert sorted(c["remote"] for c in f["copies"]) == ["r0", "r1"]
        assert remote_copy(d, "r0", h).read_bytes() == data[h]
        assert remote_copy(d, "r1", h).read_bytes() == data[h]
    s = d.status()
    assert s["cache"]["used"] <= capacity and s["problems"] == []
    assert sum(f["cached"] for f in files.values()) == s["cache"]["files"] <= fits
    watch.sample()
    assert d.ctl("status", "--check").returncode == 0
    assert watch.peak <= capacity and watch.samples > 50


# -- verified fetch-back --------------------------------------------------------------------------

def fill_and_evict(d: Daemon, tags: list[str]) -> dict[str, bytes]:
    """Drop files one at a time, each fully copied before the next; a 1 MiB cache keeps two."""
    data = {}
    for tag in tags:
        body = content(tag)
        h = drop(d, f"{tag}.bin", body)
        data[h] = body
        wait_for(lambda h=h: settled_copies(d, {h}), timeout=30, message=f"{tag} with two copies")
    return data


def test_get_returns_true_bytes_even_when_a_remote_copy_rotted(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(cache={"capacity": "1MiB"}, **FAST)
    data = fill_and_evict(d, ["a", "b", "c"])
    a, b, _ = data
    wait_for(lambda: not info(d, a)["cached"], message="a evicted to make room for c")
    assert remote_copy(d, "r0", a).exists() and remote_copy(d, "r1", a).exists()

    assert get(d, a, workdir / "a.out") == data[a]
    assert info(d, a)["cached"]
    assert not info(d, b)["cached"], "b was the least recently used one when a came back"
    assert len(os.listdir(d.cache / "tmp")) == 0

    s = d.status()
    assert [r["errors"] for r in s["remotes"]] == [0, 0]
    assert [r["copies"] for r in s["remotes"]] == [3, 3]  # equal records: the older copy is tried first
    first = info(d, b)["copies"][0]["remote"]
    rotten = b"rotten bytes" * (SIZE // 12) + b"x" * (SIZE % 12)
    remote_copy(d, first, b).write_bytes(rotten)  # same size, other bytes

    assert get(d, b, workdir / "b.out") == data[b]
    assert (d.cache / b[:2] / b).read_bytes() == data[b]
    s = d.status()
    bad = remote_named(s, first)
    other = remote_named(s, "r1" if first == "r0" else "r0")
    assert bad["errors"] == 1 and "other bytes" in bad["last_error"]
    assert other["errors"] == 0
    # the rotten copy is replaced by the upload loop, without anyone asking
    wait_for(lambda: remote_copy(d, first, b).read_bytes() == data[b], timeout=30,
             message=f"the copy of b on {first} rewritten with the true bytes")
    wait_for(lambda: settled_copies(d, set(data)), timeout=30, message="every file with two good copies")
    assert d.ctl("status", "--check").returncode == 0


# -- pin / unpin ----------------------------------------------------------------------------------

def test_pin_fetches_and_keeps_a_file_unpin_lets_it_go_and_a_pin_that_cannot_fit_is_refused(
        daemon_factory, workdir: Path) -> None:
    d = daemon_factory(cache={"capacity": "1MiB"}, **FAST)
    capacity = 1 << 20
    watch = BudgetWatch(d.cache, capacity)
    data = fill_and_evict(d, ["p0", "p1", "p2", "p3"])
    p0, p1, p2, _ = data
    wait_for(lambda: not info(d, p0)["cached"] and not info(d, p1)["cached"], message="p0 and p1 evicted")

    result = d.ctl("pin", p0)
    assert result.returncode == 0, result.stderr
    assert b"pinned" in result.stdout
    f = info(d, p0)
    assert f["cached"] and f["pinned"]
    assert (d.cache / p0[:2] / p0).read_bytes() == data[p0]

    p4, p5, p6 = fill_and_evict(d, ["p4", "p5", "p6"])  # files pour in; p0 stays
    watch.sample()
    assert info(d, p0)["cached"]
    assert not info(d, p4)["cached"] and not info(d, p5)["cached"] and info(d, p6)["cached"]

    result = d.ctl("pin", p1)  # two pinned files of 400 KB: 800 KB of the 1 MiB
    assert result.returncode == 0, result.stderr
    assert info(d, p1)["cached"] and info(d, p1)["pinned"] and info(d, p0)["cached"]
    watch.sample()

    result = d.ctl("pin", p2)  # a third one cannot fit next to them
    assert result.returncode == 1
    reason = one_line_error(result)
    assert "no room" in reason and "pinned" in reason
    f = info(d, p2)
    assert not f["cached"] and not f["pinned"]
    watch.sample()

    # a new file waits: the cache holds only pinned files
    late = content("late")
    h_late = drop(d, "late.bin", late)
    wait_for(lambda: "cache full: 1 files waiting for uploads" in d.status()["problems"],
             message="the new file waiting in the inbox")
    assert (d.inbox / "late.bin").exists()

    result = d.ctl("unpin", p0)
    assert result.returncode == 0, result.stderr
    assert not info(d, p0)["pinned"]
    watch.wait(lambda: settled_copies(d, {h_late}) and not os.listdir(d.inbox), message="the late file in")
    assert not info(d, p0)["cached"], "unpinned, p0 was the file to go"
    assert info(d, p1)["cached"] and info(d, p1)["pinned"]
    assert get(d, p0, workdir / "p0.out") == data[p0]
    watch.sample()
    assert watch.peak <= capacity


# -- verify, rm and bad input ---------------------------------------------------------------------

def ambiguous_pair() -> tuple[bytes, bytes, str]:
    """Two contents whose hashes share their first 6 hex digits (a birthday search, ~5,000 tries)."""
    seen: dict[str, bytes] = {}
    for i in range(1_000_000):
        body = b"ambiguous %d" % i
        prefix = hashlib.sha256(body).hexdigest()[:6]
        if prefix in seen:
            return seen[prefix], body, prefix
        seen[prefix] = body
    raise AssertionError("no collision found")


def test_verify_rm_and_bad_input(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(**FAST)
    data = {}
    for tag in ("v0", "v1", "v2"):
        body = content(tag, 50_000)
        data[drop(d, f"{tag}.bin", body)] = body
    one, two, prefix = ambiguous_pair()
    data[drop(d, "amb-1", one)] = one
    data[drop(d, "amb-2", two)] = two
    wait_for(lambda: settled_copies(d, set(data)), timeout=30, message="every file with two copies")
    v0, v1, v2 = list(data)[:3]

    # verify: a cache object deleted behind the daemon's back is found and fetched again
    (d.cache / v0[:2] / v0).unlink()
    result = d.ctl("verify")
    assert result.returncode == 0, result.stderr
    assert b"1 missing, 1 fetched again, 0 lost" in result.stdout, result.stdout
    assert (d.cache / v0[:2] / v0).read_bytes() == data[v0]

    # verify --remotes: a deleted remote copy is reported bad and made again
    remote_copy(d, "r1", v1).unlink()
    result = d.ctl("verify", "--remotes")
    assert result.returncode == 0, result.stderr
    assert b"remotes: 10 copies checked, 1 bad" in result.stdout, result.stdout
    wait_for(lambda: remote_copy(d, "r1", v1).exists() and remote_copy(d, "r1", v1).read_bytes() == data[v1],
             timeout=30, message="the deleted copy uploaded again")
    wait_for(lambda: settled_copies(d, {v1}), message="v1 with two good copies again")

    # rm: gone from the cache, both remotes and ls; then get says so
    result = d.ctl("rm", "--yes", v2)
    assert result.returncode == 0, result.stderr
    assert not (d.cache / v2[:2] / v2).exists()
    assert not remote_copy(d, "r0", v2).exists() and not remote_copy(d, "r1", v2).exists()
    assert v2 not in {f["hash"] for f in d.files()}
    result = d.ctl("get", v2, "-o", str(workdir / "v2.out"))
    assert result.returncode == 1
    assert "no file" in one_line_error(result)

    # bad input: each a one-line reason, nothing else harmed
    result = d.ctl("get", "0" * 64, "-o", str(workdir / "x.out"))
    assert result.returncode == 1 and "no file" in one_line_error(result)
    result = d.ctl("get", v0[:5], "-o", str(workdir / "x.out"))
    assert result.returncode == 1 and "6 to 64" in one_line_error(result)
    result = d.ctl("get", prefix, "-o", str(workdir / "x.out"))
    assert result.returncode == 1 and "several files" in one_line_error(result)
    result = d.ctl("get", v0, "-o", str(workdir / "no-such-folder" / "x.out"))
    assert result.returncode == 1 and "no-such-folder" in one_line_error(result)
    assert not (workdir / "no-such-folder").exists()
    assert get(d, v0, workdir / "v0.out") == data[v0]
    assert get(d, v0[:8], workdir / "v0-prefix.out") == data[v0]
    s = d.status()
    assert s["catalog"]["files"] == 4 and s["problems"] == [] and d.proc.poll() is None
