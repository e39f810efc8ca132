"""Hints that fit the place: a full remote, a read-only state folder, and `--check-config` that agrees with the start.

Issue 10, item 14 (`get -o /dev/full` is in test_get_output.py). Read-only and tiny filesystems are
real mounts (CI runs as root), removed in the teardown.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import CI, Daemon, wait_for


@pytest.fixture
def mount() -> Iterator[Callable[..., Path]]:
    """mount(path, *options) -> path with a small tmpfs mounted on it; unmounted afterwards."""
    if os.geteuid() != 0:
        if CI:
            pytest.fail("CI runs as root: these tests mount filesystems")
        pytest.skip("mounting a filesystem needs root")
    mounted: list[Path] = []

    def make(path: Path, *options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=64k", *options)), "tmpfs", str(path)],
                       check=True)
        mounted.append(path)
        return path

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def check_config(config_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudmanagerd", "-c", str(config_path), "--check-config"],
                          capture_output=True, timeout=60)


def refused_start(d: Daemon) -> list[str]:
    """Start a daemon that must refuse: its ERROR lines."""
    d.start(wait=False)
    try:
        assert d.proc.wait(30) == 1, d.log()
    finally:
        if d.proc.poll() is None:
            d.kill()
        d._close_log()
    assert "Traceback" not in d.log(), d.log()
    return [line for line in d.log().splitlines() if " ERROR " in line]


def test_a_full_remote_is_not_told_to_lower_the_cache_capacity(daemon_factory, workdir: Path, mount) -> None:
    mount(workdir / "remotes" / "r0")
    d = daemon_factory(remotes=1)
    (d.inbox / "big.bin").write_bytes(os.urandom(200_000))  # over the remote's 64 KiB
    remote = wait_for(lambda: next((r for r in d.status()["remotes"] if r["last_error"]), None), timeout=30,
                      message="the remote's error")
    assert "no space left" in remote["last_error"], remote
    lines = [line for line in d.log().splitlines() if "no space left" in line]
    assert lines, d.log()[-2000:]
    assert not any("cache.capacity" in line for line in lines), lines
    assert d.stop() == 0


@pytest.mark.parametrize("key", ["state", "cache"])
def test_a_folder_on_a_read_only_mount_is_named_as_such(daemon_factory, workdir: Path, mount, key: str) -> None:
    d = daemon_factory(start=False)
    path = Path(d.config[key] if key == "state" else d.config["cache"]["path"])
    mount(path, "ro")
    checked = check_config(d.config_path)
    assert checked.returncode == 1, checked.stdout
    said = checked.stderr.decode().splitlines()
    assert len(said) == 1 and "read-only mount" in said[0] and "chown" not in said[0], said
    errors = refused_start(d)
    assert len(errors) == 1 and "read-only mount" in errors[0] and "chown" not in errors[0], errors


def test_a_folder_to_create_under_a_read_only_mount_is_named_as_such(daemon_factory, workdir: Path, mount) -> None:
    ro = mount(workdir / "ro", "ro")
    d = daemon_factory(start=False, state=str(ro / "state"))
    checked = check_config(d.config_path)
    assert checked.returncode == 1
    assert f"state: {ro}, where it would be created, is on a read-only mount" in checked.stderr.decode()


@pytest.mark.parametrize("case", ["cache-is-a-file", "cache-under-a-file", "state-is-a-file", "socket-is-a-file"])
def test_check_config_refuses_what_the_daemon_refuses(daemon_factory, workdir: Path, case: str) -> None:
    blocker = workdir / "a-file"
    blocker.write_text("not a folder\n")
    overrides = {"cache-is-a-file": {"cache": {"path": str(blocker)}},
                 "cache-under-a-file": {"cache": {"path": str(blocker / "cache")}},
                 "state-is-a-file": {"state": str(blocker)},
                 "socket-is-a-file": {"control": {"socket": str(blocker)}}}[case]
    d = daemon_factory(start=False, **overrides)
    checked = check_config(d.config_path)
    assert checked.returncode == 1, (checked.stdout, checked.stderr)
    said = checked.stderr.decode().splitlines()
    assert len(said) == 1 and str(blocker) in said[0], said
    assert "not a folder" in said[0] or "not a socket" in said[0], said
    assert "chown" not in said[0]
    assert b"config OK" not in checked.stdout
    errors = refused_start(d)
    assert len(errors) == 1 and str(blocker) in errors[0], errors
    assert blocker.read_text() == "not a folder\n"


def test_check_config_still_says_ok_for_folders_it_can_create(daemon_factory) -> None:
    d = daemon_factory(start=False)
    checked = check_config(d.config_path)
    assert checked.returncode == 0, checked.stderr
    assert b"config OK" in checked.stdout
