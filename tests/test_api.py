"""`from cloudmanagerd import CloudManager`: the original library's verbs, with the original's meaning."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from cloudmanagerd import CloudManager
from cloudmanagerd.config import ConfigError

from conftest import default_config


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_remotes(root: Path, *names: str) -> list[dict[str, str]]:
    for name in names:
        (root / name).mkdir()
    return [{"name": name, "type": "directory", "path": str(root / name)} for name in names]


@pytest.fixture
def config_file(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A daemon config with two folder remotes, named by CLOUDMANAGERD_CONFIG as the original's callers would."""
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(default_config(workdir, remotes=2)))
    monkeypatch.setenv("CLOUDMANAGERD_CONFIG", str(path))
    return path


def test_the_original_readme_example_runs_with_only_the_import_changed(workdir: Path, config_file: Path):
    import cloudmanagerd as cloudmanager  # the only line that differs from the original's README

    (workdir / "file").write_bytes(b"hello, cloud\n" * 100)
    threads = threading.active_count()
    cm = cloudmanager.CloudManager(
        str(workdir / "database.sqlite3"),  # Database of the stored files' information
        str(workdir / "storage") + "/",     # Cached files will be stored here
        20 * (2**30))                       # 20 GiB capacity
    h = cm.upload(str(workdir / "file"))    # returns hash of the uploaded file, or False
    assert h == sha(b"hello, cloud\n" * 100)
    assert cm.warm_up(h) == str(workdir / "storage" / h[:2] / h)
    assert cm.download(h) == cm.warm_up(h)
    assert cm.exists(h) is True and cm.on_cache(h) is True
    assert 0 < cm.usage_ratio() < 1
    assert (workdir / "file").exists()  # the caller's file stays
    cm.close()
    assert threading.active_count() == threads  # the API starts no thread of its own


def test_cloud_sync_copies_to_the_config_remotes_and_info_carries_locations(workdir: Path, config_file: Path):
    (workdir / "a.txt").write_bytes(b"A" * 1000)
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 10_000) as cm:
        h = cm.upload(str(workdir / "a.txt"))
        assert cm.upload_queue_info() == {"size": 1000, "count": 1}
        assert cm.blockchain_queue_info() == {"size": 0, "count": 0}
        assert cm.cloud_sync() == 2
        assert (workdir / "remotes" / "r0" / h[:2] / h).read_bytes() == b"A" * 1000
        assert (workdir / "remotes" / "r1" / h[:2] / h).read_bytes() == b"A" * 1000
        assert cm.upload_queue_info() == {"size": 0, "count": 0}
        assert cm.blockchain_queue_info() == {"size": 1000, "count": 1}
        info = cm.info(h)
        assert info["version"] == "0.2" and info["filename"] == "a.txt" and info["filesize"] == 1000
        assert {u["host_name"] for u in info["uploads"]} == {"r0", "r1"}
        assert cm.total_incoming() == 1000 and cm.total_outgoing() == 2000
        assert cm.current_incoming() == 1000 and cm.current_outgoing() == 2000
        assert cm.upload(str(workdir / "a.txt")) == h  # the same hash again for known content
        assert cm.cloud_sync() == 0


def test_a_tiny_cache_evicts_a_synced_file_and_warm_up_brings_it_back(workdir: Path):
    remotes = folder_remotes(workdir, "nas")
    (workdir / "one").write_bytes(b"1" * 40)
    (workdir / "two").write_bytes(b"2" * 40)
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 60, remotes=remotes) as cm:
        h1 = cm.upload(str(workdir / "one"))
        assert cm.upload(str(workdir / "two")) is False  # the first has no copy yet: it may not go
        cm.cloud_sync()
        h2 = cm.upload(str(workdir / "two"))
        assert h2 == sha(b"2" * 40)
        assert not cm.on_cache(h1) and cm.on_cache(h2) and cm.used_space() == 40
        assert cm.warm_up(h1) is False  # no room: h2 has no copy yet
        cm.cloud_sync()
        path = cm.warm_up(h1)
        assert Path(path).read_bytes() == b"1" * 40 and cm.on_cache(h1) and not cm.on_cache(h2)


def test_warm_up_fetches_again_when_the_cache_folder_was_emptied_behind_its_back(workdir: Path):
    remotes = folder_remotes(workdir, "nas")
    (workdir / "f").write_bytes(b"precious" * 50)
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 10_000, remotes=remotes) as cm:
        h = cm.upload(str(workdir / "f"))
        cm.cloud_sync()
        shutil.rmtree(workdir / "store" / h[:2])
        assert cm.on_cache(h) is False
        path = cm.warm_up(h)
        assert Path(path).read_bytes() == b"precious" * 50
        assert cm.on_cache(h) and cm.used_space() == 400


def test_a_copy_with_other_bytes_is_never_handed_out(workdir: Path):
    remotes = folder_remotes(workdir, "nas")
    (workdir / "f").write_bytes(b"x" * 64)
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 100, remotes=remotes) as cm:
        h = cm.upload(str(workdir / "f"))
        cm.cloud_sync()
        os.unlink(workdir / "store" / h[:2] / h)
        (workdir / "nas" / h[:2] / h).write_bytes(b"y" * 64)
        assert cm.warm_up(h) is False
        assert not (workdir / "store" / h[:2] / h).exists()


def test_two_nodes_stay_in_sync_through_the_exchange_format(workdir: Path):
    remotes = folder_remotes(workdir, "nas", "backup")
    (workdir / "a").write_bytes(b"from node a" * 10)
    (workdir / "b").write_bytes(b"from node b" * 10)
    with CloudManager(str(workdir / "a.sqlite3"), str(workdir / "cache-a"), 10_000, remotes=remotes) as a, \
            CloudManager(str(workdir / "b.sqlite3"), str(workdir / "cache-b"), 10_000, remotes=remotes) as b:
        ha, hb = a.upload(str(workdir / "a")), b.upload(str(workdir / "b"))
        assert a.data_dump(10_000) is None  # no copies yet: nothing to offer
        a.cloud_sync(), b.cloud_sync()
        dump_a, dump_b = a.data_dump(10_000), b.data_dump(10_000)
        assert json.loads(dump_a)[0]["filehash"] == ha
        assert a.data_dump(10_000) is None  # exported once; offered again only after an hour
        assert b.data_load(dump_a, "block-1") is True and a.data_load(dump_b, "block-1") is True
        assert Path(b.warm_up(ha)).read_bytes() == b"from node a" * 10
        assert Path(a.warm_up(hb)).read_bytes() == b"from node b" * 10
        assert b.info(ha)["filename"] == "a"
        assert a.data_load(dump_b) is True  # the same again: nothing new, still true
        # b's own file was offered within the hour, and the imported one is confirmed: nothing is due
        assert b.blockchain_queue_info()["count"] == 0 and b.data_dump(10_000) is None


def test_data_dump_respects_the_limit_and_data_load_of_nothing_is_true(workdir: Path):
    remotes = folder_remotes(workdir, "nas")
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 100_000, remotes=remotes) as cm:
        for i in range(5):
            (workdir / f"f{i}").write_bytes(b"%d" % i * 10)
            cm.upload(str(workdir / f"f{i}"))
        cm.cloud_sync()
        assert cm.data_load("[]") is True
        first = cm.data_dump(600)
        assert len(first) <= 600 and 1 <= len(json.loads(first)) < 5
        rest = json.loads(cm.data_dump(1 << 20))
        assert len(json.loads(first)) + len(rest) == 5
        assert cm.last_known_block() == 0
        assert cm.visit_block(1234) is None and cm.last_known_block() == 1234


def test_bad_input_gives_false_or_none_changes_nothing_and_never_raises(workdir: Path, caplog):
    remotes = folder_remotes(workdir, "nas")
    (workdir / "f").write_bytes(b"f" * 10)
    os.mkfifo(workdir / "fifo")
    os.symlink(workdir / "f", workdir / "link")
    with CloudManager(str(workdir / "db.sqlite3"), str(workdir / "store"), 1000, remotes=remotes) as cm:
        h = cm.upload(str(workdir / "f"))
        hostile = [None, "", 7, 1.5, b"\x00", [], {}, "'; DROP TABLE files; --", h.upper(), h + "0", h[:63], "../" * 30]
        for bad in hostile:
            assert cm.exists(bad) is False
            assert cm.on_cache(bad) is False
            assert cm.info(bad) is None
            assert cm.warm_up(bad) is None and cm.download(bad) is None
            assert cm.data_dump(bad) is None
            assert cm.visit_block(bad) is None
            assert not cm.data_load(bad)
        for bad in [None, "", 7, str(workdir / "missing"), str(workdir), str(workdir / "fifo"),
                    str(workdir / "link"), "\udcff"]:
            assert cm.upload(bad) is False
        assert not cm.data_load("x" * (10 << 20))
        assert not cm.data_load("[" * 50_000 + "]" * 50_000)
        good = json.loads(cm.info(h) and json.dumps([cm.info(h)]))
        assert not cm.data_load(json.dumps(good + [{**good[0], "extra": 1}]))
        assert not cm.data_load(json.dumps([{**good[0], "filesize": 11}]))  # contradicts the catalog
        assert not cm.data_load("[]", source=["not", "a", "label"])
        assert cm.last_known_block() == 7  # of the hostile list, only 7 is a block height
        assert cm.sync_status()["cloud_queue"][0]["filehash"] == h
        assert cm.exists(h) and cm.info(h)["filesize"] == 10


def test_a_bad_remotes_argument_is_a_config_error_naming_the_key(workdir: Path):
    with pytest.raises(ConfigError, match=r"remotes\[0\]\.type"):
        CloudManager(str(workdir / "db"), str(workdir / "s"), 100, remotes=[{"name": "x", "type": "ftp"}])
    with pytest.raises(ConfigError, match="upload.redundancy"):
        CloudManager(str(workdir / "db"), str(workdir / "s"), 100, remotes=[], redundancy=2)
    with pytest.raises(ConfigError, match="storage_size"):
        CloudManager(str(workdir / "db"), str(workdir / "s"), -1)
