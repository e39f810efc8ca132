"""cloudmanagerctl as the tools operators already run behave (issue 15, items 3 and 5): `status --check` in the
Nagios plugin convention, a command line with --version, help for everything, a careful `rm`, `get -o -`,
quiet broken pipes, streamed `ls`, `info` on a pending copy, and a lowered capacity that evicts at once."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pty
import re
import logging
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import Daemon, one_reply_daemon, wait_for

from cloudmanagerd import __version__, control, health
from cloudmanagerd import ctl as ctlmod
from cloudmanagerd.catalog import Catalog, IngestRecord
from cloudmanagerd.exchange import Entry, Location


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check(d: Daemon) -> tuple[int, str]:
    """`status --check`: its exit code and its one line."""
    result = d.ctl("status", "--check")
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1, (lines, result.stderr)
    assert result.stderr == b""
    return result.returncode, lines[0]


def break_remote(d: Daemon, index: int) -> None:
    """A file where the remote's folder should be: every upload to it fails."""
    path = Path(d.config["remotes"][index]["path"])
    path.rmdir()
    path.write_text("not a folder")


def write_config(d: Daemon) -> None:
    d.config_path.write_text(yaml.safe_dump(d.config))


def ctl_at(socket_path: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudmanagerd.ctl", "-s", socket_path, *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, **kwargs)


# -- status --check: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN ---------------------------------------------

def test_check_ok_with_every_file_copied(daemon_factory) -> None:
    d = daemon_factory(upload={"grace": "1s"})
    (d.inbox / "fine.txt").write_bytes(b"fine\n" * 100)
    wait_for(lambda: d.status()["uploads"]["copies"] == 2, message="two copies")
    code, line = check(d)
    assert code == 0, line
    reason, perf = line.split(" | ")
    assert reason == "CLOUDMANAGERD OK - 1 file(s), 0 below min_redundancy, cache 500 B of 1.0 GiB"
    assert "files=1" in perf and "below_min=0" in perf and "cache_used=500B;;" in perf
    s = d.status()
    assert s["level"] == "ok" and s["findings"] == [] and s["problems"] == []


def test_check_warning_for_given_up_uploads_then_critical_past_the_grace(daemon_factory) -> None:
    d = daemon_factory(start=False, upload={"retry": {"max_attempts": 1}, "grace": "3s"})
    break_remote(d, 1)
    d.start()
    data = b"one remote works\n" * 50
    (d.inbox / "half.txt").write_bytes(data)
    wait_for(lambda: d.status()["uploads"]["failed"] == 1, message="the upload to r1 given up")
    code, line = check(d)
    assert code == 1, line
    assert line.startswith("CLOUDMANAGERD WARNING - ")
    assert "1 upload(s) given up" in line and "remote r1" in line
    levels = {f["level"] for f in d.status()["findings"]}
    assert levels == {"warning"}

    # past upload.grace, the file below min_redundancy is what matters: CRITICAL, and said first
    wait_for(lambda: d.status()["level"] == "critical", message="past the grace")
    code, line = check(d)
    assert code == 2, line
    assert line.startswith("CLOUDMANAGERD CRITICAL - 1 file(s) below min_redundancy for more than 3s"), line
    assert "given up" in line  # the warnings follow on the same line
    s = d.status()
    assert s["state"] == "degraded"
    assert [f["line"] for f in s["findings"]] == s["problems"]

    # the operator fixes the remote and retries: OK again
    Path(d.config["remotes"][1]["path"]).unlink()
    Path(d.config["remotes"][1]["path"]).mkdir()
    assert d.ctl("retry", "--all").returncode == 0
    wait_for(lambda: check(d)[0] == 0, timeout=60, message="OK once the copy is made")


def test_check_critical_when_the_cache_is_over_capacity_and_nothing_may_go(daemon_factory) -> None:
    d = daemon_factory()
    files = [bytes([i]) * 6000 for i in range(3)]
    for i, data in enumerate(files):
        (d.inbox / f"f{i}.bin").write_bytes(data)
    wait_for(lambda: d.status()["uploads"]["copies"] == 6, message="every file copied twice")
    for data in files:
        assert d.ctl("pin", sha(data)).returncode == 0
    d.config["cache"]["capacity"] = "10KB"
    write_config(d)
    assert d.ctl("reload").returncode == 0
    s = d.status()
    assert s["cache"]["used"] == 18000  # pinned: nothing may go
    over = [f for f in s["findings"] if f["line"].startswith("cache over capacity")]
    assert over and over[0]["level"] == "critical", s["findings"]
    assert "17.6 KiB of 9.8 KiB" in over[0]["line"]
    code, line = check(d)
    assert code == 2 and line.startswith("CLOUDMANAGERD CRITICAL - cache over capacity: "), line

    # unpinned, they may go: the next status job brings the cache within its capacity
    for data in files:
        assert d.ctl("unpin", sha(data)).returncode == 0
    wait_for(lambda: d.status()["cache"]["used"] <= 10_000, message="evicted down to the capacity")
    assert check(d)[0] == 0


def test_lowering_the_capacity_by_reload_evicts_at_once(daemon_factory) -> None:
    d = daemon_factory()
    files = [bytes([i]) * 6000 for i in range(4)]
    for i, data in enumerate(files):
        (d.inbox / f"f{i}.bin").write_bytes(data)
    wait_for(lambda: d.status()["uploads"]["copies"] == 8, message="every file copied twice")
    d.config["cache"]["capacity"] = "13KB"
    write_config(d)
    assert d.ctl("reload").returncode == 0
    s = d.status()  # right after the reload answered: no waiting for a new file or a timer
    assert s["cache"]["capacity"] == 13_000
    assert s["cache"]["used"] == 12_000 and s["cache"]["files"] == 2
    assert s["problems"] == [] and s["level"] == "ok"


def test_a_file_known_only_from_another_nodes_export_is_not_critical(daemon_factory) -> None:
    d = daemon_factory(upload={"grace": "1s"})
    foreign = "ab" * 32
    text = json.dumps([{"version": "0.2", "datetime": "1391212800", "filename": "far.bin", "filesize": 123,
                        "filehash": foreign, "uploads": [{"host_name": "elsewhere", "url": "http://far/x"}]}])
    result = d.ctl("import", "-", input=text.encode())
    assert result.returncode == 0, result.stderr
    s = d.status()
    assert s["safety"]["below_min"] == 1  # known, with no copy here: counted, yet not this node's to fix
    code, line = check(d)
    assert code == 0, line


def test_at_risk_counts_the_files_this_node_answers_for(workdir: Path) -> None:
    """However many files other nodes' exports registered (no copy here), a file of this node's own
    below min_redundancy past the grace is found, whether it has one copy or none."""
    cat = Catalog.open(f"sqlite:///{workdir / 'c.sqlite3'}", "here")
    try:
        far = [Entry(sha(b"far %d" % i), b"far", 10, 100 + i, (Location("elsewhere", "u"),)) for i in range(3000)]
        cat.import_entries(far, ["r0", "r1"], None, 500.0)
        mine = IngestRecord(sha(b"mine"), b"mine", 5)
        cat.begin_ingest([mine], 2000.0)
        cat.finish_ingest([mine], ["r0", "r1"], 2000.0)
        assert cat.counts(2, 2)["below_min"] == 3001  # status's figure counts them all
        assert cat.at_risk(2, 1999.0) == (0, None)  # only newer than the cutoff: none past the grace
        assert cat.at_risk(2, 3000.0) == (1, 2000.0)  # no copy yet
        claim = cat.claim_due(2500.0, 1, 60)[0]
        cat.upload_done(claim.hash, claim.remote, "url", 5, 2, 2500.0)
        assert cat.at_risk(2, 3000.0) == (1, 2000.0)  # one copy of two
        assert cat.at_risk(1, 3000.0) == (0, None)
    finally:
        cat.close()


def test_check_warning_while_the_scrub_falls_behind(daemon_factory) -> None:
    d = daemon_factory(cache={"scrub": "1KiB/h"}, upload={"grace": "4s"})
    data = b"checked long ago\n" * 300
    (d.inbox / "old.txt").write_bytes(data)
    wait_for(lambda: d.status()["uploads"]["copies"] == 2, message="two copies")
    assert d.ctl("verify").returncode == 0  # checked now: on time
    with sqlite3.connect(d.root / "state" / "catalog.sqlite3") as db:  # ten days pass
        db.execute("UPDATE cache_entries SET verified=verified-864000")
    db.close()
    wait_for(lambda: d.status()["level"] == "warning", message="the scrub's lag found")
    code, line = check(d)
    assert code == 1, line
    assert line.startswith("CLOUDMANAGERD WARNING - scrub behind: a cache object was last checked 10d ago, while a "
                           "pass over 5.0 KiB at cache.scrub 1.0 KiB/h takes 4h 58m (raise cache.scrub"), line
    assert d.ctl("verify").returncode == 0
    wait_for(lambda: check(d)[0] == 0, message="OK once checked again")


def test_check_critical_while_the_inbox_is_missing(daemon_factory) -> None:
    d = daemon_factory()
    d.inbox.rmdir()
    wait_for(lambda: d.status()["level"] == "critical", message="the missing inbox found")
    code, line = check(d)
    assert code == 2 and line.startswith("CLOUDMANAGERD CRITICAL - ") and str(d.inbox) in line, line
    d.inbox.mkdir()
    wait_for(lambda: check(d)[0] == 0, message="OK once the inbox is back")


def test_check_unknown_when_the_daemon_is_unreachable(workdir: Path) -> None:
    result = ctl_at(str(workdir / "nothing.sock"), "status", "--check")
    assert result.returncode == 3
    assert result.stderr == b""
    line, = result.stdout.decode().splitlines()
    assert line.startswith("CLOUDMANAGERD UNKNOWN - cannot reach cloudmanagerd at "), line


def test_check_unknown_when_the_daemon_does_not_answer_in_time(daemon_factory) -> None:
    d = daemon_factory()
    d.proc.send_signal(signal.SIGSTOP)  # a hung daemon: the kernel still accepts the connection
    try:
        result = d.ctl("--timeout", "1", "status", "--check")
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert result.returncode == 3 and result.stderr == b""
    assert result.stdout.decode().startswith("CLOUDMANAGERD UNKNOWN - cloudmanagerd at ")
    assert "did not answer within 1s" in result.stdout.decode()


@pytest.mark.parametrize("reply", [b'{"ok": true, "result": {"state": "running"}}\n', b"garbage\n",
                                   b'{"ok": true, "result": [1, 2]}\n', b""])
def test_check_unknown_on_a_garbage_reply(workdir: Path, reply: bytes) -> None:
    with one_reply_daemon(str(workdir / "fake.sock"), reply):
        result = ctl_at(str(workdir / "fake.sock"), "status", "--check")
    assert result.returncode == 3, result
    line, = result.stdout.decode().splitlines()
    assert line.startswith("CLOUDMANAGERD UNKNOWN - "), line
    assert b"Traceback" not in result.stderr


def test_levels_of_the_health_checks() -> None:
    """What cannot be caused cheaply against a real daemon (a wedged thread, a full catalog disk)."""
    assert health.loops(100.0, 10.0, False, 0.0, True, 100.0)[0].level == "critical"
    assert health.catalog("/s/c.db", None, "", None, True, 0)[0].level == "critical"
    assert health.catalog("/s/c.db", None, "", "disk I/O error", False, 10)[0].level == "critical"
    assert health.descriptors(95, 100).level == "warning"
    assert health.descriptors(99, 100).level == "critical"
    assert health.at_risk(0, None, 60) is None
    assert health.at_risk(1001, 7200, 3600).line.startswith("more than 1000 file(s) below min_redundancy for more "
                                                            "than 1h (the oldest for 2h)")
    assert health.scrub_behind(10 * 86400, 1 << 30, 0.0) is None  # cache.scrub 0: off, never behind
    assert health.scrub_behind(7000, 1 << 20, 1024 / 3600) is None  # a pass takes 17h: 2h is on time
    assert health.scrub_behind(None, 0, 1.0) is None  # an empty cache
    assert health.worst([]) == "ok"
    assert health.worst([health.Finding("a"), health.Finding("b", critical=True)]) == "critical"


# -- the command line -----------------------------------------------------------------------------

def test_version_and_help_for_every_command_and_option() -> None:
    out = subprocess.run([sys.executable, "-m", "cloudmanagerd.ctl", "--version"], stdout=subprocess.PIPE,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.decode().strip() == f"cloudmanagerctl {__version__}"
    p = ctlmod.parser()
    sub = next(a for a in p._actions if a.dest == "command")
    assert set(sub.choices) == set(ctlmod.COMMANDS)
    helps = {c.dest: c.help for c in sub._choices_actions}
    for name, sp in sub.choices.items():
        assert helps.get(name), f"{name} has no line in the command list"
        assert sp.description, f"{name} has no description"
        for action in sp._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    for action in p._actions:
        assert action.help, f"{action.option_strings} has no help"
    for name in sub.choices:
        result = subprocess.run([sys.executable, "-m", "cloudmanagerd.ctl", name, "--help"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        assert result.returncode == 0 and result.stderr == b"", name
        assert result.stdout.decode().startswith(f"usage: cloudmanagerctl {name}")


@pytest.fixture
def three(daemon_factory) -> Daemon:
    d = daemon_factory()
    for i in range(3):
        (d.inbox / f"f{i}.txt").write_bytes(f"file {i}\n".encode() * 100)
    wait_for(lambda: d.status()["uploads"]["copies"] == 6, message="every file copied twice")
    return d


def test_a_reader_that_goes_away_is_quiet(three: Daemon) -> None:
    """`status | head -1` and the like: no BrokenPipeError traceback, whenever the reader leaves."""
    base = f"{sys.executable} -m cloudmanagerd.ctl -c {three.config_path}"
    for command in ("status", "status --json", "ls", "ls --ndjson", "--json ls", "info " + three.files()[0]["hash"]):
        for reader in ("head -1", "true"):
            result = subprocess.run(["bash", "-c", f"{base} {command} | {reader}; exit ${{PIPESTATUS[0]}}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
            assert result.stderr == b"", (command, reader, result.stderr)
            assert result.returncode in (0, 141), (command, reader, result.returncode)


def test_status_shows_uptime_for_people(three: Daemon) -> None:
    first = three.ctl("status").stdout.decode().splitlines()[0]
    assert re.search(r"\(pid \d+, up (\d+[smhd])( \d+[smhd])?\)$", first), first


def test_get_dash_writes_to_stdout(three: Daemon) -> None:
    f = three.files()[0]
    result = subprocess.run([sys.executable, "-m", "cloudmanagerd.ctl", "-c", str(three.config_path), "get",
                             f["hash"][:8], "-o", "-"], cwd=three.root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sha(result.stdout) == f["hash"]
    assert not (three.root / "-").exists()


def test_rm_refuses_without_a_terminal_or_yes_and_dry_run_changes_nothing(three: Daemon) -> None:
    f = three.files()[0]
    result = three.ctl("rm", f["hash"])
    assert result.returncode == 2
    assert result.stderr.decode() == ("cloudmanagerctl: rm deletes every copy of the file, on every remote; "
                                      "confirm on a terminal or pass --yes\n")
    dry = three.ctl("rm", "--dry-run", f["hash"][:8])
    assert dry.returncode == 0
    assert dry.stdout.decode() == (f"would {f['hash'][:12]} ({f['name']}, {f['size']} B): delete it from the cache and "
                                   "2 remote(s) (r0, r1), then from the catalog\n")
    assert json.loads(three.ctl("rm", "-n", "--json", f["hash"]).stdout) == {
        "hash": f["hash"], "removed": False, "cached": True, "remotes": ["r0", "r1"]}
    assert len(three.files()) == 3 and three.status()["uploads"]["copies"] == 6


def rm_on_a_terminal(d: Daemon, h: str, answer: bytes) -> tuple[int, bytes, bytes]:
    """`rm HASH` with stdin and stderr on a pseudo-terminal, answering the question with `answer`."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "cloudmanagerd.ctl", "-c", str(d.config_path), "rm", h],
                                stdin=slave, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        seen = b""
        deadline = time.monotonic() + 30
        while b"[y/N]" not in seen:
            assert time.monotonic() < deadline, seen
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
        os.write(master, answer)
        out, _ = proc.communicate(timeout=30)
        while True:  # what the terminal still holds, until it is closed (EIO)
            try:
                chunk = os.read(master, 4096) if select.select([master], [], [], 5)[0] else b""
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        return proc.returncode, out, seen
    finally:
        os.close(master)


def test_rm_asks_on_a_terminal(three: Daemon) -> None:
    f = three.files()[0]
    code, out, terminal = rm_on_a_terminal(three, f["hash"], b"n\n")
    assert code == 1 and out == b""
    assert b"This cannot be undone. Delete? [y/N]" in terminal and b"nothing deleted" in terminal
    assert len(three.files()) == 3
    code, out, terminal = rm_on_a_terminal(three, f["hash"], b"y\n")
    assert code == 0, terminal
    assert out.decode() == f"{f['hash'][:12]}: removed from the cache, every remote and the catalog\n"
    assert f["hash"] not in {x["hash"] for x in three.files()} and len(three.files()) == 2


def test_info_on_a_pending_copy_shows_attempts_next_attempt_and_last_error(daemon_factory) -> None:
    d = daemon_factory(start=False, upload={"retry": {"initial": "1h", "max": "2h"}})
    break_remote(d, 1)
    d.start()
    data = b"waits for r1\n" * 40
    (d.inbox / "wait.txt").write_bytes(data)
    h = sha(data)
    wait_for(lambda: d.status()["uploads"]["retrying"] == 1, message="the upload to r1 retrying")
    result = d.ctl("info", h[:10])
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.decode().splitlines() if x.startswith("retrying"))
    assert re.match(r"retrying r1: 1 attempt\(s\), next (in \d+[smh]( \d+[sm])?|now); last error \d+s ago: "
                    r"remote folder .*r1: a path component is not a folder$", line), line
    f = json.loads(d.ctl("info", "--json", h).stdout)
    assert f["pending"] == ["r1"]
    pair, = f["uploads"]
    assert pair["remote"] == "r1" and pair["state"] == "retrying" and pair["attempts"] == 1
    assert time.time() < pair["next_attempt"] <= time.time() + 3600
    assert "not a folder" in pair["last_error"] and pair["updated"] <= time.time()


# -- ls, streamed -----------------------------------------------------------------------------------

def test_ls_streams_many_files_in_pages(daemon_factory, monkeypatch, capsys) -> None:
    d = daemon_factory(remotes=0)
    count = 1100  # more than one of the daemon's pages (ops.LS_PAGE)
    for i in range(count):
        (d.inbox / f"n{i:05}").write_bytes(b"%d\n" % i)
    wait_for(lambda: d.status()["catalog"]["files"] == count, timeout=120, message="every file registered")
    everything = d.files()  # a raw request without a limit: the daemon streams its one reply line
    assert len(everything) == count and len({f["hash"] for f in everything}) == count
    assert everything == sorted(everything, key=lambda f: (-f["added"], f["hash"]))
    reply = d.request({"cmd": "ls", "limit": 3, "after": [everything[1]["added"], everything[1]["hash"]]})
    assert [f["hash"] for f in reply["result"]] == [f["hash"] for f in everything[2:5]]
    bad = d.request({"cmd": "ls", "after": ["x", 1]})
    assert bad == {"ok": False, "error": "ls: after must be [added, hash] of the last file of the previous page"}

    ndjson = d.ctl("ls", "--ndjson")
    assert [json.loads(x) for x in ndjson.stdout.splitlines()] == everything
    assert json.loads(d.ctl("ls", "--json").stdout) == everything
    assert len(d.ctl("ls").stdout.splitlines()) == count + 1  # not a terminal: every file, and the header

    # the client pages too: with pages of 7 it asks 158 times and prints the same
    monkeypatch.setattr(ctlmod, "LS_PAGE", 7)
    assert ctlmod.main(["-c", str(d.config_path), "ls", "--json", "--limit", "50"]) == 0
    assert json.loads(capsys.readouterr().out) == everything[:50]
    assert ctlmod.main(["-c", str(d.config_path), "ls", "--json", "--limit", "0"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_a_streamed_reply_to_a_client_that_left_ends_quietly(caplog) -> None:
    """The client reads the first bytes of a long `ls` and goes: the write fails (OSError, which ends
    the request) and nothing is logged; a failure of the catalog half-way closes the connection, with
    one line in the log (a failure before the first byte is an error reply: ops.ls_pages)."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client = control.Client(ours, time.monotonic())
    items = ({"hash": "%064x" % i, "name": "x" * 100} for i in range(100_000))
    reader = threading.Thread(target=lambda: (theirs.recv(10), theirs.close()))
    reader.start()
    try:
        with pytest.raises(OSError):
            client.send_stream(control.Streamed(items))
    finally:
        reader.join(30)
        ours.close()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []

    def broken():
        yield {"hash": "a"}
        raise sqlite3.OperationalError("disk I/O error")

    ours, theirs = socket.socketpair()
    with ours, theirs:
        with pytest.raises(OSError):
            control.Client(ours, time.monotonic()).send_stream(control.Streamed(broken()))
        assert theirs.recv(1 << 16) == b'{"ok":true,"result":['  # cut: the client sees no valid reply
    record, = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.getMessage() == "control: a streamed reply cut half-way: catalog: disk I/O error"
    assert record.exc_info is None  # one line, as every catalog error: the health check says the rest


def test_ls_on_a_terminal_shows_a_screenful(three: Daemon, monkeypatch, capsys) -> None:
    monkeypatch.setattr(ctlmod, "LS_TERMINAL", 2)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert ctlmod.main(["-c", str(three.config_path), "ls"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3  # the header and two files
    assert err == "... more files: --limit N shows N of them, or pipe the output\n"


def test_progress_is_drawn_on_a_terminal_only_and_cleared(monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with ctlmod.Progress("get") as progress:
        progress({"done": 3_000_000, "total": 30_000_000})
        progress({})  # a heartbeat before the first figures
    text = term.getvalue()
    assert text == "\r\x1b[Kget: 2.9 MiB of 28.6 MiB (10%)\r\x1b[K"
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    with ctlmod.Progress("get") as progress:
        progress({"done": 1, "total": 2})
    assert plain.getvalue() == ""
