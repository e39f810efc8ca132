"""`export` and `import` over the control socket with descriptors and texts chosen to hurt the daemon."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from cloudmanagerd import ops
from cloudmanagerd.errors import CloudManagerError
from conftest import wait_for

pytestmark = pytest.mark.e2e


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_an_endless_descriptor_is_refused_without_reading_it_into_memory(daemon_factory, workdir: Path):
    d = daemon_factory(remotes=1)
    before = _peak_rss_kib(d.proc.pid)
    zero = os.open("/dev/zero", os.O_RDONLY)
    try:
        started = time.monotonic()
        reply = d.request({"cmd": "import"}, [zero])
    finally:
        os.close(zero)
    assert not reply["ok"] and "nothing imported" in reply["error"], reply
    assert time.monotonic() - started < 2
    # not a gigabyte of NULs held in the daemon's memory before the refusal
    assert _peak_rss_kib(d.proc.pid) - before < 64 << 10
    # a file larger than any import is refused from its size, before a byte is read
    big = workdir / "big.json"
    with open(big, "wb") as f:
        f.truncate(ops.IMPORT_MAX + 1)
    fd = os.open(big, os.O_RDONLY)
    try:
        reply = d.request({"cmd": "import"}, [fd])
    finally:
        os.close(fd)
    assert not reply["ok"] and "larger than" in reply["error"], reply
    assert _peak_rss_kib(d.proc.pid) - before < 64 << 10
    assert d.status()["catalog"]["files"] == 0


def test_a_write_only_descriptor_for_import_says_so(daemon_factory, workdir: Path):
    d = daemon_factory(remotes=1)
    fd = os.open(workdir / "w.json", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        reply = d.request({"cmd": "import"}, [fd])
    finally:
        os.close(fd)
    assert not reply["ok"] and "not open for reading" in reply["error"], reply


class _Node:
    """Just enough of a node for ops.import_from to refuse before it touches the catalog."""
    catalog = None


def test_an_import_whose_writer_sends_nothing_fails_after_the_stall_time():
    r, w = os.pipe()
    try:
        os.write(w, b"[")
        started = time.monotonic()
        with pytest.raises(OSError, match="nothing was written"):
            ops.import_from(_Node(), r, stall=0.5)
        assert time.monotonic() - started < 5
    finally:
        os.close(r)
        os.close(w)


def test_only_one_import_reads_at_a_time():
    r, w = os.pipe()
    r2, w2 = os.pipe()
    done = threading.Event()

    def first() -> None:
        with pytest.raises(OSError):
            ops.import_from(_Node(), r, stall=3)
        done.set()

    try:
        os.write(w, b"[")
        t = threading.Thread(target=first)
        t.start()
        time.sleep(0.3)
        os.write(w2, b"[]")
        os.close(w2)
        w2 = -1
        with pytest.raises(CloudManagerError, match="another import"):
            ops.import_from(_Node(), r2)
        t.join(10)
        assert done.is_set()
    finally:
        for fd in (r, w, r2, w2):
            if fd >= 0:
                os.close(fd)


def test_an_export_whose_reader_went_away_leaves_the_files_due(daemon_factory, workdir: Path):
    d = daemon_factory(remotes=1)
    data = b"to be exported\n"
    (d.inbox / "f.txt").write_bytes(data)
    wait_for(lambda: d.status()["safety"]["below_redundancy"] == 0 and d.status()["catalog"]["files"] == 1,
             message="the file on its remote")
    r, w = os.pipe()
    os.close(r)  # the reader went away before a byte was written
    try:
        reply = d.request({"cmd": "export"}, [w])
    finally:
        os.close(w)
    assert not reply["ok"] and reply.get("errno") == "EPIPE", reply
    # the text reached no one: the file is still due, not held back for an hour
    out = workdir / "out.json"
    result = d.ctl("export", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert [e["filehash"] for e in json.loads(out.read_text())] == [hashlib.sha256(data).hexdigest()]
    # ctl export into a pipe whose reader is gone: a failure, and still nothing lost
    r, w = os.pipe()
    os.close(r)
    try:
        result = d.ctl("export", stdout=w)
    finally:
        os.close(w)
    assert result.returncode != 0
    result = d.ctl("export", "-o", str(out))  # exported above: nothing due now
    assert result.returncode == 0 and json.loads(out.read_text()) == []


def test_the_same_export_twice_from_stdin_into_a_node_with_other_remote_names(daemon_factory, workdir: Path):
    a = daemon_factory(remotes=2)
    data = b"foreign\n" * 10
    (a.inbox / "f").write_bytes(data)
    wait_for(lambda: a.status()["safety"]["below_redundancy"] == 0 and a.status()["catalog"]["files"] == 1,
             message="the file on both remotes")
    text = a.ctl("export").stdout
    (workdir / "b").mkdir()
    b = daemon_factory(remotes=2, root=workdir / "b", start=False)
    for i, r in enumerate(b.config["remotes"]):
        r["name"] = f"other{i}"
    import yaml
    b.config_path.write_text(yaml.safe_dump(b.config))
    b.start()
    for _ in range(2):  # importing the same text twice changes nothing the second time
        result = b.ctl("import", "-", input=text)
        assert result.returncode == 0, result.stderr
    assert b"0 copies" in result.stdout
    h = hashlib.sha256(data).hexdigest()
    info = json.loads(b.ctl("--json", "info", h).stdout)
    assert info["copies"] == [] and info["pending"] == [] and not info["cached"]
    time.sleep(3)  # no upload is queued for a file this node holds no byte of
    s = b.status()
    assert s["uploads"]["queued"] == s["uploads"]["retrying"] == s["uploads"]["active"] == 0, s["uploads"]
    assert b.ctl("get", h).returncode == 1  # not fetchable: its locations are on remotes b does not have
    assert s["catalog"]["files"] == 1
