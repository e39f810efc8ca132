"""Reload (SIGHUP and `cloudmanagerctl reload`): what can change live changes, a broken config keeps the running one.

Each test edits the daemon's config file the way an operator would, asks for a reload, and
checks what a user notices: status, where new files' copies go, what the log says.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from conftest import Daemon, wait_for

RELOAD_FAILED = "reload failed, keeping the running config: "


def write_config(d: Daemon, config: dict[str, Any]) -> None:
    d.config = config
    d.config_path.write_text(yaml.safe_dump(config))


def reloaded_count(d: Daemon) -> int:
    return d.log().count(f"reloaded {d.config_path}")


def failed_lines(d: Daemon) -> list[str]:
    return [line for line in d.log().splitlines() if RELOAD_FAILED in line]


def reload_by_signal(d: Daemon) -> None:
    before = reloaded_count(d)
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: reloaded_count(d) > before, message="the reload to finish")


def reload_by_ctl(d: Daemon) -> None:
    before = reloaded_count(d)
    result = d.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == "config reloaded"
    wait_for(lambda: reloaded_count(d) > before, message="the reload to finish")


def drop(d: Daemon, name: str, data: bytes, inbox: Path | None = None) -> str:
    (inbox or d.inbox).joinpath(name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def copies_of(d: Daemon, h: str) -> list[str]:
    reply = d.request({"cmd": "info", "hash": h})
    return sorted(c["remote"] for c in reply["result"]["copies"]) if reply["ok"] else []


def remote_object(d: Daemon, remote: str, h: str) -> Path:
    path = next(r["path"] for r in d.config["remotes"] if r["name"] == remote)
    return Path(path) / h[:2] / h


def test_capacity_and_log_level_change_live_by_sighup_and_by_ctl(daemon_factory) -> None:
    d = daemon_factory(remotes=1, log={"level": "warning"})
    assert d.status()["cache"]["capacity"] == 2**30
    quiet = drop(d, "quiet.txt", b"logged at info, hidden at warning\n")
    wait_for(lambda: copies_of(d, quiet) == ["r0"], message="the first file copied")
    assert f"uploaded hash={quiet}" not in d.log()
    assert " INFO " not in d.log()

    # SIGHUP: a new capacity and log level info
    write_config(d, {**d.config, "log": {"level": "info"}, "cache": {**d.config["cache"], "capacity": "2GiB"}})
    reload_by_signal(d)
    assert d.status()["cache"]["capacity"] == 2 * 2**30
    loud = drop(d, "loud.txt", b"now info lines show\n")
    wait_for(lambda: f"uploaded hash={loud}" in d.log(), message="the upload logged at info")

    # cloudmanagerctl reload: another capacity, back to warning (the "reloaded" line is at info and
    # hidden now: wait for the capacity instead)
    write_config(d, {**d.config, "log": {"level": "warning"}, "cache": {**d.config["cache"], "capacity": "300MiB"}})
    result = d.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == "config reloaded"
    wait_for(lambda: d.status()["cache"]["capacity"] == 300 * 2**20, message="the second reload")
    s = d.status()
    assert s["state"] == "running" and s["pid"] == d.proc.pid
    assert "300.0 MiB" in d.ctl("status").stdout.decode()
    hushed = drop(d, "hushed.txt", b"quiet again\n")
    wait_for(lambda: copies_of(d, hushed) == ["r0"], message="the third file copied")
    assert f"uploaded hash={hushed}" not in d.log()
    assert failed_lines(d) == []


def test_redundancy_and_remotes_added_or_removed_apply_to_new_files(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(remotes=2)
    first = drop(d, "first.txt", b"before the reload\n" * 50)
    wait_for(lambda: copies_of(d, first) == ["r0", "r1"], message="two copies of the first file")

    # a third remote and redundancy 3, through cloudmanagerctl reload
    third = workdir / "remotes" / "r2"
    third.mkdir()
    remotes = [*d.config["remotes"], {"name": "r2", "type": "directory", "path": str(third)}]
    write_config(d, {**d.config, "remotes": remotes, "upload": {"redundancy": 3}})
    reload_by_ctl(d)
    assert [r["name"] for r in d.status()["remotes"]] == ["r0", "r1", "r2"]
    data = b"after the reload, three copies\n" * 40
    second = drop(d, "second.txt", data)
    wait_for(lambda: copies_of(d, second) == ["r0", "r1", "r2"], message="three copies of the second file")
    assert remote_object(d, "r2", second).read_bytes() == data
    # the file from before the reload is brought up to the new redundancy too
    wait_for(lambda: copies_of(d, first) == ["r0", "r1", "r2"], message="a third copy of the first file")
    assert d.status()["safety"]["below_redundancy"] == 0

    # remove r0, redundancy 2, by SIGHUP: new files go to r1 and r2 only
    r0 = Path(remotes[0]["path"])
    write_config(d, {**d.config, "remotes": remotes[1:], "upload": {"redundancy": 2}})
    reload_by_signal(d)
    assert [r["name"] for r in d.status()["remotes"]] == ["r1", "r2"]
    third_h = drop(d, "third.txt", b"r0 is gone\n" * 30)
    wait_for(lambda: copies_of(d, third_h) == ["r1", "r2"], message="copies on r1 and r2")
    assert not (r0 / third_h[:2] / third_h).exists()
    s = d.status()
    assert s["uploads"]["queued"] == s["uploads"]["active"] == s["uploads"]["failed"] == 0
    assert s["problems"] == [] and s["state"] == "running"


def test_a_broken_config_is_refused_and_the_running_one_kept(daemon_factory) -> None:
    d = daemon_factory(remotes=2)
    good = d.config
    before = d.status()

    # two errors: one log line each, naming its key
    write_config(d, {**good, "cache": {**good["cache"], "capacity": "-5MiB"}, "bogus": 1})
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(failed_lines(d)) == 2, message="two 'reload failed' lines")
    lines = failed_lines(d)
    assert any("cache.capacity" in line for line in lines), lines
    assert any("bogus" in line for line in lines), lines

    # a YAML syntax error, reloaded through cloudmanagerctl (-s: the broken file cannot name the socket)
    d.config_path.write_text("inbox: [unclosed\n")
    result = subprocess.run([sys.executable, "-m", "cloudmanagerd.ctl", "-s", d.socket_path, "reload"],
                            capture_output=True, timeout=60)
    # the operator is told at once, in one line, and status keeps showing it until a good reload
    assert result.returncode == 1, result.stderr
    assert result.stderr.decode().count("\n") == 1 and "reload failed" in result.stderr.decode()
    assert any(p.startswith("reload failed") for p in d.status()["problems"])
    wait_for(lambda: len(failed_lines(d)) == 3, message="a third 'reload failed' line")
    # more copies than remotes
    write_config(d, {**good, "upload": {"redundancy": 3}})
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(failed_lines(d)) == 4, message="a fourth 'reload failed' line")
    assert "upload.redundancy" in failed_lines(d)[-1]

    # nothing changed, and the daemon works on with the old config
    assert d.proc.poll() is None
    after = d.status()
    assert after["cache"] == before["cache"]
    assert after["remotes"] == before["remotes"]
    # running with a problem an operator should know about, until a reload succeeds
    assert after["state"] == "degraded" and after["problems"][0].startswith("reload failed: upload.redundancy")
    assert reloaded_count(d) == 0
    h = drop(d, "still-works.txt", b"the old config still runs\n" * 20)
    wait_for(lambda: copies_of(d, h) == ["r0", "r1"], message="a new file copied to both remotes")
    assert "Traceback" not in d.log()


def test_moving_the_inbox_or_the_catalog_needs_a_restart(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(remotes=1)
    old_inbox = d.inbox
    new_inbox = workdir / "inbox2"
    new_inbox.mkdir()
    write_config(d, {**d.config, "inbox": str(new_inbox), "catalog": f"sqlite:///{workdir}/elsewhere.sqlite3",
                     "cache": {**d.config["cache"], "capacity": "512MiB"}})
    reload_by_signal(d)
    warning = next(line for line in d.log().splitlines() if "restart cloudmanagerd to apply" in line)
    assert "inbox" in warning and "catalog" in warning, warning

    # the live part applied, the rest kept
    s = d.status()
    assert s["cache"]["capacity"] == 512 * 2**20
    assert s["inbox"]["path"] == str(old_inbox)
    assert not (workdir / "elsewhere.sqlite3").exists()

    # files in the new inbox are not picked up; the old inbox still works
    drop(d, "ignored.txt", b"not watched yet\n", inbox=new_inbox)
    h = drop(d, "taken.txt", b"the old inbox is still watched\n", inbox=old_inbox)
    wait_for(lambda: copies_of(d, h) == ["r0"], message="the file from the old inbox")
    assert (new_inbox / "ignored.txt").exists()
    assert d.status()["catalog"]["files"] == 1
