"""`cloudmanagerctl export` and `import`: two running daemons on the same remotes learn each other's files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from conftest import wait_for

pytestmark = pytest.mark.e2e


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_file_exported_by_one_daemon_is_fetchable_from_another_after_import(daemon_factory, workdir: Path):
    a = daemon_factory(remotes=2)
    (workdir / "b").mkdir()
    b = daemon_factory(remotes=0, root=workdir / "b", start=False)
    b.config["remotes"] = a.config["remotes"]  # the same two folder remotes, under the same names
    b.config_path.write_text(yaml.safe_dump(b.config))
    b.start()
    data = b"from node a\n" * 1000
    (a.inbox / "report.txt").write_bytes(data)
    wait_for(lambda: a.status()["safety"]["below_redundancy"] == 0 and a.status()["catalog"]["files"] == 1,
             message="the file on both remotes")

    exported = workdir / "a.json"
    result = a.ctl("export", "-o", str(exported))
    assert result.returncode == 0, result.stderr
    entries = json.loads(exported.read_text())
    assert [e["filehash"] for e in entries] == [sha(data)] and entries[0]["filename"] == "report.txt"
    assert {u["host_name"] for u in entries[0]["uploads"]} == {"r0", "r1"}
    again = a.ctl("export")  # offered once: nothing due now (again after an hour unless confirmed)
    assert again.returncode == 0 and json.loads(again.stdout) == []

    result = b.ctl("import", str(exported), "--source", "block-7")
    assert result.returncode == 0, result.stderr
    assert b"imported 1 file(s): 1 new, 2 copies" in result.stdout
    info = json.loads(b.ctl("--json", "info", sha(data)[:10]).stdout)
    assert info["name"] == "report.txt" and not info["cached"] and len(info["copies"]) == 2
    got = b.ctl("get", sha(data))
    assert got.returncode == 0 and got.stdout == data  # fetched from the shared remotes, verified
    assert b.status()["transfer"]["incoming"] == len(data)

    # an import with a bad entry imports nothing and names the entry
    bad = workdir / "bad.json"
    bad.write_text(json.dumps(entries + [{**entries[0], "filehash": "x" * 64}]))
    result = b.ctl("import", str(bad))
    assert result.returncode == 1 and b"entry 1: filehash" in result.stderr
    missing = b.ctl("import", str(workdir / "nope.json"))
    assert missing.returncode == 1 and b"cannot read" in missing.stderr
    assert b.status()["catalog"]["files"] == 1
