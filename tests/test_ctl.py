"""cloudmanagerctl and the control socket against a running daemon, as an operator or a script uses them."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, LineClient, module_daemon, wait_for

# dropped one at a time, in this order: the newest is the last
DROPS = [
    (b"alpha.txt", b"alpha\n" * 300),
    (b"beta.log", b"beta\n" * 500),
    (b"docs/gamma.txt", b"gamma\n" * 700),
    (b"delta.bin", bytes(range(256)) * 40),
]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


HASHES = {name: sha(data) for name, data in DROPS}


class Populated:
    def __init__(self, d: Daemon, root: Path) -> None:
        self.d = d
        self.root = root

    def ctl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return self.d.ctl(*args, **kwargs)


@pytest.fixture(scope="module")
def pop() -> Iterator[Populated]:
    """One daemon for the read-mostly tests, holding DROPS, each with its two copies."""
    with module_daemon("cm-ctl-") as d:
        (d.inbox / "docs").mkdir()
        for name, data in DROPS:
            with open(os.path.join(os.fsencode(d.inbox), name), "wb") as f:
                f.write(data)
            h = sha(data)
            wait_for(lambda: any(f["hash"] == h and len(f["copies"]) == 2 for f in d.files()),
                     message=f"{name!r} registered with two copies")
        yield Populated(d, d.root)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, f"one error line on stderr, got {lines}"
    assert "Traceback" not in result.stderr.decode()
    return lines[0]


def ctl_at(socket_path: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudmanagerd.ctl", "-s", socket_path, *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)


# -- status -----------------------------------------------------------------------------------------

def test_status_json_has_every_field_of_the_status_object(pop: Populated) -> None:
    result = pop.ctl("status", "--json")
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    total = sum(len(data) for _, data in DROPS)

    assert isinstance(s["version"], str) and s["version"]
    assert s["pid"] == pop.d.proc.pid
    assert isinstance(s["uptime"], (int, float)) and s["uptime"] > 0
    assert s["state"] == "running"
    assert isinstance(s["node"], str) and s["node"]
    assert s["problems"] == []
    assert s["inbox"] == {"path": str(pop.d.inbox), "pending": 0, "rejected": 0}
    cache = s["cache"]
    assert set(cache) >= {"path", "capacity", "used", "usage_ratio", "files"}
    assert cache["path"] == str(pop.d.cache)
    assert cache["capacity"] == 2**30
    assert cache["used"] == total
    assert cache["usage_ratio"] == pytest.approx(total / 2**30)
    assert cache["files"] == len(DROPS)
    assert s["catalog"] == {"files": len(DROPS), "bytes": total}
    assert s["uploads"] == {"queued": 0, "queued_bytes": 0, "active": 0, "retrying": 0, "failed": 0,
                            "copies": 2 * len(DROPS)}
    assert s["safety"] == {"below_min": 0, "below_min_bytes": 0, "below_redundancy": 0, "oldest_below_min": None}
    assert [r["name"] for r in s["remotes"]] == ["r0", "r1"]
    for r in s["remotes"]:
        snapshot = r.pop("catalog_snapshot")  # the newest catalog snapshot there (issue 14)
        assert set(snapshot) == {"newest", "age", "error"} and snapshot["error"] is None
        assert r == {"name": r["name"], "type": "directory", "healthy": True, "copies": len(DROPS), "errors": 0,
                     "last_error": None}
    t = s["transfer"]
    assert t["month"] == time.strftime("%Y-%m", time.gmtime())
    assert t["incoming"] == t["total_incoming"] == total
    assert t["outgoing"] >= 2 * total and t["total_outgoing"] >= t["outgoing"]


def test_status_human_is_one_screen(pop: Populated) -> None:
    result = pop.ctl("status")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert f"pid {pop.d.proc.pid}" in text
    assert "running" in text
    assert str(pop.d.inbox) in text and str(pop.d.cache) in text
    assert f"{len(DROPS)} files" in text
    assert "r0" in text and "r1" in text
    assert len(text.splitlines()) <= 24
    assert "{" not in text, "human output is not JSON"


def test_status_check_passes_when_every_file_has_its_copies(pop: Populated) -> None:
    result = pop.ctl("status", "--check")
    assert result.returncode == 0, result.stderr


def test_status_check_fails_while_a_file_is_below_min_redundancy(daemon_factory) -> None:
    d = daemon_factory(start=False)
    broken = Path(d.config["remotes"][1]["path"])
    broken.rmdir()
    broken.write_text("a file where the remote folder should be")
    d.start()
    (d.inbox / "lonely.bin").write_bytes(b"only one remote works\n" * 100)

    wait_for(lambda: d.status()["remotes"][1]["errors"] >= 1 and d.status()["uploads"]["copies"] == 1,
             message="one copy made and r1 failing")
    result = d.ctl("status", "--check")
    assert result.returncode == 1, result.stdout
    s = json.loads(d.ctl("status", "--json", "--check").stdout)
    assert s["safety"]["below_min"] == 1
    assert s["safety"]["below_min_bytes"] == 2200
    assert s["safety"]["oldest_below_min"] is not None
    r1 = s["remotes"][1]
    assert r1["name"] == "r1" and r1["healthy"] is False and r1["last_error"]
    assert s["state"] == "degraded"
    assert any("r1" in p for p in s["problems"]), s["problems"]
    human = d.ctl("status", "--check")
    assert human.returncode == 1  # WARNING: a remote unhealthy, the file not yet past upload.grace
    line, = human.stdout.decode().splitlines()
    assert line.startswith("CLOUDMANAGERD WARNING - remote r1: "), line


# -- ls ---------------------------------------------------------------------------------------------

def test_ls_table_lists_newest_first(pop: Populated) -> None:
    result = pop.ctl("ls")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].split()[:2] == ["HASH", "SIZE"]
    rows = lines[1:]
    expected = [name.decode() for name, _ in reversed(DROPS)]
    assert [row.rsplit(" ", 1)[1] for row in rows] == expected
    for row, (name, data) in zip(rows, reversed(DROPS)):
        assert row.startswith(sha(data)[:12])


def test_ls_json_filters_and_limit(pop: Populated) -> None:
    listed = json.loads(pop.ctl("ls", "--json").stdout)
    assert [f["name"] for f in listed] == [name.decode() for name, _ in reversed(DROPS)]
    for f in listed:
        assert set(f) >= {"hash", "name", "size", "added", "cached", "pinned", "copies", "pending", "failed"}
        assert f["hash"] == HASHES[f["name"].encode()]
        assert f["cached"] is True and f["pinned"] is False
        assert sorted(c["remote"] for c in f["copies"]) == ["r0", "r1"]
        assert f["pending"] == [] and f["failed"] == []
    added = [f["added"] for f in listed]
    assert added == sorted(added, reverse=True)

    txt = json.loads(pop.ctl("ls", "--json", "--name", "*.txt").stdout)
    assert sorted(f["name"] for f in txt) == ["alpha.txt", "docs/gamma.txt"]
    docs = json.loads(pop.ctl("--json", "ls", "--name", "docs/*").stdout)
    assert [f["name"] for f in docs] == ["docs/gamma.txt"]
    assert json.loads(pop.ctl("ls", "--json", "--name", "nothing-*").stdout) == []

    newest = json.loads(pop.ctl("ls", "--json", "--limit", "1").stdout)
    assert [f["name"] for f in newest] == ["delta.bin"]

    cached = json.loads(pop.ctl("ls", "--json", "--state", "cached").stdout)
    assert len(cached) == len(DROPS)
    for state in ("evicted", "pending", "failed"):
        assert json.loads(pop.ctl("ls", "--json", "--state", state).stdout) == [], state

    human = pop.ctl("ls", "--name", "beta*")
    assert human.returncode == 0
    assert len(human.stdout.decode().splitlines()) == 2


# -- info -------------------------------------------------------------------------------------------

def test_info_by_full_hash_and_by_prefix(pop: Populated) -> None:
    h = HASHES[b"beta.log"]
    full = pop.ctl("info", h)
    assert full.returncode == 0, full.stderr
    text = full.stdout.decode()
    assert h in text and "beta.log" in text and "r0" in text and "r1" in text

    for prefix in (h[:6], h[:10]):
        f = json.loads(pop.ctl("info", "--json", prefix).stdout)
        assert f["hash"] == h and f["name"] == "beta.log" and f["size"] == 2500


def test_info_errors_are_one_line_and_exit_1(pop: Populated) -> None:
    known = set(HASHES.values())
    unknown = next(c * 64 for c in "0123456789abcdef" if c * 64 not in known)
    for arg in (unknown, unknown[:8], HASHES[b"alpha.txt"][:5], "zzzzzzzz", "../../etc/passwd"):
        result = pop.ctl("info", arg)
        assert result.returncode == 1, (arg, result.stdout)
        assert one_error_line(result).startswith("cloudmanagerctl: ")
        assert result.stdout == b""


def colliding_contents() -> tuple[bytes, bytes]:
    """Two contents whose SHA-256 share the first 6 hex digits: a birthday search, ~5,000 hashes."""
    seen: dict[str, bytes] = {}
    i = 0
    while True:
        data = b"collide %d\n" % i
        prefix = sha(data)[:6]
        if prefix in seen:
            return seen[prefix], data
        seen[prefix] = data
        i += 1


def test_an_ambiguous_prefix_is_an_error_that_says_so(daemon_factory) -> None:
    one, two = colliding_contents()
    assert sha(one)[:6] == sha(two)[:6] and sha(one) != sha(two)
    d = daemon_factory(remotes=0)
    (d.inbox / "one").write_bytes(one)
    (d.inbox / "two").write_bytes(two)
    wait_for(lambda: d.status()["catalog"]["files"] == 2, message="both registered")

    result = d.ctl("info", sha(one)[:6])
    assert result.returncode == 1
    assert "several" in one_error_line(result)
    reply = d.request({"cmd": "info", "hash": sha(one)[:6]})
    assert reply["ok"] is False and reply["error"]
    # a longer prefix that tells them apart works
    n = next(n for n in range(7, 65) if sha(one)[:n] != sha(two)[:n])
    assert json.loads(d.ctl("info", "--json", sha(two)[:n]).stdout)["hash"] == sha(two)


# -- get --------------------------------------------------------------------------------------------

def test_get_to_a_file_and_to_a_pipe_gives_identical_bytes(pop: Populated) -> None:
    name, data = DROPS[3]
    h = sha(data)
    out = pop.root / "fetched.bin"
    result = pop.ctl("get", h[:8], "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == data

    out.write_bytes(b"x" * (len(data) * 3))  # longer than the file: it must be truncated
    assert pop.ctl("get", h, "-o", str(out)).returncode == 0
    assert out.read_bytes() == data

    piped = pop.ctl("get", h)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == data


def test_get_errors_are_one_line_and_exit_1(pop: Populated) -> None:
    h = HASHES[b"alpha.txt"]
    result = pop.ctl("get", h, "-o", "/nonexistent/dir/file")
    assert result.returncode == 1
    assert "/nonexistent/dir/file" in one_error_line(result)

    unknown = pop.ctl("get", "0123456789abcdef" * 4, "-o", str(pop.root / "never.bin"))
    assert unknown.returncode == 1
    one_error_line(unknown)
    piped_unknown = pop.ctl("get", "0123456789abcdef" * 4)
    assert piped_unknown.returncode == 1 and piped_unknown.stdout == b""
    one_error_line(piped_unknown)


def test_get_to_a_terminal_without_o_is_a_usage_error(pop: Populated) -> None:
    master, slave = os.openpty()
    try:
        result = pop.ctl("get", HASHES[b"alpha.txt"], stdout=slave)
        os.set_blocking(master, False)
        try:
            shown = os.read(master, 65536)
        except BlockingIOError:
            shown = b""
    finally:
        os.close(slave)
        os.close(master)
    assert result.returncode == 2
    assert "-o" in one_error_line(result)
    assert b"alpha" not in shown, "the file's bytes went to the terminal"


# -- every command, --json, exit codes -------------------------------------------------------------

def test_json_output_parses_for_every_command(pop: Populated) -> None:
    h = HASHES[b"docs/gamma.txt"]
    commands = [
        ("status",), ("status", "--check"), ("ls",), ("ls", "--state", "cached"), ("info", h[:6]),
        ("get", h, "-o", str(pop.root / "g.txt")), ("retry", "--all"), ("retry", h), ("reload",),
    ]
    for i, args in enumerate(commands):
        argv = ("--json", *args) if i % 2 else (*args, "--json")  # before or after the command
        result = pop.ctl(*argv)
        assert result.returncode == 0, (argv, result.stderr)
        json.loads(result.stdout)
    assert (pop.root / "g.txt").read_bytes() == dict(DROPS)[b"docs/gamma.txt"]
    # the reload went through and the daemon runs on
    wait_for(lambda: pop.d.status()["state"] == "running", message="running after the reload")


def test_exit_3_when_no_daemon_listens(workdir: Path) -> None:
    result = ctl_at(str(workdir / "nobody-here.sock"), "status")
    assert result.returncode == 3
    assert "nobody-here.sock" in one_error_line(result)

    stale = workdir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # a socket file nobody listens on, as a crash leaves it
    result = ctl_at(str(stale), "--json", "ls")
    assert result.returncode == 3
    one_error_line(result)


def test_exit_2_on_usage_errors(pop: Populated) -> None:
    for args in (("frobnicate",), ("info",), ("get",), ("ls", "--state", "lost"), ("ls", "--limit", "many"), ()):
        result = pop.ctl(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr.decode()
        assert result.stdout == b""


# -- the raw socket ---------------------------------------------------------------------------------

Conn = LineClient


@pytest.fixture
def conn(pop: Populated) -> Iterator[Conn]:
    c = Conn(pop.d.socket_path)
    yield c
    c.close()


def test_several_requests_on_one_connection_are_answered_in_order(pop: Populated, conn: Conn) -> None:
    a, b = HASHES[b"alpha.txt"], HASHES[b"beta.log"]
    requests = [{"cmd": "status"}, {"cmd": "info", "hash": a}, {"cmd": "info", "hash": "ffffff"},
                {"cmd": "info", "hash": b[:6]}, {"cmd": "ls", "limit": 2}]
    conn.send(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
    replies = [conn.reply() for _ in requests]
    assert replies[0]["ok"] and replies[0]["result"]["catalog"]["files"] == len(DROPS)
    assert replies[1]["ok"] and replies[1]["result"]["hash"] == a
    assert replies[2]["ok"] is False and replies[2]["error"]
    assert replies[3]["ok"] and replies[3]["result"]["hash"] == b
    assert replies[4]["ok"] and [f["name"] for f in replies[4]["result"]] == ["delta.bin", "docs/gamma.txt"]
    # and the connection is still usable
    conn.send(b'{"cmd": "status"}\n')
    assert conn.reply()["ok"]


BAD_REQUESTS = {
    "malformed JSON": b'{"cmd": "status"\n',
    "not JSON at all": b"status please\n",
    "invalid UTF-8": b'{"cmd": "st\xff\xfeatus"}\n',
    "a list": b'["status"]\n',
    "a string": b'"status"\n',
    "a number": b"42\n",
    "null": b"null\n",
    "no cmd": b'{"hash": "abcdef"}\n',
    "cmd not a string": b'{"cmd": ["status"]}\n',
    "unknown command": b'{"cmd": "format_disk"}\n',
    "path in the hash": b'{"cmd": "info", "hash": "../../etc/passwd"}\n',
    "path in get's hash": b'{"cmd": "get", "hash": "../../etc/passwd"}\n',
    "hash not a string": b'{"cmd": "info", "hash": 123456789}\n',
    "ls with a bad state": b'{"cmd": "ls", "state": "../../"}\n',
    "ls with a bad limit": b'{"cmd": "ls", "limit": "all"}\n',
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_an_error_reply_and_harms_nothing(pop: Populated, conn: Conn, case: str) -> None:
    conn.send(BAD_REQUESTS[case])
    reply = conn.reply()
    assert reply is not None, "the daemon closed the connection without an error reply"
    assert reply["ok"] is False
    assert isinstance(reply["error"], str) and reply["error"]
    assert "Traceback" not in reply["error"]
    assert pop.d.status()["catalog"]["files"] == len(DROPS)
    assert pop.d.proc.poll() is None


def test_a_large_but_legal_request_is_served(pop: Populated, conn: Conn) -> None:
    conn.send(json.dumps({"cmd": "status", "padding": "x" * 900_000}).encode() + b"\n")
    reply = conn.reply()
    assert reply["ok"], reply


def send_oversized(path: str, payload: bytes) -> dict[str, Any] | None:
    """Send a request the daemon must refuse; it may stop reading (EPIPE) but its reply is still there."""
    c = Conn(path)
    try:
        try:
            c.send(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return c.reply()
    finally:
        c.close()


@pytest.mark.parametrize("shape", ["one long line", "no newline at all"])
def test_a_request_over_1mib_gets_an_error_and_harms_nothing(pop: Populated, shape: str) -> None:
    if shape == "one long line":
        payload = json.dumps({"cmd": "status", "padding": "x" * (1 << 20)}).encode() + b"\n"
    else:
        payload = b"x" * (3 << 20)
    reply = send_oversized(pop.d.socket_path, payload)
    assert reply is not None, "no error reply to an oversized request"
    assert reply["ok"] is False and reply["error"], reply
    assert pop.d.status()["catalog"]["files"] == len(DROPS)
    assert pop.d.proc.poll() is None
    assert "Traceback" not in pop.d.log()
