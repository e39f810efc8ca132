"""`get` hands out only verified bytes, and `get -o` / `backup -o` change FILE only once the daemon has them.

Issue 10, items 2 and 3, and the `/dev/full` hint of item 14: a cache object overwritten with
same-size bytes is caught while it is sent, dropped, fetched again and (into a file) sent again;
an output file is written as a temp beside FILE and renamed over it only on success.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, module_daemon, one_reply_daemon, wait_for

SMALL = b"a small file, under one chunk\n" * 100
LARGE = os.urandom(3 << 20)  # three 1 MiB chunks: some are written before the hash is known


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def d() -> Iterator[Daemon]:
    with module_daemon("cm-relget-") as d:
        for name, data in (("small.txt", SMALL), ("large.bin", LARGE)):
            (d.inbox / name).write_bytes(data)
            h = sha(data)
            wait_for(lambda: any(f["hash"] == h and len(f["copies"]) == 2 for f in d.files()), timeout=30,
                     message=f"{name} with two copies")
        yield d
        assert "Traceback" not in d.log(), d.log()[-3000:]


def rot(d: Daemon, data: bytes) -> Path:
    """Overwrite the cache object in place with other bytes of the same size, as a bad disk would."""
    h = sha(data)
    path = d.cache / h[:2] / h
    wait_for(lambda: path.exists(), message="the object back in the cache")
    with open(path, "r+b") as f:
        f.write(bytes(b ^ 0xFF for b in data[:64]))
    return path


def one_error_line(result: subprocess.CompletedProcess) -> str:
    text = result.stderr.decode()
    assert "Traceback" not in text, text
    lines = text.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- item 2: a rotten cache object is never handed out ---------------------------------------------------

@pytest.mark.parametrize("data", [SMALL, LARGE], ids=["small", "large"])
def test_get_of_a_rotten_object_into_a_file_returns_the_true_bytes_from_a_remote(d: Daemon, workdir: Path,
                                                                               data: bytes) -> None:
    rot(d, data)
    out = workdir / "out.bin"
    result = d.ctl("get", sha(data), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert sha(out.read_bytes()) == sha(data)  # (a hash: pytest's diff of megabytes takes minutes)
    log = d.log()
    assert f"hash={sha(data)} holds other bytes" in log, log[-2000:]
    assert f"fetched hash={sha(data)}" in log
    assert sha((d.cache / sha(data)[:2] / sha(data)).read_bytes()) == sha(data), "the cache holds the good copy"


def test_get_of_a_rotten_small_object_to_a_pipe_is_still_right(d: Daemon) -> None:
    """Under one chunk nothing is written before the hash is known: the fresh copy is sent instead."""
    rot(d, SMALL)
    result = d.ctl("get", sha(SMALL))
    assert result.returncode == 0, result.stderr
    assert result.stdout == SMALL


def test_get_of_a_rotten_large_object_to_a_pipe_fails_and_never_looks_complete(d: Daemon) -> None:
    rot(d, LARGE)
    result = d.ctl("get", sha(LARGE))
    assert result.returncode == 1
    assert "corrupt" in one_error_line(result)
    assert len(result.stdout) < len(LARGE), "the consumer got a whole file's worth of wrong bytes"
    # the object was replaced: the next get is right
    again = d.ctl("get", sha(LARGE))
    assert again.returncode == 0, again.stderr
    assert sha(again.stdout) == sha(LARGE)


def test_get_of_a_rotten_object_into_a_redirected_stdout_file_is_right(d: Daemon, workdir: Path) -> None:
    rot(d, LARGE)
    out = workdir / "redirected.bin"
    with open(out, "wb") as f:
        result = d.ctl("get", sha(LARGE), stdout=f)
    assert result.returncode == 0, result.stderr
    assert sha(out.read_bytes()) == sha(LARGE)


def test_get_of_a_rotten_object_appended_to_a_file_keeps_what_was_there(d: Daemon, workdir: Path) -> None:
    rot(d, LARGE)
    out = workdir / "appended.bin"
    out.write_bytes(b"the user's earlier lines\n")
    fd = os.open(out, os.O_WRONLY | os.O_APPEND)  # `get HASH >> FILE`: a shell does not seek, the offset is 0
    try:
        result = d.ctl("get", sha(LARGE), stdout=fd)
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr
    assert sha(out.read_bytes()) == sha(b"the user's earlier lines\n" + LARGE)


def test_get_of_a_rotten_object_with_no_remote_copy_fails_and_leaves_nothing(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(remotes=0)
    (d.inbox / "only.txt").write_bytes(SMALL)
    wait_for(lambda: d.files(), message="the file registered")
    rot(d, SMALL)
    out = workdir / "never.txt"
    result = d.ctl("get", sha(SMALL), "-o", str(out))
    assert result.returncode == 1
    assert "corrupt" in one_error_line(result)
    assert not out.exists()
    assert leftovers(workdir) == []
    piped = d.ctl("get", sha(SMALL))
    assert piped.returncode == 1 and piped.stdout == b""
    # the only copy of the file is kept as it is (a damaged file may be worth more than none), named
    assert f"hash={sha(SMALL)}" in d.log() and "no remote holds a good copy: kept" in d.log()
    assert any("damaged cache object" in p for p in d.status()["problems"])
    assert d.stop() == 0


def test_a_rotten_object_appended_with_no_remote_copy_leaves_the_file_as_it_was(daemon_factory,
                                                                               workdir: Path) -> None:
    """Chunks were written before the hash was known: they are cut off again, and only they."""
    d = daemon_factory(remotes=0)
    (d.inbox / "large.bin").write_bytes(LARGE)
    wait_for(lambda: d.files(), message="the file registered")
    rot(d, LARGE)
    out = workdir / "appended.txt"
    out.write_bytes(b"kept\n")
    fd = os.open(out, os.O_WRONLY | os.O_APPEND)
    try:
        result = d.ctl("get", sha(LARGE), stdout=fd)
    finally:
        os.close(fd)
    assert result.returncode == 1
    assert out.read_bytes() == b"kept\n"
    assert d.stop() == 0


def test_two_gets_of_one_rotten_object_at_once_both_get_the_true_bytes(d: Daemon, workdir: Path) -> None:
    rot(d, LARGE)
    results: list[subprocess.CompletedProcess] = []
    outs = [workdir / f"twin{i}.bin" for i in range(2)]
    threads = [threading.Thread(target=lambda o=o: results.append(d.ctl("get", sha(LARGE), "-o", str(o))))
               for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert [sha(o.read_bytes()) for o in outs] == [sha(LARGE)] * 2


# -- item 3: FILE changes only once the daemon has the bytes -----------------------------------------------

def test_a_failed_get_leaves_an_existing_file_untouched(d: Daemon, workdir: Path) -> None:
    keep = workdir / "keep.txt"
    keep.write_bytes(b"IMPORTANT\n")
    result = d.ctl("get", "abcdef", "-o", str(keep))
    assert result.returncode == 1
    one_error_line(result)
    assert keep.read_bytes() == b"IMPORTANT\n"
    assert leftovers(workdir) == []


def test_a_failed_get_removes_the_file_it_would_have_created(d: Daemon, workdir: Path) -> None:
    result = d.ctl("get", "abcdef", "-o", str(workdir / "new.txt"))
    assert result.returncode == 1
    assert sorted(p.name for p in workdir.iterdir()) == []


def test_a_failed_backup_leaves_an_existing_file_untouched(workdir: Path) -> None:
    """A daemon that says no to the backup (a fake one: a real one rarely does)."""
    path = str(workdir / "fake.sock")
    keep = workdir / "keep.sqlite3"
    keep.write_bytes(b"yesterday's backup")
    with one_reply_daemon(path, b'{"ok": false, "error": "backup failed: disk full"}\n'):
        result = subprocess.run([sys.executable, "-m", "cloudmanagerd.ctl", "-s", path, "backup", "-o", str(keep)],
                                capture_output=True, timeout=60)
    assert result.returncode == 1
    assert "disk full" in one_error_line(result)
    assert keep.read_bytes() == b"yesterday's backup"
    assert leftovers(workdir) == []


def test_get_and_backup_replace_a_file_keeping_its_mode(d: Daemon, workdir: Path) -> None:
    out = workdir / "out.bin"
    out.write_bytes(b"old and longer than the new content" * 1000)
    out.chmod(0o604)
    assert d.ctl("get", sha(SMALL), "-o", str(out)).returncode == 0
    assert out.read_bytes() == SMALL
    assert stat.S_IMODE(out.stat().st_mode) == 0o604
    backup = workdir / "catalog.bak"
    result = d.ctl("backup", "-o", str(backup))
    assert result.returncode == 0, result.stderr
    assert backup.read_bytes().startswith(b"SQLite format 3\0")
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert leftovers(workdir) == []


def test_get_into_a_symlink_writes_its_target_and_keeps_the_link(d: Daemon, workdir: Path) -> None:
    (workdir / "real").mkdir()
    target = workdir / "real" / "target.txt"
    target.write_bytes(b"old")
    link = workdir / "link.txt"
    link.symlink_to(target)
    assert d.ctl("get", sha(SMALL), "-o", str(link)).returncode == 0
    assert link.is_symlink() and target.read_bytes() == SMALL


def test_get_into_a_missing_folder_or_a_folder_says_so(d: Daemon, workdir: Path) -> None:
    missing = d.ctl("get", sha(SMALL), "-o", str(workdir / "nowhere" / "f.txt"))
    assert missing.returncode == 1
    assert f"folder {workdir / 'nowhere'} does not exist" in one_error_line(missing)
    folder = d.ctl("get", sha(SMALL), "-o", str(workdir))
    assert folder.returncode == 1
    assert "is a folder" in one_error_line(folder)


def test_two_gets_at_once_into_one_file_leave_it_whole(d: Daemon, workdir: Path) -> None:
    out = workdir / "shared.bin"
    results: list[subprocess.CompletedProcess] = []
    threads = [threading.Thread(target=lambda: results.append(d.ctl("get", sha(LARGE), "-o", str(out))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    assert sha(out.read_bytes()) == sha(LARGE)
    assert leftovers(workdir) == []


def test_get_into_devices_and_dash(d: Daemon) -> None:
    assert d.ctl("get", sha(SMALL), "-o", "/dev/null").returncode == 0
    full = d.ctl("get", sha(SMALL), "-o", "/dev/full")
    assert full.returncode == 1
    assert "No space left on device" in one_error_line(full)
    dash = d.ctl("get", sha(SMALL), "-o", "-")
    assert dash.returncode == 0 and dash.stdout == SMALL


# -- descriptors a client may pass ----------------------------------------------------------------------------

def raw_get(d: Daemon, h: str, fd: int) -> dict:
    import json
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(d.socket_path)
        socket.send_fds(s, [json.dumps({"cmd": "get", "hash": h}).encode() + b"\n"], [fd])
        buf = b""
        while True:
            chunk = s.recv(65536)
            assert chunk, "closed without a reply"
            buf += chunk
            for line in buf.split(b"\n")[:-1]:
                reply = json.loads(line)
                if "progress" not in reply:
                    return reply


def test_a_read_only_descriptor_is_refused_before_any_work(d: Daemon, workdir: Path) -> None:
    (workdir / "ro.txt").write_bytes(b"keep")
    fd = os.open(workdir / "ro.txt", os.O_RDONLY)
    try:
        reply = raw_get(d, sha(LARGE), fd)
    finally:
        os.close(fd)
    assert reply["ok"] is False and "not open for writing" in reply["error"], reply
    assert (workdir / "ro.txt").read_bytes() == b"keep"


def test_a_client_that_disconnects_mid_get_harms_nothing(d: Daemon) -> None:
    import json
    r, w = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(d.socket_path)
            socket.send_fds(s, [json.dumps({"cmd": "get", "hash": sha(LARGE)}).encode() + b"\n"], [w])
            os.close(w)
            w = -1
            assert os.read(r, 65536), "the get started"
        # gone: the daemon finds out from the pipe (no reader once we close it) or the socket
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    result = d.ctl("get", sha(LARGE))
    assert result.returncode == 0 and sha(result.stdout) == sha(LARGE)
    assert "Traceback" not in d.log()


def test_a_file_in_a_folder_the_user_cannot_write_is_refused_with_the_reason(workdir: Path) -> None:
    """FILE is writable but its folder is not: there is no room for the temp file, and ctl says so."""
    import pwd
    if os.geteuid() != 0:
        pytest.skip("needs root to run ctl as another user")
    nobody = pwd.getpwnam("nobody")
    folder = workdir / "roots"
    folder.mkdir(mode=0o755)
    mine = folder / "mine.txt"
    mine.write_bytes(b"keep")
    os.chown(mine, nobody.pw_uid, nobody.pw_gid)
    path = str(workdir / "fake.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen(1)
    try:
        result = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                                 sys.executable, "-m", "cloudmanagerd.ctl", "-s", path, "get", "abcdef", "-o",
                                 str(mine)], capture_output=True, timeout=60)
    finally:
        server.close()
    assert result.returncode == 1
    assert f"no permission to create a file in {folder}" in one_error_line(result)
    assert mine.read_bytes() == b"keep"
