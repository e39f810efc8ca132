"""A remote's `rate_limit:`: the config's checks, and a 20 MiB transfer at 5 MiB/s taking 4 s
(within 10%) up and down on a folder, S3 (SeaweedFS) and rclone remote; a reload applies it."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import sha256_of, wait_for
from seaweed import SeaweedFS, seaweed
from test_config import build, directory, errors_of, minimal

from cloudmanagerd.hashing import sha256_fd
from cloudmanagerd.remotes import build_remote
from cloudmanagerd.remotes.base import Cancelled, RateLimit, Transfer

MiB = 1 << 20
SIZE = 20 * MiB
LIMIT = "5MiB/s"
EXPECTED = 4.0  # seconds: 20 MiB at 5 MiB/s
FIXTURES = (seaweed,)  # pytest finds the session-scoped SeaweedFS server through this import


# -- the config ----------------------------------------------------------------------------


def test_rate_limit_is_read_per_remote() -> None:
    config = build(minimal(remotes=[{**directory("nas"), "rate_limit": "10MiB/s"}, directory("usb")]))
    nas, usb = config.remotes
    assert nas.get("rate_limit") == 10 * MiB
    assert usb.get("rate_limit") is None
    assert build(minimal(remotes=[{**directory("nas"), "rate_limit": "off"}])).remotes[0].get("rate_limit") == 0


@pytest.mark.parametrize("value, said", [
    ("fast", "remotes[0].rate_limit: expected a rate like 64KiB/s"),
    ("10MiB", "(add /s or /h)"),
    (-5, "it cannot be negative"),
    (True, "expected a rate like 64KiB/s"),
    ([1], "expected a rate like 64KiB/s"),
    ("10B/s", "must be 0 (no limit) or at least 1KiB/s"),
])
def test_a_bad_rate_limit_is_one_clear_line(value: object, said: str) -> None:
    errors = errors_of(minimal(remotes=[{**directory("nas"), "rate_limit": value}]))
    assert len(errors) == 1 and said in errors[0], errors


def test_a_limit_below_min_rate_would_cancel_every_upload() -> None:
    errors = errors_of(minimal(upload={"min_rate": "1MiB/s", "concurrency": 1},
                               remotes=[{**directory("nas"), "rate_limit": "512KiB/s"}]))
    assert errors == ["remotes[0].rate_limit: is below upload.min_rate (1048576 bytes/s), so every upload to "
                      "it would be cancelled as too slow; raise it or lower upload.min_rate"]


def test_a_shared_limit_must_leave_min_rate_to_each_concurrent_upload() -> None:
    shared = {**directory("nas"), "rate_limit": "200KiB/s"}  # 4 uploads at once: 50 KiB/s each
    errors = errors_of(minimal(remotes=[shared]))  # upload.min_rate 64KiB/s, concurrency 4 by default
    assert len(errors) == 1 and errors[0].startswith(
        "remotes[0].rate_limit: is below upload.min_rate times upload.concurrency (262144 bytes/s): the 4 "
        "uploads that may share it"), errors
    assert build(minimal(upload={"concurrency": 2}, remotes=[shared])).remotes[0].get("rate_limit") == 200 * 1024
    # rclone's --bwlimit holds per rclone process: each upload gets the whole rate
    rclone = {"name": "far", "type": "rclone", "remote": "far:bucket", "rate_limit": "200KiB/s"}
    assert build(minimal(remotes=[rclone])).remotes[0].get("rate_limit") == 200 * 1024


def test_plowshare_cannot_be_limited_and_says_so() -> None:
    errors = errors_of(minimal(remotes=[{"name": "mega", "type": "plowshare", "host": "mega",
                                         "rate_limit": "1MiB/s"}]))
    assert len(errors) == 1 and errors[0].startswith("remotes[0].rate_limit: plowshare remotes cannot be "
                                                     "rate-limited"), errors


# -- the bucket ----------------------------------------------------------------------------


def test_a_cancelled_transfer_stops_waiting_at_once() -> None:
    limit = RateLimit(1024 * 1024)
    transfer = Transfer(100 * MiB)
    threading.Timer(0.2, transfer.cancel, ("daemon stopping",)).start()
    started = time.monotonic()
    with pytest.raises(Cancelled, match="daemon stopping"):
        limit.take(100 * MiB, transfer)  # 100 s of bytes
    assert time.monotonic() - started < 2


# -- transfers, timed ----------------------------------------------------------------------


def source(tmp_path: Path) -> tuple[int, str]:
    path = tmp_path / "src"
    path.write_bytes(os.urandom(SIZE))
    fd = os.open(path, os.O_RDONLY)
    return fd, sha256_fd(fd)


def timed(fn, *args) -> float:
    started = time.monotonic()
    fn(*args)
    return time.monotonic() - started


def check_both_ways(remote, tmp_path: Path) -> None:
    fd, h = source(tmp_path)
    try:
        took_up = timed(lambda: remote.put(h, fd, SIZE, Transfer(SIZE)))
        out = os.open(tmp_path / "back", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            took_down = timed(lambda: remote.get(h, remote.object_url(h), out, Transfer(SIZE)))
            os.lseek(out, 0, os.SEEK_SET)
            assert sha256_fd(out) == h
        finally:
            os.close(out)
    finally:
        os.close(fd)
        remote.close()
    assert abs(took_up - EXPECTED) <= EXPECTED * 0.1, f"upload of 20 MiB at {LIMIT} took {took_up:.2f}s"
    assert abs(took_down - EXPECTED) <= EXPECTED * 0.1, f"fetch of 20 MiB at {LIMIT} took {took_down:.2f}s"


def remote_config(entry: dict) -> object:
    return build(minimal(remotes=[{"name": "r", **entry, "rate_limit": LIMIT}])).remotes[0]


def test_folder_remote_holds_the_limit(tmp_path: Path) -> None:
    (tmp_path / "nas").mkdir()
    check_both_ways(build_remote(remote_config({"type": "directory", "path": str(tmp_path / "nas")})), tmp_path)


def test_s3_remote_holds_the_limit(tmp_path: Path, seaweed: SeaweedFS) -> None:
    bucket = seaweed.make_bucket()
    entry = {"type": "s3", **seaweed.remote_options(bucket, f"rl-{uuid.uuid4().hex[:6]}/")}
    check_both_ways(build_remote(remote_config(entry)), tmp_path)


def test_rclone_remote_holds_the_limit(tmp_path: Path) -> None:
    (tmp_path / "far").mkdir()
    check_both_ways(build_remote(remote_config({"type": "rclone", "remote": f":local:{tmp_path / 'far'}"})), tmp_path)


# -- the daemon ----------------------------------------------------------------------------


def test_reload_applies_a_new_limit(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(remotes=1, upload={"redundancy": 1, "min_redundancy": 1})
    d.config["remotes"][0]["rate_limit"] = "2MiB/s"
    d.config_path.write_text(yaml.safe_dump(d.config))
    result = d.ctl("reload")
    assert result.returncode == 0, result.stderr
    (workdir / "big").write_bytes(os.urandom(8 * MiB))
    h = sha256_of(workdir / "big")
    copy = Path(d.config["remotes"][0]["path"]) / h[:2] / h
    os.rename(workdir / "big", d.inbox / "big")
    started = time.monotonic()
    wait_for(copy.exists, timeout=30, message="the copy on the remote")
    took = time.monotonic() - started
    assert took >= 3.6, f"8 MiB at 2MiB/s went in {took:.2f}s: the reloaded limit is not applied"
