"""End to end: the daemon as a subprocess on real folders with real inotify, fed the way users feed it.

Every test drops entries into the inbox and watches what a user would see: the catalog
(through the control socket), the cache folder, the remotes, the rejected folder, the log
and the exit code.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import Daemon, sha256_of, wait_for


# -- helpers ---------------------------------------------------------------------------------

def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def by_name(d: Daemon) -> dict[bytes, dict[str, Any]]:
    """The catalog's files keyed by their original name as bytes (JSON names round-trip via fsencode)."""
    return {os.fsencode(f["name"]): f for f in d.files()}


def wait_registered(d: Daemon, expected: dict[bytes, bytes], copies: int | None = None,
                    timeout: float = 20) -> dict[bytes, dict[str, Any]]:
    """Wait until every name in `expected` (name -> content) is registered with its true hash."""
    want = {name: sha(data) for name, data in expected.items()}

    def done() -> dict[bytes, dict[str, Any]] | None:
        files = by_name(d)
        for name, h in want.items():
            f = files.get(name)
            if f is None or f["hash"] != h:
                return None
            if copies is not None and len(f["copies"]) < copies:
                return None
        return files

    return wait_for(done, timeout=timeout,
                    message=f"{sorted(want)} registered" + (f" with {copies} copies" if copies else ""))


def cache_objects(d: Daemon) -> dict[str, int]:
    """Every object in the cache folder (hash -> size), the tmp folder left out."""
    found = {}
    for folder in d.cache.iterdir():
        if folder.name == "tmp" or not folder.is_dir():
            continue
        for obj in folder.iterdir():
            found[obj.name] = obj.stat().st_size
    return found


def assert_cached_and_uploaded(d: Daemon, h: str, data: bytes) -> None:
    obj = d.cache / h[:2] / h
    assert obj.read_bytes() == data, f"cache object {obj} does not hold the file's bytes"
    for remote in d.config["remotes"]:
        copy = Path(remote["path"]) / h[:2] / h
        assert copy.read_bytes() == data, f"remote copy {copy} does not hold the file's bytes"


def write_file(path: Path | bytes, data: bytes) -> None:
    """open, write, close: the way cp writes a file."""
    with open(path, "wb") as f:
        f.write(data)


# -- the life of a file -------------------------------------------------------------------------

def test_written_and_renamed_files_are_registered_cached_and_uploaded(daemon_factory, workdir: Path) -> None:
    d = daemon_factory()
    written = b"written in place\n" * 700
    moved = b"moved in by rename\n" * 900
    staging = workdir / "staging"
    staging.mkdir()
    (staging / "moved.bin").write_bytes(moved)

    write_file(d.inbox / "written.bin", written)
    os.rename(staging / "moved.bin", d.inbox / "moved.bin")

    files = wait_registered(d, {b"written.bin": written, b"moved.bin": moved}, copies=2)
    for name, data in ((b"written.bin", written), (b"moved.bin", moved)):
        f = files[name]
        assert f["size"] == len(data)
        assert f["cached"] is True
        assert sorted(c["remote"] for c in f["copies"]) == ["r0", "r1"]
        assert not (d.inbox / os.fsdecode(name)).exists(), f"{name!r} is still in the inbox"
        assert_cached_and_uploaded(d, f["hash"], data)
    status = d.status()
    assert status["catalog"] == {"files": 2, "bytes": len(written) + len(moved)}
    assert status["cache"]["files"] == 2


def test_files_already_in_the_inbox_are_taken_by_the_startup_scan(daemon_factory) -> None:
    d = daemon_factory(start=False)
    contents = {f"early-{i}.txt".encode(): f"there before the daemon {i}\n".encode() * 50 for i in range(5)}
    (d.inbox / "older").mkdir()
    contents[b"older/nested.txt"] = b"in a folder, before the daemon\n"
    for name, data in contents.items():
        write_file(d.inbox / os.fsdecode(name), data)

    d.start()
    wait_registered(d, contents)
    assert not any(p.is_file() for p in d.inbox.rglob("*")), "the scan left files in the inbox"


def test_a_folder_moved_in_whole_is_taken_file_by_file(daemon_factory, workdir: Path) -> None:
    d = daemon_factory()
    tree = workdir / "album"
    (tree / "disc1" / "extras").mkdir(parents=True)
    (tree / "disc2").mkdir()
    contents = {
        b"album/cover.jpg": b"cover" * 300,
        b"album/disc1/01.flac": b"track one" * 400,
        b"album/disc1/02.flac": b"track two" * 400,
        b"album/disc1/extras/notes.txt": b"liner notes\n",
        b"album/disc2/01.flac": b"disc two, track one" * 200,
    }
    for name, data in contents.items():
        (workdir / os.fsdecode(name)).write_bytes(data)

    os.rename(tree, d.inbox / "album")
    wait_registered(d, contents)
    assert not any(p.is_file() for p in (d.inbox / "album").rglob("*"))


def test_deep_folders_and_odd_names_are_kept_exactly_and_shown_escaped(daemon_factory) -> None:
    d = daemon_factory()
    deep = b"l1/l2/l3/l4/l5"
    os.makedirs(os.path.join(os.fsencode(d.inbox), deep))
    contents = {
        deep + b"/deep.bin": b"five levels down\n" * 10,
        b"with spaces in the name.txt": b"spaces\n" * 11,
        b"new\nline.txt": b"a newline in the name\n" * 12,
        b"bad\xff\xfe.bin": b"not utf-8\n" * 13,
    }
    inbox = os.fsencode(d.inbox)
    for name, data in contents.items():
        write_file(os.path.join(inbox, name), data)

    wait_registered(d, contents)

    result = d.ctl("ls", "--json")
    assert result.returncode == 0, result.stderr
    result.stdout.decode("ascii")  # escaped: nothing raw reaches the terminal or a script
    listed = {os.fsencode(f["name"]): f["hash"] for f in json.loads(result.stdout)}
    for name, data in contents.items():
        assert listed.get(name) == sha(data), f"{name!r} not listed under its exact bytes"
    assert "\\udcff\\udcfe" in result.stdout.decode(), "a non-UTF-8 byte is not shown escaped in JSON"

    human = d.ctl("ls")
    assert human.returncode == 0, human.stderr
    lines = human.stdout.decode().splitlines()
    assert len(lines) == 1 + len(contents), f"one header and one line per file, got:\n{human.stdout.decode()}"
    rows = lines[1:]
    for name, data in contents.items():
        prefix = sha(data)[:12]
        assert sum(prefix in row for row in rows) == 1
    text = "\n".join(rows)
    assert "new\\nline.txt" in text
    assert "bad\\xff\\xfe.bin" in text
    assert "l1/l2/l3/l4/l5/deep.bin" in text

    info = d.ctl("info", sha(contents[b"new\nline.txt"]))
    assert info.returncode == 0, info.stderr
    assert "new\\nline.txt" in info.stdout.decode()


def test_an_empty_file_is_registered(daemon_factory) -> None:
    d = daemon_factory()
    write_file(d.inbox / "empty", b"")
    files = wait_registered(d, {b"empty": b""}, copies=2)
    f = files[b"empty"]
    assert f["hash"] == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert f["size"] == 0
    assert (d.cache / f["hash"][:2] / f["hash"]).stat().st_size == 0
    assert not (d.inbox / "empty").exists()


def test_the_same_content_is_stored_once(daemon_factory) -> None:
    d = daemon_factory()
    data = b"the same bytes twice\n" * 100
    write_file(d.inbox / "first.bin", data)
    wait_registered(d, {b"first.bin": data})

    write_file(d.inbox / "second.bin", data)
    wait_for(lambda: not (d.inbox / "second.bin").exists(), message="the duplicate leaves the inbox")

    # and two copies of new content dropped at the same moment
    other = b"dropped together\n" * 100
    write_file(d.inbox / "third.bin", other)
    write_file(d.inbox / "fourth.bin", other)
    wait_for(lambda: not (d.inbox / "third.bin").exists() and not (d.inbox / "fourth.bin").exists(),
             message="both copies leave the inbox")

    files = d.files()
    assert sorted(f["hash"] for f in files) == sorted([sha(data), sha(other)])
    assert next(f for f in files if f["hash"] == sha(data))["name"] == "first.bin"
    assert cache_objects(d) == {sha(data): len(data), sha(other): len(other)}
    assert d.status()["catalog"]["files"] == 2


def test_ignored_names_stay_until_renamed(daemon_factory) -> None:
    d = daemon_factory()
    ignored = {".hidden": b"dotfile", "x.part": b"partial download", "y.tmp": b"temp", "z~": b"backup"}
    for name, data in ignored.items():
        write_file(d.inbox / name, data)
    (d.inbox / ".git").mkdir()
    write_file(d.inbox / ".git" / "config", b"in a hidden folder")
    sentinel = b"dropped after the ignored ones"
    write_file(d.inbox / "sentinel.bin", sentinel)
    wait_registered(d, {b"sentinel.bin": sentinel})

    for name, data in ignored.items():
        assert (d.inbox / name).read_bytes() == data, f"{name} was touched"
    assert (d.inbox / ".git" / "config").exists()
    assert [f["name"] for f in d.files()] == ["sentinel.bin"]

    os.rename(d.inbox / "x.part", d.inbox / "x")
    wait_registered(d, {b"x": ignored["x.part"]})
    assert not (d.inbox / "x").exists()
    assert sorted(f["name"] for f in d.files()) == ["sentinel.bin", "x"]
    for name in (".hidden", "y.tmp", "z~"):
        assert (d.inbox / name).exists()


# -- bad input ------------------------------------------------------------------------------------

def test_entries_that_are_not_files_are_rejected_and_symlinks_never_followed(daemon_factory, workdir: Path) -> None:
    outside = workdir / "outside"
    outside.mkdir()
    target = outside / "target.txt"
    target.write_bytes(b"a file outside the inbox")
    private = workdir / "private"
    private.mkdir()
    (private / "secret.txt").write_bytes(b"must never be ingested")

    d = daemon_factory()
    inbox = d.inbox
    os.symlink(target, inbox / "link-to-file")
    os.symlink(outside, inbox / "link-to-dir")
    os.symlink(workdir / "does-not-exist", inbox / "dangling")
    os.mkfifo(inbox / "fifo")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(inbox / "sock"))
    (inbox / "sub").mkdir()
    os.symlink(target, inbox / "sub" / "inner-link")
    # a folder that is really a symlink to somewhere else, with a file behind it (written first: the
    # daemon may move the link out of the inbox as soon as it appears)
    (private / "via-link.txt").write_bytes(b"written through the symlink")
    os.symlink(private, inbox / "swapped")

    rejected = workdir / "rejected"
    names = ["link-to-file", "link-to-dir", "dangling", "fifo", "sock", "sub/inner-link", "swapped"]
    wait_for(lambda: all(os.path.lexists(rejected / n) for n in names),
             message=f"every bad entry in {rejected}: have {sorted(str(p) for p in rejected.rglob('*'))}")

    for n in names:
        assert not os.path.lexists(inbox / n), f"{n} is still in the inbox"
    assert os.readlink(rejected / "link-to-file") == str(target)
    assert os.readlink(rejected / "swapped") == str(private)
    # nothing behind a symlink was touched or taken
    assert target.read_bytes() == b"a file outside the inbox"
    assert (private / "secret.txt").read_bytes() == b"must never be ingested"
    assert (private / "via-link.txt").read_bytes() == b"written through the symlink"
    assert cache_objects(d) == {}

    log_lines = d.log().splitlines()
    for n in names:
        lines = [line for line in log_lines if f"rejected {n}:" in line]
        assert len(lines) == 1, f"one log line with the reason for {n}, got {lines}"
    assert any("FIFO" in line for line in log_lines if "rejected fifo:" in line)
    assert any("socket" in line for line in log_lines if "rejected sock:" in line)

    status = d.status()
    assert status["inbox"]["rejected"] == len(names)
    assert status["catalog"]["files"] == 0
    # and the daemon still takes good files
    good = b"a good file after the bad ones"
    write_file(inbox / "good.bin", good)
    wait_registered(d, {b"good.bin": good})
    assert "Traceback" not in d.log()


def test_a_subfolder_swapped_for_a_symlink_while_scanned_is_rejected_not_followed(daemon_factory,
                                                                                   workdir: Path) -> None:
    d = daemon_factory(start=False, ingest={"settle": "1s"})
    sub = d.inbox / "sub"
    sub.mkdir()
    (sub / "file.txt").write_bytes(b"found by the start-up scan")
    elsewhere = workdir / "elsewhere"

    # keep the file from settling (its ctime moves) until the swap is done
    d.start(wait=False)
    deadline = time.monotonic() + 30
    while True:
        os.utime(sub / "file.txt")
        try:
            if d.status()["inbox"]["pending"] >= 1:
                break
        except (OSError, ConnectionError):
            pass
        d._alive_or_fail()
        assert time.monotonic() < deadline, "the start-up scan never saw sub/file.txt"
    os.rename(sub, elsewhere)
    os.symlink(elsewhere, sub)
    # a file closed in the moved-away folder: any event the old watch still reports names sub/late.txt
    (elsewhere / "late.txt").write_bytes(b"written after the swap")

    rejected = workdir / "rejected" / "sub"
    wait_for(lambda: os.path.islink(rejected), message="the symlink moved to the rejected folder")
    wait_for(lambda: d.status()["inbox"]["pending"] == 0, message="nothing left settling")
    assert os.readlink(rejected) == str(elsewhere)
    assert (elsewhere / "file.txt").read_bytes() == b"found by the start-up scan"
    assert (elsewhere / "late.txt").read_bytes() == b"written after the swap"
    assert d.status()["catalog"]["files"] == 0
    assert cache_objects(d) == {}
    assert len([line for line in d.log().splitlines() if "rejected sub:" in line]) == 1


def test_a_file_larger_than_the_whole_cache_waits_and_says_why(daemon_factory) -> None:
    d = daemon_factory(cache={"capacity": "64KiB"})
    big = os.urandom(100 * 1024)
    write_file(d.inbox / "huge.bin", big)

    problems = wait_for(lambda: [p for p in d.status()["problems"] if "huge.bin" in p],
                        message="status problems naming huge.bin")
    assert "larger than the whole cache" in problems[0]
    wait_for(lambda: "huge.bin is larger than the whole cache" in d.log(), message="the log saying why")

    small = b"a small file still goes through\n"
    write_file(d.inbox / "small.bin", small)
    wait_registered(d, {b"small.bin": small})
    assert (d.inbox / "huge.bin").read_bytes() == big
    assert [f["name"] for f in d.files()] == ["small.bin"]
    assert any("huge.bin" in p for p in d.status()["problems"])


def test_files_beyond_the_cache_budget_wait_in_the_inbox(daemon_factory) -> None:
    # no remotes: nothing is ever evictable, so the budget is the whole story
    capacity = 10 * 1024
    d = daemon_factory(remotes=0, cache={"capacity": "10KiB"})
    contents = {f"chunk-{i}.bin".encode(): bytes([i]) * 4096 for i in range(5)}
    for name, data in contents.items():
        write_file(d.inbox / os.fsdecode(name), data)

    def settled() -> dict[str, Any] | None:
        s = d.status()
        assert s["cache"]["used"] <= capacity, f"cache over budget: {s['cache']}"
        assert sum(cache_objects(d).values()) <= capacity
        full = [p for p in s["problems"] if p.startswith("cache full") and "3 files" in p]
        return s if s["catalog"]["files"] == 2 and full else None

    status = wait_for(settled, message="two files in, 'cache full' with the other three waiting")
    assert status["cache"]["used"] == 2 * 4096
    assert status["state"] == "degraded"
    left = {p.name.encode(): p.read_bytes() for p in d.inbox.iterdir()}
    assert len(left) == 3
    for name, data in left.items():
        assert contents[name] == data, f"{name!r} was changed while it waited"
    registered = {os.fsencode(f["name"]) for f in d.files()}
    assert registered.isdisjoint(left) and len(registered) == 2
    assert "cache full" in d.log()


def test_a_file_still_being_written_is_never_taken_in_part(daemon_factory) -> None:
    """A writer keeps appending without closing: the start-up scan sees the file, but it is
    never quiet for `settle`, and no close event comes until the writer is done."""
    d = daemon_factory(start=False, ingest={"settle": "1.5s"})
    path = d.inbox / "growing.bin"
    chunk = os.urandom(4096)
    written = bytearray()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, chunk)
        written += chunk
        d.start(wait=False)
        seen_at = None
        deadline = time.monotonic() + 30
        while True:
            os.write(fd, chunk)
            written += chunk
            now = time.monotonic()
            d._alive_or_fail()
            assert now < deadline, "the daemon never came up or never saw the growing file"
            try:
                status = d.status()
            except (OSError, ConnectionError):
                continue
            assert status["catalog"]["files"] == 0, "a file still open for writing was registered"
            assert path.exists(), "a file still open for writing left the inbox"
            if seen_at is None and status["inbox"]["pending"] >= 1:
                seen_at = now
            if seen_at is not None and now - seen_at > 2.0:  # longer than `settle`: it was re-checked
                break
        # and a second file, created after start, written in many pieces
        path2 = d.inbox / "growing-2.bin"
        written2 = bytearray()
        with open(path2, "wb", buffering=0) as w:
            for _ in range(200):
                w.write(chunk)
                written2 += chunk
                assert d.status()["catalog"]["files"] == 0
    finally:
        os.close(fd)

    files = wait_registered(d, {b"growing.bin": bytes(written), b"growing-2.bin": bytes(written2)})
    assert len(files) == 2, f"only the final content may be registered, got {sorted(files)}"
    assert files[b"growing.bin"]["size"] == len(written)
    h = files[b"growing.bin"]["hash"]
    assert sha256_of(d.cache / h[:2] / h) == h


def test_a_burst_of_small_files_is_all_registered(daemon_factory) -> None:
    d = daemon_factory(remotes=0)
    count = 2000
    for i in range(count):
        write_file(d.inbox / f"burst-{i:05d}.dat", b"%d\n" % i * 8)
    wait_for(lambda: d.status()["catalog"]["files"] == count, timeout=60,
             message=f"{count} files registered")
    assert not any(d.inbox.iterdir())
    files = by_name(d)
    assert len(files) == count
    for i in (0, 1, 999, count - 1):
        assert files[b"burst-%05d.dat" % i]["hash"] == sha(b"%d\n" % i * 8)
    assert len(cache_objects(d)) == count


# -- stop and start ------------------------------------------------------------------------------

def test_sigterm_stops_cleanly_and_a_restart_resumes_pending_uploads(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(start=False, upload={"retry": {"initial": "0.2s", "max": "0.5s"}})
    broken = Path(d.config["remotes"][1]["path"])
    broken.rmdir()
    broken.write_text("a file where the remote folder should be")
    d.start()
    contents = {f"keep-{i}.bin".encode(): f"kept across a restart {i}\n".encode() * 40 for i in range(3)}
    for name, data in contents.items():
        write_file(d.inbox / os.fsdecode(name), data)

    def one_copy_and_pending() -> bool:
        files = by_name(d)
        return all(n in files and files[n]["hash"] == sha(data) and len(files[n]["copies"]) == 1
                   and files[n]["pending"] == ["r1"] for n, data in contents.items())

    wait_for(one_copy_and_pending, message="one copy each, r1 pending")
    assert d.status()["safety"]["below_redundancy"] == len(contents)

    assert d.stop() == 0
    assert not os.path.exists(d.socket_path), "the socket is left behind"
    assert "Traceback" not in d.log()

    broken.unlink()
    broken.mkdir()
    d.start()
    files = by_name(d)
    assert set(contents) <= set(files), "files known before the stop are missing after the restart"
    wait_registered(d, contents, copies=2)
    for name, data in contents.items():
        assert_cached_and_uploaded(d, sha(data), data)
    assert d.stop() == 0
    assert "Traceback" not in d.log()


# -- refusing to start -------------------------------------------------------------------------------

def run_daemon(config_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudmanagerd", "-c", str(config_path), *extra],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30, text=True)


BAD_CONFIGS = {
    "unknown key": ({"colour": "blue"}, "colour"),
    "wrong type": ({"cache": {"capacity": ["1GiB"]}}, "cache.capacity"),
    "negative size": ({"cache": {"capacity": "-5GiB"}}, "cache.capacity"),
    "missing inbox": ({"inbox": "/nonexistent/cloudmanager/inbox"}, "inbox"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_config_refuses_to_start_with_one_line(daemon_factory, case: str) -> None:
    change, key = BAD_CONFIGS[case]
    d = daemon_factory(start=False)
    config = {**d.config, **{k: ({**d.config[k], **v} if isinstance(v, dict) else v) for k, v in change.items()}}
    d.config_path.write_text(yaml.safe_dump(config))

    for extra in ((), ("--check-config",)):
        result = run_daemon(d.config_path, *extra)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1, (extra, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout
        assert len(lines) == 1, f"one line, got {lines}"
        assert f"{key}:" in lines[0], f"the line names {key}: {lines[0]}"
    assert not os.path.exists(d.socket_path)


def test_a_good_config_passes_the_check(daemon_factory) -> None:
    d = daemon_factory(start=False)
    result = run_daemon(d.config_path, "--check-config")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr



def test_a_file_another_writer_still_holds_open_is_not_taken_when_someone_else_closes_it(daemon_factory) -> None:
    """A `touch` (open for writing, close) while the real writer goes on must not make the
    daemon take the file: the writer's later bytes would land in the cache object."""
    d = daemon_factory()
    path = d.inbox / "shared.bin"
    chunk = os.urandom(65536)
    content = b""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(60):
            os.write(fd, chunk)
            content += chunk
            if i == 5:
                os.close(os.open(path, os.O_WRONLY | os.O_APPEND))  # someone else opens and closes it
            if i == 30:
                # by now the daemon has seen that close and looked at the file, and left it alone
                wait_for(lambda: "still open for writing" in d.log(), message="the daemon noticing the writer")
                assert path.exists() and d.files() == []
    finally:
        os.close(fd)
    expected = hashlib.sha256(content).hexdigest()
    files = wait_for(lambda: [f for f in d.files() if f["name"] == "shared.bin"], message="shared.bin registered")
    assert [f["hash"] for f in files] == [expected]
    assert sha256_of(d.cache / expected[:2] / expected) == expected
