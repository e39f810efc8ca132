"""`cloudmanagerd restore` after a lost disk (issue 14, item 2), with real folder and SeaweedFS S3 remotes:
the newest good snapshot comes back, objects added after it are adopted by hash, every file is fetched
back with its true bytes by a fresh daemon on fresh folders."""

from __future__ import annotations

import gzip
import hashlib
import os
import pwd
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import wait_for
from seaweed import seaweed

__all__ = ["seaweed"]  # the session-scoped S3 server, a fixture here (and pyflakes sees it used)

from cloudmanagerd.remotes.base import RESERVED
from cloudmanagerd.snapshots import parse

MiB = 1 << 20


def restore(d, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudmanagerd", "restore", "-c", str(d.config_path), *extra],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)


def write_config(d) -> None:
    d.config_path.write_text(yaml.safe_dump(d.config))


def drop(d, sizes: list[int], prefix: str) -> dict[str, bytes]:
    """Files named <prefix><i> of the given sizes; {hash: bytes}."""
    made = {}
    for i, size in enumerate(sizes):
        data = os.urandom(size)
        (d.inbox / f"{prefix}{i}").write_bytes(data)
        made[hashlib.sha256(data).hexdigest()] = data
    return made


def copies(d) -> dict[str, set[str]]:
    return {f["hash"]: {c["remote"] for c in f["copies"] if not c.get("bad")} for f in d.files()}


def all_copied(d, hashes, remotes: set[str]) -> bool:
    found = copies(d)
    return all(found.get(h, set()) >= remotes for h in hashes)


def snapshots(folder: Path, node: str = "n1") -> list[Path]:
    where = folder / RESERVED / node
    return sorted(p for p in where.iterdir() if not p.name.startswith(".")) if where.is_dir() else []


def lose_the_disk(d) -> None:
    shutil.rmtree(d.config["state"])
    shutil.rmtree(d.cache)


def fetch(d, h: str, out: Path) -> bytes:
    r = d.ctl("get", h, "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


def get_via_socket(d, h: str, out: Path) -> bytes:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        reply = d.request({"cmd": "get", "hash": h}, fds=[fd])
    finally:
        os.close(fd)
    assert reply["ok"], reply
    return out.read_bytes()


def test_the_disaster_drill_every_file_comes_back_from_a_folder_remote_and_s3(daemon_factory, workdir: Path,
                                                                               seaweed) -> None:
    """Issue 14's drill: 300 files (mixed sizes, some evicted, some pinned) on a folder remote and S3, a
    snapshot, 20 more files, SIGKILL, the state and cache folders deleted; `restore` from the config
    alone; every one of the 320 comes back through `get` with its true bytes, the 300 under their names."""
    # a cache of 16 MiB for ~60 MB of files: many are evicted before the disk is lost
    d = daemon_factory(remotes=1, start=False, node="n1", upload={"redundancy": 2},
                       cache={"capacity": "16MiB"}, catalog_backup={"interval": "1h"})
    d.config["remotes"].append({"name": "s3", **seaweed.remote_options(seaweed.make_bucket(), prefix="cm/")})
    write_config(d)
    d.start()
    rng = random.Random(300)
    sizes = [0] + [rng.randrange(1, 20_000) for _ in range(219)] + [rng.randrange(100_000, 300_000)
                                                                     for _ in range(70)] + [
        rng.randrange(1 * MiB, 3 * MiB) for _ in range(9)] + [9 * MiB]
    before = drop(d, sizes, "before-")
    assert len(before) == 300
    wait_for(lambda: all_copied(d, before, {"r0", "s3"}), timeout=300, message="300 files on r0 and s3")
    pinned = sorted(before)[:5]
    for h in pinned:
        assert d.ctl("pin", h).returncode == 0
    assert d.status()["cache"]["files"] < 300  # some were evicted
    assert d.stop() == 0  # the clean stop takes a snapshot
    r0 = Path(d.config["remotes"][0]["path"])
    assert len(snapshots(r0)) == 1

    # the daemon runs on (no scheduled snapshot within the hour): 20 more files reach the remotes
    d.start()
    after = drop(d, [rng.randrange(1, 500_000) for _ in range(19)] + [2 * MiB], "after-")
    wait_for(lambda: all_copied(d, after, {"r0", "s3"}), timeout=120, message="20 more files on r0 and s3")
    d.kill()  # and the disk dies
    lose_the_disk(d)

    r = restore(d)
    assert r.returncode == 0, r.stderr
    assert "restored 300 file(s)" in r.stdout, r.stdout
    assert "adopted 20 object(s)" in r.stdout, r.stdout
    assert "copies missing: 0" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr
    assert "remote s3: 1 catalog snapshot(s)" in r.stderr

    d.start()  # a fresh daemon on fresh cache and inbox folders
    listed = {f["hash"]: f for f in d.files()}
    assert set(listed) == set(before) | set(after)
    for h in before:
        assert listed[h]["name"].startswith("before-")
    for h in after:
        assert listed[h]["name"] == h  # named by its hash: its name was never on a remote
    for h in pinned:
        assert listed[h]["pinned"]
    for h, data in {**before, **after}.items():
        assert get_via_socket(d, h, workdir / "out") == data, h
    assert fetch(d, pinned[0], workdir / "ctl-out") == before[pinned[0]]  # and through cloudmanagerctl
    assert d.stop() == 0


def test_restore_refuses_a_running_daemon_and_an_existing_catalog_without_force(daemon_factory) -> None:
    d = daemon_factory(remotes=1, node="n1", catalog_backup={"interval": "1s"})
    made = drop(d, [10], "a")
    r0 = Path(d.config["remotes"][0]["path"])
    wait_for(lambda: all_copied(d, made, {"r0"}) and snapshots(r0), timeout=30, message="a copy and a snapshot")
    r = restore(d)
    assert r.returncode == 1 and "stop it first" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert d.stop() == 0

    catalog = Path(d.config["state"]) / "catalog.sqlite3"
    r = restore(d)
    assert r.returncode == 1, r.stdout
    assert len(r.stderr.splitlines()) == 1 and "--force" in r.stderr and str(catalog) in r.stderr, r.stderr
    before = catalog.read_bytes()

    r = restore(d, "--force")
    assert r.returncode == 0, r.stderr
    kept = [p for p in catalog.parent.iterdir() if p.name.startswith("catalog.sqlite3.before-restore-")]
    assert [p.read_bytes() for p in kept if not p.name.endswith(("-wal", "-shm"))] == [before]
    assert "restored 1 file(s)" in r.stdout
    d.start()
    assert [f["hash"] for f in d.files()] == list(made)
    assert d.stop() == 0


def test_a_corrupted_newest_snapshot_falls_back_to_the_one_before(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(remotes=1, node="n1", catalog_backup={"interval": "1h"})
    r0 = Path(d.config["remotes"][0]["path"])
    first = drop(d, [1000], "first")
    wait_for(lambda: all_copied(d, first, {"r0"}), message="the first file copied")
    assert d.stop() == 0
    d.start()
    second = drop(d, [2000], "second")
    wait_for(lambda: all_copied(d, second, {"r0"}), message="the second file copied")
    assert d.stop() == 0
    older, newest = snapshots(r0)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    # and the first file's cache object rots: it must not be kept
    (h1,) = first
    (d.cache / h1[:2] / h1).write_bytes(b"rotten")
    shutil.rmtree(d.config["state"])

    r = restore(d)
    assert r.returncode == 0, r.stderr
    assert f"snapshot {newest.name} on remote r0 is not usable" in r.stderr and "next older" in r.stderr
    assert f"restored 1 file(s) from snapshot {older.name}" in r.stdout
    assert "adopted 1 object(s)" in r.stdout  # the second file, from the remote's listing
    assert "cache: 0 kept, 1 evicted" in r.stdout
    d.start()
    names = {f["hash"]: f["name"] for f in d.files()}
    (h2,) = second
    assert names[h1] == "first0" and names[h2] in (h2, f"recovered/{h2}")
    assert fetch(d, h1, workdir / "o1") == first[h1]  # fetched back from the remote, verified
    assert fetch(d, h2, workdir / "o2") == second[h2]
    assert d.stop() == 0


def test_restore_without_snapshots_or_with_a_postgresql_catalog_says_what_to_do(daemon_factory) -> None:
    d = daemon_factory(remotes=1, node="n1", start=False)
    r = restore(d)
    assert r.returncode == 1 and "no usable catalog snapshot of node 'n1'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 2  # the remote's count, then the reason
    # the replacement machine has another hostname (node: defaults to it): the hint names the lost one
    d.config["node"] = "old-host"
    write_config(d)
    d.start()
    assert d.stop() == 0
    shutil.rmtree(d.config["state"])
    d.config["node"] = "n1"
    write_config(d)
    r = restore(d)
    assert r.returncode == 1 and "there are snapshots of node(s) old-host" in r.stderr, r.stderr
    d.config["catalog"] = "postgresql://u@localhost/cm"
    write_config(d)
    r = restore(d)
    assert r.returncode == 1 and "pg_restore" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_what_a_killed_snapshot_upload_leaves_is_never_taken(daemon_factory, workdir: Path) -> None:
    """SIGKILL at random moments while snapshots are made every second: every snapshot under its final
    name hashes to its name; and what a kill mid-upload leaves (a temp file, or on a backend without
    atomic renames a short file under the final name) is passed over by restore."""
    d = daemon_factory(remotes=1, node="n1", catalog_backup={"interval": "1s"}, start=False)
    r0 = Path(d.config["remotes"][0]["path"])
    rng = random.Random(14)
    for round_ in range(4):
        d.start()
        drop(d, [100] * 20, f"r{round_}-")
        wait_for(lambda: len(snapshots(r0)) > round_, timeout=30, message="a snapshot this round")
        drop(d, [100] * 20, f"s{round_}-")
        wait_for(lambda: len(d.files()) >= 40 * (round_ + 1) - 20, timeout=30, message="files registered")
        time.sleep(rng.uniform(0, 1.2))  # a random moment to kill at (not a synchronization)
        d.kill()
    for snap in snapshots(r0):
        parsed = parse(snap.name, snap.stat().st_size)
        assert parsed is not None and hashlib.sha256(snap.read_bytes()).hexdigest() == parsed.digest

    # what a kill leaves: a temp file, and a truncated snapshot newer than any under a final name
    good = snapshots(r0)[-1]
    folder = good.parent
    (folder / f".{good.name}.1234abcd.tmp").write_bytes(good.read_bytes()[:100])
    digest = hashlib.sha256(b"whole").hexdigest()
    (folder / f"catalog-29991231T000000.000Z-{digest}.sqlite.gz").write_bytes(gzip.compress(b"whole")[:10])
    shutil.rmtree(d.config["state"])
    r = restore(d)
    assert r.returncode == 0, r.stderr
    assert "catalog-29991231T000000.000Z" in r.stderr and "not usable" in r.stderr
    assert f"from snapshot {good.name}" in r.stdout


def test_an_unreachable_remote_is_passed_over_and_named(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(remotes=2, node="n1", catalog_backup={"interval": "1h"})
    made = drop(d, [500, 600], "f")
    wait_for(lambda: all_copied(d, made, {"r0", "r1"}), message="two copies each")
    assert d.stop() == 0
    r1 = Path(d.config["remotes"][1]["path"])
    shutil.rmtree(r1)  # the second remote is down while the node is rebuilt
    lose_the_disk(d)
    r = restore(d)
    assert r.returncode == 0, r.stderr
    assert "remote r1: cannot list catalog snapshots" in r.stderr
    assert "restored 2 file(s)" in r.stdout and "not listed: r1" in r.stdout
    r1.mkdir()
    d.start()
    assert {f["name"] for f in d.files()} == {"f0", "f1"}
    for n, (h, data) in enumerate(made.items()):
        assert fetch(d, h, workdir / f"o{n}") == data
    assert d.stop() == 0


def test_a_copy_gone_from_its_remote_is_counted_missing_and_a_file_without_any_copy_is_named(
        daemon_factory, workdir: Path) -> None:
    d = daemon_factory(remotes=1, node="n1", catalog_backup={"interval": "1h"})
    made = drop(d, [700, 800], "f")
    wait_for(lambda: all_copied(d, made, {"r0"}), message="copies on r0")
    assert d.stop() == 0
    gone, kept = sorted(made)
    r0 = Path(d.config["remotes"][0]["path"])
    (r0 / gone[:2] / gone).unlink()  # the remote lost it too
    lose_the_disk(d)
    r = restore(d)
    assert r.returncode == 0, r.stderr
    assert "copies missing: 1" in r.stdout and "without a copy: 1 file(s)" in r.stdout, r.stdout
    d.start()
    status = d.status()
    assert status["safety"]["below_min"] == 1
    assert get_via_socket(d, kept, workdir / "o") == made[kept]
    fd = os.open(workdir / "o2", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        reply = d.request({"cmd": "get", "hash": gone}, fds=[fd])
    finally:
        os.close(fd)
    assert not reply["ok"] and (workdir / "o2").read_bytes() == b""  # a clear refusal, no wrong bytes
    assert d.stop() == 0


def test_restore_run_as_root_leaves_a_catalog_the_service_user_can_write(daemon_factory, workdir: Path) -> None:
    """On a service install the daemon runs as its own user; an operator runs restore as root."""
    nobody = pwd.getpwnam("nobody")
    base = workdir / "nb"
    base.mkdir(mode=0o755)
    d = daemon_factory(user="nobody", start=False, root=base, node="n1", catalog_backup={"interval": "1h"})
    for folder, dirs, files in os.walk(base):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.chown(name, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
    d.start()
    made = drop(d, [300], "f")
    for name in d.inbox.iterdir():
        os.chown(name, nobody.pw_uid, nobody.pw_gid)
    wait_for(lambda: all_copied(d, made, {"r0"}), message="a copy on r0")
    assert d.stop() == 0
    state = Path(d.config["state"])
    for name in list(state.iterdir()):
        name.unlink()  # the state folder is there (systemd's StateDirectory=), its files are lost
    r = restore(d)  # as root
    assert r.returncode == 0, r.stderr
    for name in ("catalog.sqlite3", "lock"):
        assert (state / name).stat().st_uid == nobody.pw_uid, name
    d.start()
    assert [f["name"] for f in d.files()] == ["f0"]
    assert d.stop() == 0


def test_a_catalog_folder_that_cannot_be_made_is_one_line_not_a_traceback(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(remotes=1, node="n1", catalog_backup={"interval": "1h"})
    drop(d, [10], "f")
    wait_for(lambda: d.files(), message="a file")
    assert d.stop() == 0
    (workdir / "not-a-folder").write_text("x")
    d.config["catalog"] = f"sqlite:///{workdir / 'not-a-folder' / 'catalog.sqlite3'}"
    write_config(d)
    r = restore(d)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "not-a-folder" in r.stderr, r.stderr


def test_sigkill_in_the_middle_of_a_snapshot_upload_leaves_nothing_restore_takes(daemon_factory,
                                                                               workdir: Path) -> None:
    """The daemon is killed while a snapshot is being written to the folder remote (its temp file is
    there): no partial snapshot under a final name, and restore takes the last whole one."""
    d = daemon_factory(remotes=1, node="n1", catalog_backup={"interval": "1s"})
    r0 = Path(d.config["remotes"][0]["path"])
    folder = r0 / RESERVED / "n1"
    made = drop(d, [100], "f")
    wait_for(lambda: all_copied(d, made, {"r0"}), message="a copy")
    assert d.stop() == 0
    whole = snapshots(r0)
    assert whole
    # ballast that does not compress, so that the next snapshot takes a while to write out
    catalog = Path(d.config["state"]) / "catalog.sqlite3"
    with sqlite3.connect(catalog) as conn:
        conn.execute("INSERT INTO meta(key, value) VALUES ('test-ballast', ?)", (os.urandom(48 * MiB),))
    conn.close()
    d.start()
    temp = wait_for(lambda: [p for p in folder.iterdir() if p.name.startswith(".")], timeout=60,
                    interval=0.0005, message="a snapshot upload in progress")
    d.kill()
    left = [p for p in folder.iterdir() if p.name.startswith(".")]
    for snap in snapshots(r0):  # whatever is under a final name is whole
        parsed = parse(snap.name, snap.stat().st_size)
        assert parsed is not None and hashlib.sha256(snap.read_bytes()).hexdigest() == parsed.digest
    lose_the_disk(d)
    r = restore(d)
    assert r.returncode == 0, r.stderr
    newest = snapshots(r0)[-1]
    assert f"from snapshot {newest.name}" in r.stdout
    if left:  # the kill came before the rename (the usual case): the temp file is passed over
        assert left == temp and newest in whole
    d.start()
    assert [f["name"] for f in d.files()] == ["f0"]
    assert d.stop() == 0
