"""Issue 14, items 3-5 on a running daemon: `verify --remotes --deep` finds a flipped byte on a real
folder, SeaweedFS S3 and rclone remote and the copies are replaced; a remote broken then fixed (its
folder renamed away, or made unwritable for the unprivileged daemon) gets its waiting uploads at
once, whatever their backoff; `retry` moves waiting pairs and says how many; the config warnings."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import CI, Daemon, wait_for
from seaweed import seaweed  # noqa: F401  (the session-scoped fixture)
from test_cache_e2e import drop
from test_privileges import chown_tree, home_for

RCLONE = shutil.which("rclone")


def copies(d: Daemon, h: str) -> set[str]:
    reply = d.request({"cmd": "info", "hash": h})
    return {c["remote"] for c in reply["result"]["copies"]} if reply["ok"] else set()


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr.decode()
    assert b"Traceback" not in result.stderr
    return result.stdout.decode()


def flipped(data: bytes, offset: int = 100) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


# -- a flipped byte on each kind of remote ------------------------------------------------------------------

def test_deep_verify_finds_a_flipped_byte_on_folder_s3_and_rclone_remotes_and_the_copies_are_replaced(
        daemon_factory, workdir: Path, seaweed, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    if RCLONE is None:
        if CI:
            raise RuntimeError("rclone is not installed (make test installs Debian's rclone)")
        pytest.skip("rclone is not installed (apt-get install rclone)")
    bucket = seaweed.make_bucket()
    rclone_dir = workdir / "rclone-objects"
    rclone_dir.mkdir()
    (workdir / "rclone.conf").write_text("")
    d = daemon_factory(start=False, remotes=1, upload={"redundancy": 3}, scrub={"remote_read": 0},
                       cache={"scrub": 0})
    d.config["remotes"] += [{"name": "s3", **seaweed.remote_options(bucket, "objects/")},
                            {"name": "rcl", "type": "rclone", "remote": f":local:{rclone_dir}",
                             "config": str(workdir / "rclone.conf")}]
    d.config_path.write_text(yaml.safe_dump(d.config))
    d.start()
    data = {}
    for i in range(4):
        body = os.urandom(3000 + i * 100_000)
        data[drop(d, f"f{i}.bin", body)] = body
    for h in data:
        wait_for(lambda h=h: copies(d, h) == {"r0", "s3", "rcl"}, timeout=60, message=f"{h[:12]} on 3 remotes")
    f0, f1, f2, _ = data
    folder_copy = Path(d.config["remotes"][0]["path"]) / f0[:2] / f0
    folder_copy.write_bytes(flipped(data[f0]))
    with seaweed.client() as s3:
        s3.put_object(Bucket=bucket, Key=f"objects/{f1}", Body=flipped(data[f1]))
    (rclone_dir / f2).write_bytes(flipped(data[f2]))

    quick = ok(d.ctl("verify", "--remotes")).splitlines()
    assert quick[1] == "remotes: 12 copies checked, 0 bad (being replaced), 0 could not be checked " \
                       "(quick: exists with the right size)", quick

    result = json.loads(ok(d.ctl("--json", "verify", "--remotes", "--deep")))
    r = result["remotes"]
    assert (r["depth"], r["checked"], r["bad"], r["unreachable"]) == ("deep", 12, 3, 0), r
    assert r["bytes_read"] == 3 * sum(len(b) for b in data.values())
    assert {name: (m["depth"], m["bad"]) for name, m in r["per_remote"].items()} == {
        "r0": ("deep", 1), "s3": ("deep", 1), "rcl": ("deep", 1)}
    assert "copy of %s holds other bytes" % f1[:12] in d.log()

    # each bad copy is made again from the cache, with the right bytes
    wait_for(lambda: folder_copy.read_bytes() == data[f0], timeout=30, message="the folder copy replaced")
    with seaweed.client() as s3:
        wait_for(lambda: s3.get_object(Bucket=bucket, Key=f"objects/{f1}")["Body"].read() == data[f1], timeout=30,
                 message="the S3 copy replaced")
    wait_for(lambda: (rclone_dir / f2).read_bytes() == data[f2], timeout=30, message="the rclone copy replaced")
    for h in (f0, f1, f2):
        wait_for(lambda h=h: copies(d, h) == {"r0", "s3", "rcl"}, timeout=30, message=f"{h[:12]} whole again")

    human = ok(d.ctl("verify", "--remotes", "--deep")).splitlines()
    assert human[1] == "remotes: 12 copies checked, 0 bad (being replaced), 0 could not be checked " \
                       "(deep: read back and hashed)", human
    assert sorted(human[2:]) == [f"  {n} (deep): 4 checked, 0 bad, 0 could not be checked"
                                 for n in ("r0", "rcl", "s3")]
    usage = d.ctl("verify", "--deep")
    assert usage.returncode == 2 and b"give it with --remotes" in usage.stderr, usage.stderr


def test_the_scrub_reads_remote_copies_back_and_replaces_a_flipped_one(daemon_factory) -> None:
    """The background scrub, within scrub.remote_read (here large enough for every copy in a tick)."""
    d = daemon_factory(start=False, scrub={"remote_read": "1GiB/s"}, cache={"scrub": 0})
    d.start()
    body = os.urandom(50_000)
    h = drop(d, "s.bin", body)
    wait_for(lambda: copies(d, h) == {"r0", "r1"}, message="two copies")
    copy = Path(d.config["remotes"][1]["path"]) / h[:2] / h
    copy.write_bytes(flipped(body))
    # the scrub job runs once a minute (jobs.SCRUB_INTERVAL), the first time a minute after the start
    wait_for(lambda: f"remote r1: copy of {h[:12]} holds other bytes" in d.log(), timeout=90,
             message="the scrub finding the flipped byte")
    wait_for(lambda: copy.read_bytes() == body, timeout=30, message="the copy made again")


# -- a remote broken, then fixed ----------------------------------------------------------------------------

def waiting(d: Daemon) -> int:
    return d.status()["uploads"]["retrying"]


def test_a_remote_fixed_after_its_folder_was_renamed_gets_its_waiting_uploads_at_once(daemon_factory) -> None:
    d = daemon_factory(start=False, upload={"retry": {"initial": "1h", "max": "6h"}})
    r1 = Path(d.config["remotes"][1]["path"])
    away = r1.with_name("r1-away")
    r1.rename(away)
    d.start()
    data = {drop(d, f"w{i}.txt", f"waiting {i}\n".encode() * 100): i for i in range(3)}
    wait_for(lambda: waiting(d) == 3 and all(copies(d, h) == {"r0"} for h in data), timeout=30,
             message="each file copied to r0, and its r1 upload waiting out a backoff")

    # retry moves the waiting pairs too, and says how many of each kind (r1 is still broken: they wait again)
    assert ok(d.ctl("retry", "--all")).strip() == "requeued 0 given-up and 3 waiting pairs"
    wait_for(lambda: waiting(d) == 3, timeout=30, message="back in backoff while r1 is still broken")
    assert json.loads(ok(d.ctl("--json", "retry", next(iter(data))[:10]))) == {
        "requeued": 1, "given_up": 0, "waiting": 1}
    wait_for(lambda: waiting(d) == 3, timeout=30, message="back in backoff again")

    away.rename(r1)
    fixed = time.monotonic()
    for h in data:
        wait_for(lambda h=h: copies(d, h) == {"r0", "r1"}, timeout=25,
                 message=f"{h[:12]} copied to r1 within seconds of the fix, not after its 1 h backoff")
    took = time.monotonic() - fixed
    assert took < 25, took
    assert "remote r1 works again: 3 upload(s) waiting out a backoff are due now" in d.log()
    print(f"fixed remote used after {took:.1f}s")


def test_an_unwritable_remote_made_writable_again_is_used_at_once_by_the_unprivileged_daemon(
        daemon_factory, workdir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    base = home_for(workdir, "nb", nobody.pw_uid, nobody.pw_gid)
    d = daemon_factory(user="nobody", start=False, root=base, upload={"retry": {"initial": "1h", "max": "6h"}})
    chown_tree(base, nobody.pw_uid, nobody.pw_gid)
    r1 = Path(d.config["remotes"][1]["path"])
    r1.chmod(0o555)  # the daemon's own folder, read-only by its mode bits (root would ignore them)
    d.start()
    h = drop(d, "perm.txt", b"waits for r1\n" * 50)
    wait_for(lambda: waiting(d) == 1, timeout=30, message="the r1 upload waiting out a backoff")
    r1.chmod(0o755)
    # the reload path: probe the sick remotes now (not at the next 10 s probe)
    ok(d.ctl("reload"))
    wait_for(lambda: copies(d, h) == {"r0", "r1"}, timeout=8, message="copied to r1 right after the reload")


# -- the warnings, at --check-config and at start -------------------------------------------------------------

def test_check_config_lists_the_warnings_and_exits_0_and_the_daemon_logs_them(daemon_factory) -> None:
    d = daemon_factory(start=False, remotes=1)
    check = subprocess.run(d.command("--check-config"), capture_output=True, text=True, timeout=60, cwd=d.root)
    assert check.returncode == 0, check.stderr
    assert "config OK" in check.stdout and "Traceback" not in check.stderr
    r0 = d.config["remotes"][0]["path"]
    assert check.stderr.splitlines() == [
        f"cloudmanagerd: warning: remote r0: {r0} is on the same filesystem as the cache: this copy dies with the "
        "disk (point it at another disk or a mounted NAS)",
        "cloudmanagerd: warning: upload.redundancy is 1: each file has one copy, lost with its remote (set 2 or "
        "more, with as many remotes)"]
    d.start()
    log = d.log()
    assert f"remote r0: {r0} is on the same filesystem as the cache" in log
    assert "upload.redundancy is 1" in log


def test_the_sample_config_says_its_remote_is_an_example_to_change(tmp_path: Path) -> None:
    sample = (Path(__file__).resolve().parent.parent / "etc" / "config.yaml").read_text()
    assert "AN EXAMPLE TO CHANGE" in sample and "path: /srv/cloudmanager/remotes/EXAMPLE-move-to-another-disk" in sample
    # on one filesystem with the cache, --check-config names it (the sample's paths, moved under tmp_path)
    text = sample.replace("/srv/cloudmanager", str(tmp_path / "srv")).replace("#state: /var/lib/cloudmanagerd",
                                                                              f"state: {tmp_path / 'state'}")
    text = text.replace("#socket: /run/cloudmanagerd/control.sock", f"socket: {tmp_path / 'c.sock'}")
    for folder in ("inbox", "cache", "remotes/EXAMPLE-move-to-another-disk"):
        (tmp_path / "srv" / folder).mkdir(parents=True)
    config = tmp_path / "config.yaml"
    config.write_text(text)
    check = subprocess.run([sys.executable, "-m", "cloudmanagerd", "-c", str(config), "--check-config"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "remote nas:" in check.stderr and "this copy dies with the disk" in check.stderr, check.stderr


class Gate:
    """A TCP forwarder to a real server that can be closed and opened again: the S3 server "down"
    (connection refused, a transient error that marks no remote unhealthy), then back."""

    def __init__(self, target: int) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.listener: socket.socket | None = None
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []

    def open(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        self._start(self._accept, self.listener)

    def _start(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self.threads.append(t)
        t.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            self._start(self._pipe, client, upstream)
            self._start(self._pipe, upstream, client)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        if self.listener is not None:
            self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self.threads:
            t.join(10)


def test_an_s3_server_down_then_back_gets_its_waiting_uploads_at_once(daemon_factory, seaweed) -> None:  # noqa: F811
    bucket = seaweed.make_bucket()
    gate = Gate(int(seaweed.endpoint.rsplit(":", 1)[1]))
    d = daemon_factory(start=False, remotes=1, upload={"redundancy": 2, "retry": {"initial": "1h", "max": "6h"}})
    d.config["remotes"].append({"name": "s3", **seaweed.remote_options(bucket),
                                "endpoint": f"http://127.0.0.1:{gate.port}"})
    d.config_path.write_text(yaml.safe_dump(d.config))
    try:
        d.start()
        data = {drop(d, f"s{i}.txt", f"for s3 {i}\n".encode() * 100): i for i in range(3)}
        wait_for(lambda: waiting(d) == 3, timeout=60, message="three S3 uploads waiting out a backoff")
        assert all(r["healthy"] for r in d.status()["remotes"]), "connection refused is transient: no mark"
        wait_for(lambda: "remote s3 does not answer its probe" in d.log(), timeout=20,
                 message="the probe finding it down")
        gate.open()
        back = time.monotonic()
        for h in data:
            wait_for(lambda h=h: copies(d, h) == {"r0", "s3"}, timeout=20,
                     message=f"{h[:12]} copied to S3 within seconds of the server's return")
        took = time.monotonic() - back
        assert "remote s3 answers again" in d.log()
        print(f"S3 server back: waiting uploads done after {took:.1f}s")
        d.stop()
    finally:
        gate.close()
