"""The retry loop end to end: a dead, read-only or full remote never holds redundancy back,
never loses a queued upload, and a restart resumes the queue."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import sha256_of, wait_for

FAST_RETRY = {"retry": {"initial": "0.2s", "max": "1s"}}


def copies_by_remote(d) -> dict[str, int]:
    return {r["name"]: r["copies"] for r in d.status()["remotes"]}


def drop(d, count: int, size: int = 20_000, prefix: str = "f") -> list[str]:
    hashes = []
    for i in range(count):
        data = os.urandom(size)
        (d.inbox / f"{prefix}{i}").write_bytes(data)
        import hashlib
        hashes.append(hashlib.sha256(data).hexdigest())
    return hashes


def file_copies(d) -> dict[str, set[str]]:
    return {f["hash"]: {c["remote"] for c in f["copies"]} for f in d.files()}


def test_four_remotes_one_broken_redundancy_three_reaches_three_on_the_others(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(remotes=4, start=False, upload={"redundancy": 3, **FAST_RETRY})
    broken = Path(d.config["remotes"][1]["path"])
    broken.rmdir()
    broken.write_text("a file where a folder should be")
    d.config_path.write_text(__import__("yaml").safe_dump(d.config))
    d.start()
    hashes = drop(d, 10)
    wait_for(lambda: all(file_copies(d).get(h) == {"r0", "r2", "r3"} for h in hashes), timeout=30,
             message="every file on r0, r2 and r3")
    status = d.status()
    r1 = next(r for r in status["remotes"] if r["name"] == "r1")
    assert not r1["healthy"] and r1["errors"] >= 1 and "r1" in " ".join(status["problems"])
    for h in hashes:
        for name in ("r0", "r2", "r3"):
            assert sha256_of(Path(d.config["remotes"][int(name[1])]["path"]) / h[:2] / h) == h
    assert d.stop() == 0


def test_redundancy_four_waits_at_three_then_the_retry_loop_alone_makes_the_fourth(daemon_factory) -> None:
    d = daemon_factory(remotes=4, start=False, upload={"redundancy": 4, **FAST_RETRY})
    broken = Path(d.config["remotes"][3]["path"])
    broken.rmdir()
    d.start()
    hashes = drop(d, 5)
    wait_for(lambda: all(len(file_copies(d).get(h, ())) == 3 for h in hashes), timeout=30,
             message="three copies each")
    s = d.status()
    assert s["safety"]["below_redundancy"] == 5 and s["uploads"]["retrying"] + s["uploads"]["queued"] >= 5
    assert all(f["pending"] == ["r3"] for f in d.files())
    broken.mkdir()  # the operator fixes the remote; nobody runs retry
    wait_for(lambda: all(len(file_copies(d).get(h, ())) == 4 for h in hashes), timeout=30,
             message="the fourth copy made by the retry loop")
    assert d.status()["safety"]["below_redundancy"] == 0
    assert d.stop() == 0


def test_a_restart_mid_queue_loses_nothing(daemon_factory) -> None:
    d = daemon_factory(remotes=2, start=False, upload={"redundancy": 2, **FAST_RETRY})
    slow = Path(d.config["remotes"][1]["path"])
    slow.rmdir()
    d.start()
    hashes = drop(d, 20)
    wait_for(lambda: len(d.files()) == 20 and all("r0" in c for c in file_copies(d).values()), timeout=30,
             message="all files on r0, r1 pending")
    d.kill()  # SIGKILL with twenty uploads queued or in flight
    slow.mkdir()
    d.start()
    wait_for(lambda: all(file_copies(d).get(h) == {"r0", "r1"} for h in hashes), timeout=30,
             message="the queue resumed after the restart")
    assert d.status()["uploads"]["active"] == 0
    assert d.stop() == 0


@pytest.fixture
def tiny_mount(workdir: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a full remote gives ENOSPC even to root."""
    path = workdir / "tiny"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_remote_is_reported_and_a_spare_takes_its_place(daemon_factory, tiny_mount: Path) -> None:
    d = daemon_factory(remotes=2, start=False, upload={"redundancy": 1, **FAST_RETRY})
    d.config["remotes"].insert(0, {"name": "tiny", "type": "directory", "path": str(tiny_mount)})
    d.config_path.write_text(__import__("yaml").safe_dump(d.config))
    d.start()
    hashes = drop(d, 3, size=600_000)
    wait_for(lambda: len(d.files()) == 3 and all(len(c) == 1 for c in file_copies(d).values()), timeout=30,
             message="each file with one copy")
    status = d.status()
    tiny = next(r for r in status["remotes"] if r["name"] == "tiny")
    assert tiny["errors"] >= 1 and "no space left" in (tiny["last_error"] or "")
    # nothing in the catalog claims a copy the full remote does not hold
    for h, remotes in file_copies(d).items():
        if "tiny" in remotes:
            assert sha256_of(tiny_mount / h[:2] / h) == h
    assert not [p for p in tiny_mount.rglob("*") if p.is_file() and not p.name.startswith(".")
                and p.name not in hashes]
    assert d.stop() == 0


def test_a_read_only_remote_is_reported_and_skipped(daemon_factory, tiny_mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_mount)], check=True)
    d = daemon_factory(remotes=1, start=False, upload={"redundancy": 1, **FAST_RETRY})
    d.config["remotes"].insert(0, {"name": "ro", "type": "directory", "path": str(tiny_mount)})
    d.config_path.write_text(__import__("yaml").safe_dump(d.config))
    d.start()
    hashes = drop(d, 3)
    wait_for(lambda: all(file_copies(d).get(h) == {"r0"} for h in hashes), timeout=30, message="copies on r0")
    ro = next(r for r in d.status()["remotes"] if r["name"] == "ro")
    assert not ro["healthy"] and "read-only" in (ro["last_error"] or "")
    assert "Traceback" not in d.log()
    assert d.stop() == 0
