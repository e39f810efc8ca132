"""The cloudmanagerctl commands tests/test_ctl.py leaves out, in human and --json form:
pin, unpin, rm, verify, backup, retry and reload.

Most calls run cloudmanagerctl's main() in this process (`ctl()`), the same code a user's
command runs minus the interpreter start-up (0.5 s each here); one call per command goes
through a real subprocess (`Daemon.ctl`) so that exit codes and streams are the real ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, module_daemon, wait_for

DROPS = {"a.txt": b"alpha\n" * 400, "b.txt": b"bravo\n" * 500, "c.txt": b"charlie\n" * 600}
UNKNOWN = "f" * 64


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


H = {name: sha(data) for name, data in DROPS.items()}


@pytest.fixture(scope="module")
def pop() -> Iterator[Daemon]:
    """One daemon holding DROPS, each with two copies."""
    with module_daemon("cm-ctl2-") as d:
        for name, data in DROPS.items():
            (d.inbox / name).write_bytes(data)
        wait_for(lambda: sum(len(f["copies"]) == 2 for f in d.files()) == len(DROPS), message="every file copied twice")
        yield d


def ctl(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    """cloudmanagerctl -c CONFIG ARGS... run in this process: exit code, stdout and stderr as bytes."""
    from cloudmanagerd.ctl import main
    out, err = io.StringIO(), io.StringIO()
    argv = ["-c", str(d.config_path), *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(argv, code, out.getvalue().encode(), err.getvalue().encode())


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.args, result.stderr)
    assert "Traceback" not in result.stderr.decode()
    return result.stdout.decode()


def ok_json(result: subprocess.CompletedProcess) -> Any:
    return json.loads(ok(result))


def refused(result: subprocess.CompletedProcess) -> str:
    """The daemon said no: exit 1, one readable line on stderr, nothing on stdout."""
    assert result.returncode == 1, (result.args, result.stdout, result.stderr)
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cloudmanagerctl: "), lines
    assert result.stdout == b""
    return lines[0]


def usage_error(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 2, (result.args, result.stdout, result.stderr)
    assert result.stdout == b"" and "Traceback" not in result.stderr.decode()


def info(d: Daemon, h: str) -> dict[str, Any]:
    reply = d.request({"cmd": "info", "hash": h})
    assert reply["ok"], reply
    return reply["result"]


def cache_object(d: Daemon, h: str) -> Path:
    return d.cache / h[:2] / h


def remote_object(d: Daemon, i: int, h: str) -> Path:
    return Path(d.config["remotes"][i]["path"]) / h[:2] / h


# -- pin / unpin ------------------------------------------------------------------------------------

def test_pin_and_unpin_in_both_forms(pop: Daemon) -> None:
    h = H["a.txt"]
    assert ok(pop.ctl("pin", h)).strip() == f"{h[:12]}: pinned in the cache"
    assert info(pop, h)["pinned"] is True
    assert ok_json(ctl(pop, "--json", "unpin", h[:8])) == {"hash": h, "pinned": False}
    assert info(pop, h)["pinned"] is False
    assert ok_json(ctl(pop, "pin", h[:10], "--json")) == {"hash": h, "pinned": True}
    assert "pinned" in ok(ctl(pop, "info", h))
    assert ok(pop.ctl("unpin", h)).strip() == f"{h[:12]}: may be evicted again"
    assert info(pop, h)["pinned"] is False


@pytest.mark.parametrize("command", ["pin", "unpin", "rm"])
def test_pin_unpin_rm_of_an_unknown_hash_fail_with_one_line(pop: Daemon, command: str) -> None:
    assert "no file with hash" in refused(pop.ctl(command, UNKNOWN))  # a real process: the real streams
    for form in ((), ("--json",)):
        refused(ctl(pop, *form, command, UNKNOWN))
        refused(ctl(pop, *form, command, UNKNOWN[:7]))
        refused(ctl(pop, *form, command, "../../etc/passwd"))
    usage_error(ctl(pop, command))
    assert pop.status()["catalog"]["files"] == len(DROPS)


def test_pin_fetches_an_evicted_file_back(daemon_factory) -> None:
    # room for one file at a time: the second pushes the first out once it has its copies
    d = daemon_factory(remotes=2, cache={"capacity": "10KB"})
    first, second = b"1" * 6000, b"2" * 6000
    (d.inbox / "first.bin").write_bytes(first)
    wait_for(lambda: len(info(d, sha(first))["copies"]) == 2, message="two copies of the first file")
    (d.inbox / "second.bin").write_bytes(second)
    wait_for(lambda: not info(d, sha(first))["cached"], message="the first file evicted")
    assert [f["hash"] for f in json.loads(ok(ctl(d, "ls", "--json", "--state", "evicted")))] == [sha(first)]
    wait_for(lambda: len(info(d, sha(second))["copies"]) == 2, message="two copies of the second file")

    assert ok(ctl(d, "pin", sha(first)[:8])).strip() == f"{sha(first)[:12]}: pinned in the cache"
    f = info(d, sha(first))
    assert f["cached"] and f["pinned"]
    assert cache_object(d, sha(first)).read_bytes() == first
    assert not info(d, sha(second))["cached"], "the unpinned file made room"
    assert ok_json(ctl(d, "--json", "unpin", sha(first))) == {"hash": sha(first), "pinned": False}


# -- rm -----------------------------------------------------------------------------------------------

def test_rm_forgets_a_file_everywhere_in_both_forms(daemon_factory) -> None:
    d = daemon_factory(remotes=2)
    one, two = b"remove me\n" * 10, b"and me\n" * 10
    (d.inbox / "one.txt").write_bytes(one)
    (d.inbox / "two.txt").write_bytes(two)
    wait_for(lambda: sum(len(f["copies"]) == 2 for f in d.files()) == 2, message="both files copied twice")

    h = sha(one)
    out = ok(d.ctl("rm", "--yes", h[:8]))
    assert out.strip() == f"{h[:12]}: removed from the cache, every remote and the catalog"
    assert not cache_object(d, h).exists()
    assert not remote_object(d, 0, h).exists() and not remote_object(d, 1, h).exists()
    refused(ctl(d, "info", h))

    h2 = sha(two)
    assert ok_json(ctl(d, "--json", "rm", "-y", h2)) == {"hash": h2, "removed": True}
    assert not cache_object(d, h2).exists() and not remote_object(d, 1, h2).exists()
    s = d.status()
    assert s["catalog"] == {"files": 0, "bytes": 0}
    assert s["cache"]["used"] == 0 and s["uploads"]["copies"] == 0
    # the same content dropped again is a new file, not a ghost
    (d.inbox / "again.txt").write_bytes(one)
    wait_for(lambda: len(info(d, h)["copies"]) == 2, message="the content registered anew")


# -- verify -------------------------------------------------------------------------------------------

def test_verify_in_both_forms_and_a_corrupt_object_is_repaired(pop: Daemon) -> None:
    n = len(DROPS)
    human = ok(pop.ctl("verify"))
    assert human.strip() == f"cache: {n} checked, 0 corrupt, 0 missing, 0 fetched again, 0 lost"
    human = ok(ctl(pop, "verify", "--remotes")).splitlines()
    assert human[1] == (f"remotes: {2 * n} copies checked, 0 bad (being replaced), 0 could not be checked "
                        "(quick: exists with the right size)")
    assert sorted(human[2:]) == [f"  {r} (quick): {n} checked, 0 bad, 0 could not be checked" for r in ("r0", "r1")]

    result = ok_json(ctl(pop, "--json", "verify", "--remotes"))
    assert result["cache"] == {"checked": n, "corrupt": 0, "missing": 0, "refetched": 0, "lost": 0}
    per = {"depth": "quick", "checked": n, "bad": 0, "unreachable": 0}
    assert result["remotes"] == {"depth": "quick", "checked": 2 * n, "bad": 0, "unreachable": 0, "bytes_read": 0,
                                 "per_remote": {"r0": per, "r1": per}}
    assert "remotes" not in ok_json(ctl(pop, "verify", "--json"))

    # flip a byte of a cached object: verify finds it and fetches a good copy back
    h = H["b.txt"]
    obj = cache_object(pop, h)
    data = bytearray(obj.read_bytes())
    data[0] ^= 0xFF
    os.chmod(obj, 0o644)
    obj.write_bytes(bytes(data))
    result = ok_json(ctl(pop, "verify", "--json"))
    assert result["cache"]["corrupt"] == 1 and result["cache"]["refetched"] == 1 and result["cache"]["lost"] == 0
    assert obj.read_bytes() == DROPS["b.txt"]
    assert ok(ctl(pop, "verify")).startswith(f"cache: {n} checked, 0 corrupt")


# -- backup -------------------------------------------------------------------------------------------

def test_backup_is_a_valid_sqlite_catalog_with_the_files(pop: Daemon, tmp_path: Path) -> None:
    out = tmp_path / "catalog-backup.sqlite3"
    text = ok(pop.ctl("backup", "-o", str(out))).strip()
    assert text.startswith(f"catalog backed up to {out} (") and text.endswith(")")
    assert stat.S_IMODE(out.stat().st_mode) & 0o077 == 0, "the backup holds every URL: not for other users"
    with sqlite3.connect(f"file:{out}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        files = {h: (bytes(name).decode(), size) for h, name, size in db.execute("SELECT hash, name, size FROM files")}
        copies = db.execute("SELECT hash, remote, url FROM copies").fetchall()
    db.close()
    assert files == {H[name]: (name, len(data)) for name, data in DROPS.items()}
    assert sorted((h, r) for h, r, _ in copies) == sorted((h, r) for h in H.values() for r in ("r0", "r1"))
    assert all(url for _, _, url in copies)

    out2 = tmp_path / "again.sqlite3"
    out2.write_bytes(b"x" * 10_000_000)  # an older, bigger file at the path: replaced, not patched
    result = ok_json(ctl(pop, "--json", "backup", "-o", str(out2)))
    assert result == {"bytes": out2.stat().st_size}
    with sqlite3.connect(f"file:{out2}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("SELECT COUNT(*) FROM files").fetchone()[0] == len(DROPS)
    db.close()

    refused(ctl(pop, "backup", "-o", str(tmp_path / "no" / "such" / "dir.sqlite3")))
    usage_error(ctl(pop, "backup"))


# -- retry, reload --------------------------------------------------------------------------------------

def test_retry_revives_given_up_uploads_in_both_forms(daemon_factory) -> None:
    d = daemon_factory(start=False, upload={"retry": {"max_attempts": 1}})
    broken = Path(d.config["remotes"][1]["path"])
    broken.rmdir()
    broken.write_text("a file where the remote folder should be")
    d.start()
    x, y = b"first to fail\n" * 20, b"second to fail\n" * 20
    (d.inbox / "x.txt").write_bytes(x)
    (d.inbox / "y.txt").write_bytes(y)
    wait_for(lambda: d.status()["uploads"]["failed"] == 2, message="both r1 uploads given up")
    failed = json.loads(ok(ctl(d, "ls", "--json", "--state", "failed")))
    assert sorted(f["hash"] for f in failed) == sorted([sha(x), sha(y)])
    assert all(f["failed"][0]["remote"] == "r1" and f["failed"][0]["attempts"] == 1 for f in failed)
    assert "failed   r1: 1 attempt(s), given up" in ok(ctl(d, "info", sha(x)))

    broken.unlink()
    broken.mkdir()
    assert ok(d.ctl("retry", sha(x)[:8])).strip() == "requeued 1 given-up and 0 waiting pairs"
    wait_for(lambda: len(info(d, sha(x))["copies"]) == 2, message="x copied to r1 after the retry")
    assert info(d, sha(y))["failed"], "retry of one hash revived only that one"
    assert ok_json(ctl(d, "--json", "retry", "--all")) == {"requeued": 1, "given_up": 1, "waiting": 0}
    wait_for(lambda: len(info(d, sha(y))["copies"]) == 2, message="y copied to r1 after retry --all")
    assert ok(ctl(d, "retry", "--all")).strip() == "requeued 0 given-up and 0 waiting pairs"
    assert d.status()["uploads"]["failed"] == 0
    usage_error(ctl(d, "retry"))
    refused(ctl(d, "retry", UNKNOWN))


def test_reload_human_form(pop: Daemon) -> None:
    before = pop.log().count("reloaded ")
    assert ok(pop.ctl("reload")).strip() == "config reloaded"
    wait_for(lambda: pop.log().count("reloaded ") > before, message="the reload")
    assert pop.status()["state"] == "running"
