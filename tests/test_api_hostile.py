"""A hostile user against `CloudManager`: each test is one finding of the review of issue 11."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from cloudmanagerd import CloudManager

from test_api import folder_remotes, sha


def test_upload_of_a_path_with_nul_or_a_lone_surrogate_is_false_not_a_traceback(workdir: Path):
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 1000, remotes=[]) as cm:
        for bad in ["a\x00b", b"a\x00b", "\ud800", str(workdir / "x\ud800")]:
            assert cm.upload(bad) is False
        assert cm.used_space() == 0


def test_data_dump_with_a_limit_beyond_sqlite_integers_dumps_everything(workdir: Path):
    remotes = folder_remotes(workdir, "nas")
    (workdir / "f").write_bytes(b"f" * 10)
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 1000, remotes=remotes) as cm:
        h = cm.upload(str(workdir / "f"))
        cm.cloud_sync()
        for limit in (0, 1, 2):
            assert cm.data_dump(limit) is None
        assert [e["filehash"] for e in json.loads(cm.data_dump(10 ** 30))] == [h]


def test_an_imported_location_on_a_local_remote_does_not_make_an_uncopied_file_evictable(workdir: Path):
    remotes = folder_remotes(workdir, "nas")
    (workdir / "f").write_bytes(b"only here" * 10)
    (workdir / "g").write_bytes(b"g" * 950)
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 1000, remotes=remotes) as cm:
        h = cm.upload(str(workdir / "f"))
        entry = cm.info(h)
        entry["uploads"] = [{"host_name": "nas", "url": "claimed, never checked"}]
        assert cm.data_load(json.dumps([entry])) is True
        # the claim is unverified: f still has no copy, so it may not make room for g
        assert cm.upload(str(workdir / "g")) is False
        assert cm.on_cache(h)
        assert cm.upload_queue_info()["count"] == 1
        cm.cloud_sync()
        assert (workdir / "nas" / h[:2] / h).read_bytes() == b"only here" * 10
        assert cm.upload(str(workdir / "g")) == sha(b"g" * 950)  # now f has a real copy and may go


def test_warm_up_and_upload_recreate_a_cache_folder_deleted_behind_their_back(workdir: Path):
    remotes = folder_remotes(workdir, "nas")
    (workdir / "f").write_bytes(b"precious" * 50)
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 10_000, remotes=remotes) as cm:
        h = cm.upload(str(workdir / "f"))
        cm.cloud_sync()
        shutil.rmtree(workdir / "store")
        assert cm.on_cache(h) is False
        path = cm.warm_up(h)
        assert path and Path(path).read_bytes() == b"precious" * 50
        assert cm.on_cache(h) and cm.used_space() == 400
        for gone in (workdir / "store", workdir / "store" / h[:2], workdir / "store" / "tmp"):
            shutil.rmtree(gone)
            assert cm.upload(str(workdir / "f")) == h
            assert cm.on_cache(h) and cm.used_space() == 400


_KILLED_CHILD = r'''
import os, sys, time
from cloudmanagerd import CloudManager
import cloudmanagerd.remotes.directory as directory
w, verb = sys.argv[1], sys.argv[2]
cm = CloudManager(f"{w}/db.sqlite3", f"{w}/store", 10**6,
                  remotes=[{"name": "nas", "type": "directory", "path": f"{w}/nas"}])
def stop(*args, **kwargs):
    print("ready", flush=True)
    time.sleep(600)
if verb == "upload":
    os.fsync = stop  # the copy is written, not yet in place
    cm.upload(f"{w}/f")
else:
    directory.DirectoryRemote.put = stop  # a transfer in flight
    cm.cloud_sync()
'''


def _kill_mid(workdir: Path, verb: str) -> None:
    """Run `verb` in a child process and SIGKILL it in the middle."""
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(workdir), verb], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_a_killed_upload_leaves_no_temp_file_once_the_next_cloudmanager_opens(workdir: Path):
    remotes = folder_remotes(workdir, "nas")
    (workdir / "f").write_bytes(b"z" * 100_000)
    _kill_mid(workdir, "upload")
    assert os.listdir(workdir / "store" / "tmp")  # the half-done copy of the killed process
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 10**6, remotes=remotes) as cm:
        assert os.listdir(workdir / "store" / "tmp") == []
        assert cm.exists(sha(b"z" * 100_000)) is False and cm.used_space() == 0
        assert cm.upload(str(workdir / "f")) == sha(b"z" * 100_000)


def test_a_cloud_sync_killed_mid_transfer_does_not_strand_its_claims(workdir: Path):
    remotes = folder_remotes(workdir, "nas")
    (workdir / "f").write_bytes(b"z" * 1000)
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 10**6, remotes=remotes) as cm:
        h = cm.upload(str(workdir / "f"))
    _kill_mid(workdir, "sync")
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 10**6, remotes=remotes) as cm:
        assert cm.cloud_sync() == 1
        assert (workdir / "nas" / h[:2] / h).read_bytes() == b"z" * 1000
        assert cm.upload_queue_info() == {"size": 0, "count": 0}


def test_an_imported_size_that_lies_never_puts_more_bytes_in_the_cache_than_its_account(workdir: Path):
    remotes = folder_remotes(workdir, "nas")
    data = b"the real bytes" * 100
    h = sha(data)
    (workdir / "nas" / h[:2]).mkdir()
    (workdir / "nas" / h[:2] / h).write_bytes(data)
    entry = {"version": "0.2", "datetime": "1", "filename": "x", "filesize": 5, "filehash": h,
             "uploads": [{"host_name": "nas", "url": "u"}]}
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 10_000, remotes=remotes) as cm:
        assert cm.data_load(json.dumps([entry])) is True
        assert cm.warm_up(h) is False
        assert not (workdir / "store" / h[:2] / h).exists() and os.listdir(workdir / "store" / "tmp") == []
        assert cm.used_space() == 0 and cm.on_cache(h) is False


def test_an_imported_location_that_was_never_true_queues_no_upload_that_can_only_fail(workdir: Path):
    remotes = folder_remotes(workdir, "nas", "backup")
    h = sha(b"nobody has these bytes")
    entry = {"version": "0.2", "datetime": "1", "filename": "x", "filesize": 22, "filehash": h,
             "uploads": [{"host_name": "nas", "url": "u"}]}
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 10_000, remotes=remotes) as cm:
        assert cm.data_load(json.dumps([entry])) is True
        assert cm.warm_up(h) is False
        assert cm.upload_queue_info() == {"size": 0, "count": 0}
        assert cm.cloud_sync() == 0
        assert cm.sync_status()["cloud_queue"] == [] and cm.exists(h)


def test_opening_a_second_cloudmanager_keeps_the_temp_files_of_this_process_in_flight(workdir: Path):
    remotes = folder_remotes(workdir, "nas")
    (workdir / "f").write_bytes(b"f" * 100)
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 10_000, remotes=remotes) as first:
        real_fsync = os.fsync

        def open_another_meanwhile(fd: int) -> None:  # as another thread of this process would
            os.fsync = real_fsync
            CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 10_000, remotes=remotes).close()
            real_fsync(fd)

        os.fsync = open_another_meanwhile
        try:
            assert first.upload(str(workdir / "f")) == sha(b"f" * 100)
        finally:
            os.fsync = real_fsync


def test_every_verb_after_close_returns_its_false_value_and_sends_nothing(workdir: Path):
    remotes = folder_remotes(workdir, "nas")
    (workdir / "f").write_bytes(b"f" * 100)
    cm = CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 10_000, remotes=remotes)
    h = cm.upload(str(workdir / "f"))
    cm.close()
    assert cm.cloud_sync() == 0 and not (workdir / "nas" / h[:2]).exists()
    assert cm.upload(str(workdir / "f")) is False
    assert cm.warm_up(h) is False and cm.download(h) is False
    assert cm.exists(h) is False and cm.on_cache(h) is False and cm.info(h) is None
    assert cm.used_space() == 0 and cm.usage_ratio() == 0.0
    assert cm.upload_queue_info() == cm.blockchain_queue_info() == {"size": 0, "count": 0}
    assert cm.sync_status() == {"cloud_queue": [], "blockchain_queue": []}
    assert cm.data_dump(1000) is None and cm.data_load("[]") is False
    assert cm.last_known_block() == 0 and cm.visit_block(5) is None
    assert cm.total_incoming() == cm.total_outgoing() == cm.current_incoming() == cm.current_outgoing() == 0
    cm.close()  # twice is fine


def test_a_catalog_error_is_a_false_value_and_a_log_line_not_a_traceback(workdir: Path, monkeypatch, caplog):
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 10_000, remotes=[]) as cm:
        def disk_error(*args):
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(cm.catalog, "file_size", disk_error)
        assert cm.exists(sha(b"")) is False and cm.warm_up(sha(b"")) is False
        assert "disk I/O error" in caplog.text
