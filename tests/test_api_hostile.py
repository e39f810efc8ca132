"""A hostile user against `CloudManager`: each test is one finding of the review of issue 11."""

from __future__ import annotations

import json
import shutil
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
