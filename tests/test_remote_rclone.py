"""The rclone backend: the Remote contract on the real rclone binary (`:local:` and S3 on a real
SeaweedFS), its exit codes classified, progress, and a hung rclone killed with its children."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import stat
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import wait_for
from remote_contract import RemoteContract, fetch, make_object
from seaweed import seaweed  # noqa: F401  (the session-scoped fixture)

from cloudmanagerd.config import parse_remotes
from cloudmanagerd.remotes import build_remote
from cloudmanagerd.remotes.base import MISSING, REMOTE, TRANSIENT, Cancelled, RemoteError, Transfer
from cloudmanagerd.remotes.rclone import RcloneRemote, classify, join, public_remote, split_remote

CI = os.environ.get("CI") == "true"
RCLONE = shutil.which("rclone")

if RCLONE is None:
    if CI:
        raise RuntimeError("rclone is not installed (make test installs Debian's rclone)")
    pytestmark = pytest.mark.skip(reason="rclone is not installed (apt-get install rclone)")


@pytest.fixture
def empty_config(tmp_path: Path) -> str:
    """An rclone config with no remotes: the tests never read the caller's own rclone.conf."""
    path = tmp_path / "rclone.conf"
    path.write_text("")
    return str(path)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for init to reap it does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# -- the contract on real rclone remotes ----------------------------------------------------------

class TestRcloneLocal(RemoteContract):
    @pytest.fixture
    def remote(self, tmp_path: Path, empty_config: str) -> RcloneRemote:
        return RcloneRemote("rc", f":local:{tmp_path}/objects", config=empty_config)

    @pytest.fixture
    def broken_remote(self, empty_config: str) -> RcloneRemote:
        return RcloneRemote("rc", "nosuchremote:objects", config=empty_config)

    def test_the_copy_is_at_remote_slash_hash(self, remote: RcloneRemote, tmp_path: Path) -> None:
        data = b"where is it" * 100
        h, url = self.put(remote, data)
        assert url == f":local:{tmp_path}/objects/{h}"
        assert (tmp_path / "objects" / h).read_bytes() == data


def test_an_unknown_remote_name_says_which(empty_config: str) -> None:
    remote = RcloneRemote("gd", "gdrive:backups", config=empty_config)
    h, fd = make_object(b"x")
    try:
        with pytest.raises(RemoteError) as info:
            remote.put(h, fd, 1)
    finally:
        os.close(fd)
    assert info.value.kind == REMOTE
    assert "'gdrive'" in str(info.value) and empty_config in str(info.value)
    with pytest.raises(RemoteError) as info:
        remote.exists(h, "")
    assert info.value.kind == REMOTE  # not "missing": nothing is known about the copy


def test_a_remote_path_under_a_file_is_a_remote_problem(tmp_path: Path, empty_config: str) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    remote = RcloneRemote("rc", f":local:{tmp_path}/a-file/objects", config=empty_config)
    h, fd = make_object(b"data")
    try:
        with pytest.raises(RemoteError) as info:
            remote.put(h, fd, 4)
    finally:
        os.close(fd)
    assert info.value.kind == REMOTE
    assert "not a directory" in str(info.value)


def test_progress_is_reported_and_reaches_the_size(tmp_path: Path, empty_config: str) -> None:
    remote = RcloneRemote("rc", f":local:{tmp_path}/objects", config=empty_config)
    data = os.urandom(2 << 20)
    h, fd = make_object(data)
    seen: list[int] = []
    transfer = Transfer(len(data))
    original = transfer.update
    transfer.update = lambda done: (seen.append(done), original(done))[1]  # type: ignore[method-assign]
    try:
        remote.put(h, fd, len(data), transfer)
    finally:
        os.close(fd)
    assert seen and seen == sorted(seen)
    assert transfer.done == len(data)
    assert remote.reports_progress


def test_a_put_killed_midway_leaves_no_partial_object(tmp_path: Path, empty_config: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # rclone 1.60 writes :local: objects in place: the backend deletes what the killed put left
    monkeypatch.setenv("RCLONE_BWLIMIT", "1M")
    remote = RcloneRemote("rc", f":local:{tmp_path}/objects", config=empty_config)
    data = os.urandom(6 << 20)
    h, fd = make_object(data)
    transfer = Transfer(len(data))
    outcome: list[BaseException] = []

    def put() -> None:
        try:
            remote.put(h, fd, len(data), transfer)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=put)
    worker.start()
    try:
        wait_for(lambda: transfer.done > 0, timeout=20, message="rclone reporting its first bytes")
        assert (tmp_path / "objects" / h).exists(), "rclone writes in place (else this test proves nothing)"
        transfer.cancel("stalled: test")
        worker.join(15)
    finally:
        transfer.cancel("test over")
        worker.join(30)
        os.close(fd)
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled), outcome
    assert "stalled: test" in str(outcome[0])
    assert not (tmp_path / "objects" / h).exists()
    assert remote.exists(h, "") is None


# -- S3 through rclone on a real SeaweedFS -------------------------------------------------------

def s3_config(path: Path, server, secret: str | None = None, endpoint: str | None = None) -> str:
    path.write_text(
        "[weed]\n"
        "type = s3\n"
        "provider = SeaweedFS\n"
        "env_auth = false\n"
        f"access_key_id = {server.access_key}\n"
        f"secret_access_key = {secret or server.secret_key}\n"
        f"region = {server.region}\n"
        f"endpoint = {endpoint or server.endpoint}\n"
        "force_path_style = true\n"
        "upload_cutoff = 5Mi\n"  # multipart above 5 MiB (the default cutoff is 200 MiB)
        "chunk_size = 5Mi\n")
    return str(path)


@pytest.fixture(scope="module")
def s3_bucket(seaweed) -> str:  # noqa: F811
    """One bucket for this module's S3 tests; each test works under its own prefix."""
    return seaweed.make_bucket()


class TestRcloneS3(RemoteContract):
    @pytest.fixture(autouse=True)
    def ca_bundle_set(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # The trap of this environment, set here too so that the tests prove the way around it:
        # Debian's rclone fails every S3 call with LoadCustomCABundleError while it is set.
        monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")

    @pytest.fixture
    def remote(self, seaweed, s3_bucket: str, tmp_path: Path) -> RcloneRemote:  # noqa: F811
        config = s3_config(tmp_path / "rclone.conf", seaweed)
        return RcloneRemote("s3rc", f"weed:{s3_bucket}/{uuid.uuid4().hex[:8]}", config=config)

    @pytest.fixture
    def broken_remote(self, seaweed, s3_bucket: str, tmp_path: Path) -> RcloneRemote:  # noqa: F811
        config = s3_config(tmp_path / "rclone.conf", seaweed, secret="wrong" * 8)
        return RcloneRemote("s3rc", f"weed:{s3_bucket}/{uuid.uuid4().hex[:8]}", config=config)

    def test_wrong_credentials_mark_the_remote_unhealthy(self, broken_remote: RcloneRemote) -> None:
        h, fd = make_object(b"secret")
        try:
            with pytest.raises(RemoteError) as info:
                broken_remote.put(h, fd, 6)
        finally:
            os.close(fd)
        assert info.value.kind == REMOTE, str(info.value)
        assert "SignatureDoesNotMatch" in str(info.value) or "AccessDenied" in str(info.value)

    def test_a_large_object_goes_up_in_parts(self, remote: RcloneRemote, seaweed) -> None:  # noqa: F811
        data = os.urandom(7 << 20)  # above upload_cutoff: a multipart upload of two parts
        h, url = self.put(remote, data)
        bucket, prefix = remote.remote.split(":", 1)[1].split("/", 1)
        with seaweed.client() as s3:
            assert s3.head_object(Bucket=bucket, Key=f"{prefix}/{h}")["ETag"].endswith('-2"')  # two parts
        assert remote.exists(h, url) == len(data)
        assert hashlib.sha256(fetch(remote, h, url)).hexdigest() == h


def test_an_inline_s3_remote_keeps_its_keys_out_of_urls_and_errors(seaweed, s3_bucket,  # noqa: F811
                                                                    monkeypatch) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    bucket = s3_bucket
    remote = RcloneRemote("inline", seaweed.rclone_remote(f"{bucket}/x"))
    data = b"inline" * 999
    h, fd = make_object(data)
    try:
        url = remote.put(h, fd, len(data))
    finally:
        os.close(fd)
    assert url == f":s3:{bucket}/x/{h}"
    assert seaweed.secret_key not in url
    assert fetch(remote, h, url) == data
    wrong = RcloneRemote("inline", seaweed.rclone_remote(f"{bucket}/x").replace(seaweed.secret_key, "nope" * 10))
    with pytest.raises(RemoteError) as info:
        wrong.probe()
    assert "nope" not in str(info.value)


def test_the_ca_bundle_is_kept_for_tls_endpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", "/some/ca.pem")
    config = tmp_path / "rclone.conf"
    config.write_text("[tls]\ntype = s3\nendpoint = https://s3.example.com\n\n"
                      "[plain]\ntype = s3\nendpoint = http://127.0.0.1:8333\n\n[gd]\ntype = drive\n")
    def env(remote: str) -> dict[str, str]:
        return RcloneRemote("x", remote, config=str(config))._env()
    assert env("tls:bucket")["AWS_CA_BUNDLE"] == "/some/ca.pem"
    assert env("gd:folder")["AWS_CA_BUNDLE"] == "/some/ca.pem"
    assert "AWS_CA_BUNDLE" not in env("plain:bucket")
    assert "AWS_CA_BUNDLE" not in env(':s3,endpoint="http://127.0.0.1:1":bucket')
    assert env(':s3,endpoint="https://s3.example.com":bucket')["AWS_CA_BUNDLE"] == "/some/ca.pem"


def test_rclone_paths_are_split_and_joined_like_rclone_does() -> None:
    assert join("gdrive:", "h") == "gdrive:h"
    assert join("gdrive:backups", "h") == "gdrive:backups/h"
    assert join(":local:/srv/x/", "h") == ":local:/srv/x/h"
    assert split_remote(':s3,endpoint="http://a:1",k=v:bucket/p') == (':s3,endpoint="http://a:1",k=v', "bucket/p")
    assert public_remote(':s3,secret_access_key=S:bucket/p') == ":s3:bucket/p"
    assert public_remote("name,key=v:path") == "name:path"
    assert public_remote("name:path") == "name:path"


# -- exit codes, with a fake rclone ----------------------------------------------------------------

@pytest.mark.parametrize("op, code, kind", [
    ("put", 5, TRANSIENT),       # temporary error: retry
    ("put", 7, REMOTE),          # fatal: stop this remote and say why
    ("put", 8, REMOTE),          # transfer limit reached
    ("put", 3, REMOTE),          # the remote path does not exist
    ("probe", 3, REMOTE),
    ("get", 3, MISSING),
    ("get", 4, MISSING),
    ("get", 9, MISSING),         # cat --error-on-no-transfer found nothing
    ("exists", 3, MISSING),
    ("exists", 4, MISSING),
    ("put", 1, TRANSIENT),
    ("put", 2, TRANSIENT),
    ("put", 6, TRANSIENT),
    ("put", 42, TRANSIENT),      # a code nobody named: transient, counted toward max_attempts
])
def test_exit_codes_are_classified(op: str, code: int, kind: str) -> None:
    assert classify(op, code, "some error")[0] == kind


@pytest.mark.parametrize("detail", [
    "SignatureDoesNotMatch: The request signature we calculated does not match",
    "InvalidAccessKeyId: The access key ID you provided does not exist",
    "NoSuchBucket: The specified bucket does not exist",
    "open /srv/x: permission denied",
    "mkdir /mnt/ro/x: read-only file system",
    "write /mnt/full/x: no space left on device",
])
def test_errors_only_the_operator_can_fix_mark_the_remote(detail: str) -> None:
    assert classify("put", 1, detail)[0] == REMOTE


@pytest.fixture
def fake_rclone(tmp_path: Path):
    """make(code, message) -> a fake rclone binary that prints `message` and exits with `code`;
    make(hang=True) -> one that runs `sleep` in a child for its copyto and waits forever."""
    def make(code: int = 0, message: str = "", hang: bool = False) -> str:
        path = tmp_path / "rclone"
        pids = tmp_path / "pids"
        body = "#!/bin/sh\n"
        if hang:
            body += (f'case "$*" in *copyto*) sleep 600 & echo "$$ $!" > {pids}; wait; exit 1;; esac\n'
                     "exit 0\n")
        else:
            noise = '{"level":"error","msg":"noise before the end"}'
            body += (f"echo {shlex.quote(noise)} >&2\n"
                     f"echo {shlex.quote('2026/01/01 10:00:00 Failed to do it: ' + message)} >&2\n"
                     f"exit {code}\n")
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return str(path)
    return make


@pytest.mark.parametrize("code, kind", [(5, TRANSIENT), (7, REMOTE), (8, REMOTE), (3, REMOTE), (1, TRANSIENT)])
def test_a_failing_put_raises_the_classified_error_with_rclone_last_line(fake_rclone, code: int,
                                                                          kind: str) -> None:
    remote = RcloneRemote("rc", "fake:objects", binary=fake_rclone(code, "the reason"))
    h, fd = make_object(b"data")
    try:
        with pytest.raises(RemoteError) as info:
            remote.put(h, fd, 4)
    finally:
        os.close(fd)
    assert info.value.kind == kind
    assert f"exit {code}" in str(info.value)
    assert "Failed to do it: the reason" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_on_get_and_exists_with_fake_codes(fake_rclone) -> None:
    remote = RcloneRemote("rc", "fake:objects", binary=fake_rclone(4, "object not found"))
    h = "ab" * 32
    assert remote.exists(h, "") is None
    remote.delete(h, "")  # deleting what is not there is harmless
    with pytest.raises(RemoteError) as info:
        fetch(remote, h, "")
    assert info.value.kind == MISSING


def test_the_section_error_names_the_remote(fake_rclone) -> None:
    binary = fake_rclone(1, "Failed to create file system for \"archive:x\": didn't find section in config file")
    remote = RcloneRemote("rc", "archive:x", config="/etc/cloudmanagerd/rclone.conf", binary=binary)
    with pytest.raises(RemoteError) as info:
        remote.probe()
    assert info.value.kind == REMOTE
    assert "no remote named 'archive'" in str(info.value)


def test_rclone_not_installed_is_a_remote_problem(tmp_path: Path) -> None:
    remote = RcloneRemote("rc", "x:y", binary=str(tmp_path / "no-rclone-here"))
    with pytest.raises(RemoteError) as info:
        remote.probe()
    assert info.value.kind == REMOTE and "install rclone" in str(info.value)


def test_a_hung_rclone_is_killed_with_its_children_when_the_transfer_is_cancelled(fake_rclone,
                                                                                  tmp_path: Path) -> None:
    remote = RcloneRemote("rc", "fake:objects", binary=fake_rclone(hang=True))
    h, fd = make_object(b"data")
    transfer = Transfer(4)
    pids_file = tmp_path / "pids"
    canceller = threading.Thread(target=lambda: (
        wait_for(lambda: pids_file.exists() and pids_file.read_text().strip(), message="the fake rclone hanging"),
        transfer.cancel("stalled: no progress for 60s (upload.stall)")))
    canceller.start()
    started = time.monotonic()
    try:
        with pytest.raises(Cancelled) as info:
            remote.put(h, fd, 4, transfer)
    finally:
        canceller.join(30)
        os.close(fd)
    assert time.monotonic() - started < 10
    assert "stalled" in str(info.value)
    shell, sleeper = (int(p) for p in pids_file.read_text().split())
    wait_for(lambda: not alive(shell) and not alive(sleeper), timeout=5,
             message="the fake rclone and its sleep child to be gone")


def test_from_config_builds_an_rclone_remote(tmp_path: Path) -> None:
    (tmp_path / "rclone.conf").write_text("")
    (rc,) = parse_remotes([{"name": "gd", "type": "rclone", "remote": "gdrive:cm", "config": "rclone.conf"}],
                          base_dir=str(tmp_path))
    remote = build_remote(rc)
    assert isinstance(remote, RcloneRemote)
    assert (remote.name, remote.kind, remote.remote, remote.config) == ("gd", "rclone", "gdrive:cm",
                                                                        str(tmp_path / "rclone.conf"))


# -- put_many: the uploader's batches, one rclone copy each ------------------------------------------

def batch_items(tmp_path: Path, blobs: list[bytes]) -> list[tuple]:
    """(hash, fd, size, pending transfer) items for put_many; the caller closes the fds."""
    items = []
    for i, data in enumerate(blobs):
        path = tmp_path / f"obj{i}"
        path.write_bytes(data)
        items.append((hashlib.sha256(data).hexdigest(), os.open(path, os.O_RDONLY), len(data),
                      Transfer(len(data), pending=True)))
    return items


def close_items(items: list[tuple]) -> None:
    for _, fd, _, _ in items:
        os.close(fd)


def put_batch(remote: RcloneRemote, tmp_path: Path, blobs: list[bytes]) -> tuple[list[tuple], list]:
    """put_many of `blobs` from files under tmp_path: (the items, the results)."""
    items = batch_items(tmp_path, blobs)
    try:
        return items, remote.put_many(items)
    finally:
        close_items(items)


def stage_folders() -> set[str]:
    import tempfile
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("cloudmanagerd-rclone-")}


def check_batch_stored(remote: RcloneRemote, items: list[tuple], blobs: list[bytes], results: list) -> None:
    assert results == [join(public_remote(remote.remote), h) for h, *_ in items]
    for (h, _, size, transfer), data in zip(items, blobs):
        assert transfer.done == size, "each object's progress reaches its size"
        assert fetch(remote, h, results[0]) == data


def test_put_many_copies_a_batch_in_one_rclone_run_each_object_at_its_hash(tmp_path: Path,
                                                                           empty_config: str) -> None:
    remote = RcloneRemote("rc", f":local:{tmp_path}/objects", config=empty_config)
    blobs = [os.urandom(100 + 997 * i) for i in range(30)] + [b""]
    before = stage_folders()
    items, results = put_batch(remote, tmp_path, blobs)
    check_batch_stored(remote, items, blobs, results)
    assert sorted(os.listdir(tmp_path / "objects")) == sorted(h for h, *_ in items)
    assert stage_folders() == before, "the folder of links to the objects is removed"


def test_put_many_fails_an_object_rclone_cannot_write_alone(tmp_path: Path, empty_config: str) -> None:
    remote = RcloneRemote("rc", f":local:{tmp_path}/objects", config=empty_config)
    blobs = [b"first", b"second", b"third"]
    items = batch_items(tmp_path, blobs)
    (tmp_path / "objects" / items[1][0]).mkdir(parents=True)  # a folder where its copy would go
    try:
        results = remote.put_many(items)
    finally:
        close_items(items)
    assert results[0] == join(public_remote(remote.remote), items[0][0])
    assert results[2] == join(public_remote(remote.remote), items[2][0])
    assert isinstance(results[1], RemoteError) and "rclone copy failed" in str(results[1]), results[1]
    assert items[1][0] in str(results[1]) or "directory" in str(results[1])


def test_put_many_with_a_source_rclone_cannot_read_fails_the_batch(tmp_path: Path, empty_config: str) -> None:
    remote = RcloneRemote("rc", f":local:{tmp_path}/objects", config=empty_config)
    items = batch_items(tmp_path, [b"first", b"second"])
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # no file behind this descriptor
    h, fd, size, transfer = items[1]
    items[1] = (h, folder, size, transfer)
    try:
        with pytest.raises(RemoteError) as info:
            remote.put_many(items)
    finally:
        close_items(items)
        os.close(fd)
    assert info.value.kind == TRANSIENT and "not a file" in str(info.value)


def test_put_many_a_cancelled_object_stops_the_batch_and_leaves_nothing_partial(
        tmp_path: Path, empty_config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RCLONE_BWLIMIT", "1M")
    remote = RcloneRemote("rc", f":local:{tmp_path}/objects", config=empty_config)
    blobs = [os.urandom(4 << 20) for _ in range(3)]
    items = batch_items(tmp_path, blobs)
    items[0][3].cancel("stalled")  # cancelled before the batch began: never sent
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(remote.put_many(items)))
    worker.start()
    try:
        wait_for(lambda: any(t.done > 0 for *_, t in items), timeout=20, message="rclone reporting bytes")
        for *_, t in items[1:]:
            t.cancel("stalled: test")
        worker.join(30)
    finally:
        for *_, t in items:
            t.cancel("test over")
        worker.join(30)
        close_items(items)
    (results,) = outcome
    assert all(isinstance(r, Cancelled) for r in results), results
    assert "stalled" in str(results[0]) and "stalled: test" in str(results[1])
    assert not (tmp_path / "objects").exists() or os.listdir(tmp_path / "objects") == []


def test_put_many_to_a_bad_remote_path_is_a_remote_error(tmp_path: Path, empty_config: str) -> None:
    (tmp_path / "file").write_text("not a folder")
    remote = RcloneRemote("rc", f":local:{tmp_path}/file/objects", config=empty_config)
    _, results = put_batch(remote, tmp_path, [b"one", b"two"])
    assert all(isinstance(r, RemoteError) and r.kind == REMOTE and "not a directory" in str(r) for r in results), \
        results


def test_put_many_to_s3_copies_every_object(seaweed, s3_bucket: str, tmp_path: Path,  # noqa: F811
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")  # removed for http endpoints
    config = s3_config(tmp_path / "rclone.conf", seaweed)
    remote = RcloneRemote("s3rc", f"weed:{s3_bucket}/{uuid.uuid4().hex[:8]}", config=config)
    blobs = [os.urandom(5000 + i) for i in range(20)]
    items, results = put_batch(remote, tmp_path, blobs)
    check_batch_stored(remote, items, blobs, results)


def test_put_many_to_s3_with_wrong_credentials_is_a_remote_error_for_each(seaweed, s3_bucket: str,  # noqa: F811
                                                                         tmp_path: Path) -> None:
    config = s3_config(tmp_path / "rclone.conf", seaweed, secret="wrong" * 8)
    remote = RcloneRemote("s3rc", f"weed:{s3_bucket}/{uuid.uuid4().hex[:8]}", config=config)
    _, results = put_batch(remote, tmp_path, [b"one", b"two"])
    assert all(isinstance(r, RemoteError) and r.kind == REMOTE for r in results), results


def test_the_uploader_sends_rclone_batches_and_never_records_a_mismatching_object(tmp_path: Path,
                                                                                  empty_config: str) -> None:
    from test_uploads import World, step

    world = World(tmp_path)
    remote = RcloneRemote("rc", f":local:{tmp_path}/objects", config=empty_config)
    up, calls, bad = world.batch_uploader(remote)
    try:
        hashes = [world.add_file(f"rclone object {i:02d}".encode() * 40, ["rc"]) for i in range(12)]
        rotten = hashes[5]
        with open(world.cache.object_path(rotten), "r+b") as f:
            f.write(b"X")  # same size, other bytes: sent, but the uploader's check refuses to record it
        step(up)
        assert calls == [12]
        assert bad == [rotten] and world.copies(rotten) == []
        assert remote.exists(rotten, "") is None, "the copy of the wrong bytes is deleted"
        assert all(world.copies(h) == ["rc"] for h in hashes if h != rotten)
    finally:
        world.close()


def test_a_daemon_uploads_a_drop_of_small_files_to_an_rclone_remote(daemon_factory, workdir: Path) -> None:
    (workdir / "rclone.conf").write_text("")
    objects = workdir / "rclone-objects"
    d = daemon_factory(remotes=0, start=False, upload={"redundancy": 1}, log={"level": "info"})
    d.config["remotes"] = [{"name": "rc", "type": "rclone", "remote": f":local:{objects}",
                            "config": str(workdir / "rclone.conf")}]
    d.config_path.write_text(yaml.safe_dump(d.config))
    d.start()
    datas = [os.urandom(3000 + i) for i in range(40)]
    staging = workdir / "staging"
    staging.mkdir()
    for i, data in enumerate(datas):
        (staging / f"f{i:02d}").write_bytes(data)
    for i in range(len(datas)):
        os.rename(staging / f"f{i:02d}", d.inbox / f"f{i:02d}")
    wait_for(lambda: d.status()["uploads"]["copies"] == len(datas), timeout=60,
             message="every file copied to the rclone remote")
    for data in datas:
        assert (objects / hashlib.sha256(data).hexdigest()).read_bytes() == data
    uploads = d.status()["uploads"]
    assert uploads["failed"] == uploads["retrying"] == 0


def test_put_many_without_a_usable_temp_folder_is_one_clear_error(tmp_path: Path, empty_config: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    remote = RcloneRemote("rc", f":local:{tmp_path}/objects", config=empty_config)
    items = batch_items(tmp_path, [b"one", b"two"])
    try:
        with pytest.raises(RemoteError) as info:
            remote.put_many(items)
    finally:
        close_items(items)
    assert info.value.kind == TRANSIENT and "no-such-folder" in str(info.value) and "TMPDIR" in str(info.value)
    assert "\n" not in str(info.value)
