"""Several daemons on one catalog (issue 13): node names, remote places, `nodes`, the cluster in status.

Every test runs real daemons as subprocesses, each with its own inbox, cache and state folder,
sharing one catalog (a SQLite file in WAL mode: two daemons on one machine can share it) and the
same folder remotes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Daemon, wait_for

from cloudmanagerd.catalog import Catalog
from cloudmanagerd.daemon import redact_url

LEASE = "2s"  # short, so that a dead node is seen as down quickly


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> dict[str, str]:
    """The shared catalog: the first node's SQLite file, or a fresh database on a real PostgreSQL."""
    if request.param == "sqlite":
        return {}
    return {"catalog": request.getfixturevalue("postgres_url")}


def first(factory, workdir: Path, backend: dict[str, str], name: str = "n1",
          remote_list: list | None = None) -> Daemon:
    root = workdir / name
    root.mkdir()
    if remote_list is None:
        return factory(remotes=1, root=root, node=name, cluster={"lease": LEASE}, **backend)
    return with_remotes(factory, root, remote_list, True, node=name, cluster={"lease": LEASE}, **backend)


def shown(url: str) -> str:
    """A catalog URL as messages show it (a PostgreSQL one without its user)."""
    return redact_url(url)


def with_remotes(factory, root: Path, remote_list: list, start: bool, **overrides: Any) -> Daemon:
    """A daemon whose remotes are `remote_list` (the factory makes its own otherwise)."""
    d = factory(remotes=0, root=root, start=False, **overrides)
    d.config["remotes"] = remote_list
    d.config_path.write_text(yaml.safe_dump(d.config))
    return d.start() if start else d


def twin(factory, workdir: Path, of: Daemon, name: str, dirname: str | None = None, start: bool = True,
         **overrides: Any) -> Daemon:
    """Another node on `of`'s catalog and remotes, in its own folders."""
    root = workdir / (dirname or name)
    root.mkdir()
    remote_list = overrides.pop("remotes", of.config["remotes"])
    settings = {"catalog": catalog_url(of), "node": name, "cluster": {"lease": LEASE}, **overrides}
    return with_remotes(factory, root, remote_list, start, **settings)


def catalog_url(d: Daemon) -> str:
    return d.config.get("catalog") or f"sqlite:///{d.config['state']}/catalog.sqlite3"


def refused(d: Daemon) -> str:
    """Start `d`, expect it to refuse (exit 1), and return its log."""
    d.start(wait=False)
    assert d.proc.wait(60) == 1, d.log()
    d._close_log()
    return d.log()


def nodes_of(d: Daemon) -> dict[str, dict[str, Any]]:
    out = d.ctl("--json", "nodes")
    assert out.returncode == 0, out.stderr
    return {n["node"]: n for n in json.loads(out.stdout)}


def nodes_in(url: str) -> dict[str, dict[str, Any]]:
    """The nodes table through the catalog's interface, for when no daemon is up to ask."""
    catalog = Catalog.open(url, "test")
    try:
        return {n["node"]: n for n in catalog.nodes(time.time(), 2.0)}
    finally:
        catalog.close()


def drop(d: Daemon, name: str, data: bytes) -> None:
    tmp = d.inbox / f".{name}.tmp"
    tmp.write_bytes(data)
    os.rename(tmp, d.inbox / name)


def test_second_live_node_with_the_same_name_is_refused(daemon_factory, workdir, backend):
    a = first(daemon_factory, workdir, backend)
    b = twin(daemon_factory, workdir, a, "n1", dirname="clone", start=False)
    log = refused(b)
    url = catalog_url(a)
    assert f"node n1 is already running on catalog {shown(url)}, last heartbeat" in log
    assert f"(pid {a.proc.pid} on host " in log
    assert "set `node:` in the config to a unique name (cloned machines share hostnames)" in log
    assert "Traceback" not in log
    # the refused twin touched nothing of the running node's: it still runs and owns its name
    assert a.status()["state"] == "running"
    assert nodes_of(a)["n1"]["pid"] == a.proc.pid
    assert a.stop() == 0


def test_a_node_that_died_is_taken_over_after_the_lease(daemon_factory, workdir, backend):
    a = first(daemon_factory, workdir, backend)
    drop(a, "one.txt", b"kept across the takeover")
    wait_for(lambda: a.files(), message="the file registered")
    a.kill()
    url = catalog_url(a)
    assert nodes_in(url)["n1"]["state"] == "up"  # its heartbeat is still fresh
    b = twin(daemon_factory, workdir, a, "n1", dirname="clone")  # waits for the lease to run out
    assert "waiting up to cluster.lease (2 s) to see whether it still runs" in b.log()
    assert [f["name"] for f in b.files()] == ["one.txt"]
    assert nodes_of(b)["n1"]["pid"] == b.proc.pid
    assert b.stop() == 0


def test_a_crashed_node_restarts_at_once_from_its_own_state_folder(daemon_factory, workdir, backend):
    root = workdir / "n1"
    root.mkdir()
    a = daemon_factory(remotes=1, root=root, node="n1", cluster={"lease": "1h"}, **backend)
    a.kill()
    started = time.monotonic()
    a.start()  # same boot, same state folder (whose lock it now holds): the old process is gone
    assert time.monotonic() - started < 30
    assert "waiting up to cluster.lease" not in a.log()
    assert nodes_of(a)["n1"]["pid"] == a.proc.pid
    assert a.stop() == 0


def test_a_clean_stop_frees_the_name_at_once_and_shows_stopped(daemon_factory, workdir, backend):
    a = first(daemon_factory, workdir, backend)
    b = twin(daemon_factory, workdir, a, "n2")
    assert b.stop() == 0
    assert nodes_of(a)["n2"]["state"] == "stopped"
    again = twin(daemon_factory, workdir, a, "n2", dirname="n2-again")  # no lease to wait out
    assert nodes_of(again)["n2"]["state"] == "up"
    assert again.stop() == 0 and a.stop() == 0


def test_a_node_cut_off_past_its_lease_stops_when_it_finds_its_name_taken(daemon_factory, workdir, backend):
    a = first(daemon_factory, workdir, backend)
    url = catalog_url(a)
    os.kill(a.proc.pid, signal.SIGSTOP)  # a frozen VM, a long GC pause, a cut network
    try:
        wait_for(lambda: nodes_in(url)["n1"]["state"] == "down", timeout=20, message="n1 seen as down")
        b = twin(daemon_factory, workdir, a, "n1", dirname="clone")
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    assert a.proc.wait(30) == 1
    a._close_log()
    assert "node n1: another process took this node name over" in a.log()
    assert "give each machine its own `node:` name" in a.log()
    # the newcomer keeps the name: the old process neither marked it stopped nor renewed it
    assert b.status()["state"] == "running"
    assert nodes_of(b)["n1"]["state"] == "up" and nodes_of(b)["n1"]["pid"] == b.proc.pid
    assert b.stop() == 0


def test_a_remote_name_that_points_elsewhere_is_refused_until_accepted(daemon_factory, workdir, backend):
    a = first(daemon_factory, workdir, backend)
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    r0 = a.config["remotes"][0]
    b = twin(daemon_factory, workdir, a, "n2", start=False,
             remotes=[{"name": "r0", "type": "directory", "path": str(elsewhere)}])
    log = refused(b)
    assert (f"remotes.r0: this config puts it at directory {elsewhere}, but the catalog knows remote r0 as "
            f"directory {r0['path']} (recorded by node n1)") in log
    assert f"cloudmanagerd accept-remote -c {b.config_path} r0" in log
    assert "Traceback" not in log

    # an unknown name is a usage error that names the remotes there are
    out = subprocess.run([sys.executable, "-m", "cloudmanagerd", "accept-remote", "-c", str(b.config_path), "nas"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"{b.config_path} has no remote named nas (its remotes: r0)" in out.stderr

    out = subprocess.run([sys.executable, "-m", "cloudmanagerd", "accept-remote", "-c", str(b.config_path), "r0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"remote r0 is directory {elsewhere} (was directory {r0['path']})" in out.stdout
    b.start()
    assert b.status()["state"] == "running"

    # now the first node's config is the odd one out: a reload is refused and the old config kept
    reply = a.request({"cmd": "reload"})
    assert not reply["ok"]
    assert "remotes.r0: this config puts it at directory" in reply["error"]
    assert any(p.startswith("reload failed: remotes.r0") for p in a.status()["problems"])
    assert b.stop() == 0 and a.stop() == 0


def test_a_remote_renamed_on_one_node_is_refused_until_every_node_takes_the_new_name(daemon_factory, workdir,
                                                                                     backend):
    # n2 calls n1's remote r0 "nas": each node would upload its own copy under its own name, and one
    # object would count as two copies (a file evicted from every cache with a single copy)
    a = first(daemon_factory, workdir, backend)
    r0 = a.config["remotes"][0]
    renamed = [{**r0, "name": "nas"}]
    b = twin(daemon_factory, workdir, a, "n2", start=False, remotes=renamed)
    log = refused(b)
    assert (f"remotes.nas: this config puts it at directory {r0['path']}, which the catalog knows as remote r0 "
            "(recorded by node n1)") in log
    assert f"cloudmanagerd accept-remote -c {b.config_path} nas" in log
    assert "Traceback" not in log

    out = subprocess.run([sys.executable, "-m", "cloudmanagerd", "accept-remote", "-c", str(b.config_path), "nas"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    b.start()
    # now n1's old name is the odd one out
    reply = a.request({"cmd": "reload"})
    assert not reply["ok"] and "which the catalog knows as remote nas" in reply["error"]
    assert b.stop() == 0 and a.stop() == 0


def test_nodes_lists_every_node_and_one_killed_shows_down_after_the_lease(daemon_factory, workdir, backend):
    a = first(daemon_factory, workdir, backend)
    b = twin(daemon_factory, workdir, a, "n2")
    drop(b, "on-b.txt", b"x" * 1000)
    wait_for(lambda: nodes_of(a)["n2"]["cache_files"] == 1, message="n2's cached file")
    seen = nodes_of(a)
    assert set(seen) == {"n1", "n2"}
    assert seen["n1"]["state"] == seen["n2"]["state"] == "up"
    assert seen["n1"]["this"] and not seen["n2"]["this"]
    assert seen["n2"]["cache_bytes"] == 1000 and seen["n1"]["cache_files"] == 0
    assert seen["n2"]["pid"] == b.proc.pid and seen["n2"]["age"] < 2
    assert a.status()["cluster"]["up"] == 2

    b.kill()
    wait_for(lambda: nodes_of(a)["n2"]["state"] == "down", timeout=20, message="n2 shown down")
    human = a.ctl("nodes")
    assert human.returncode == 0, human.stderr
    lines = {line.split()[0]: line for line in human.stdout.decode().splitlines()[1:]}
    assert set(lines) == {"n1", "n2"}, human.stdout
    assert " down " in lines["n2"] and " up " in lines["n1"] and "(this node)" in lines["n1"]
    cluster = a.status()["cluster"]
    assert (cluster["up"], cluster["down"], cluster["nodes"]) == (1, 1, 2)
    assert a.stop() == 0


def test_a_file_cached_only_on_a_down_node_is_at_risk_in_every_status(daemon_factory, workdir, backend):
    # a remote that takes no copy (its folder does not exist): files stay below min_redundancy
    nowhere = {"name": "r0", "type": "directory", "path": str(workdir / "missing-nas")}
    a = first(daemon_factory, workdir, backend, remote_list=[nowhere])
    b = twin(daemon_factory, workdir, a, "n2")
    drop(b, "only-on-b.bin", b"y" * 4096)
    wait_for(lambda: nodes_of(a)["n2"]["cache_files"] == 1, message="n2's cached file")
    assert a.status()["cluster"]["at_risk"] == 0  # n2 is up: it holds the bytes and keeps trying
    b.kill()

    def at_risk() -> list[str]:
        return [p for p in a.status()["problems"] if "cached only on node(s) not running" in p]
    lines = wait_for(at_risk, timeout=20, message="the at-risk problem line")
    assert lines == ["1 file(s) (4.0 KiB) below min_redundancy are cached only on node(s) not running: n2 "
                     "(start them so that the files get their copies; until then no node can fetch them)"]
    cluster = a.status()["cluster"]
    assert (cluster["at_risk"], cluster["at_risk_bytes"]) == (1, 4096)

    # the node comes back: the file is no longer at risk; stopped cleanly, it is again
    b.start()
    wait_for(lambda: not at_risk(), message="the at-risk line gone")
    assert b.stop() == 0
    assert len(at_risk()) == 1
    assert a.stop() == 0


def test_eviction_and_cache_reads_on_one_node_leave_another_nodes_rows_alone(tmp_path, backend):
    from cloudmanagerd.catalog import IngestRecord
    url = backend.get("catalog", f"sqlite:///{tmp_path}/catalog.sqlite3")
    a, b = Catalog.open(url, "a"), Catalog.open(url, "b")
    try:
        h = "ab" * 32
        for node in (a, b):  # the same content dropped on both nodes: one file, a cache entry each
            rec = IngestRecord(h, b"same.txt", 10)
            node.begin_ingest([rec], 1000.0)
            node.finish_ingest([rec], ["r0"], 1000.0)
        a.upload_done(h, "r0", "r0/x", 10, 1, 1001.0)
        a.mark_copy_verified(h, "r0", 1002.0)
        assert [c[0] for c in a.eviction_candidates(1)] == [h]
        a.mark_evicting([h])
        assert b.evicting() == [] and list(b.eviction_candidates(1)) == [(h, 10)]
        a.drop_cache_entries([h])
        assert a.cached_here([h]) == set() and b.cached_here([h]) == {h}
        assert (a.cache_usage(), b.cache_usage()) == ((0, 0), (10, 1))
        nodes = {n["node"]: n for n in a.nodes(2000.0, 60.0)}  # no daemon registered: no rows
        assert nodes == {}
    finally:
        a.close()
        b.close()


def test_two_nodes_starting_at_once_under_one_name_end_with_exactly_one_running(daemon_factory, workdir, backend):
    a = first(daemon_factory, workdir, backend)
    assert a.stop() == 0  # the catalog and its remote places exist; the name is free
    twins = [twin(daemon_factory, workdir, a, "n1", dirname=f"twin{i}", start=False) for i in range(2)]
    for d in twins:
        d.start(wait=False)

    def settled() -> bool:
        exited = [d for d in twins if d.proc.poll() is not None]
        return len(exited) == 1 and twins[twins.index(exited[0]) - 1].request({"cmd": "status"})["ok"]
    wait_for(settled, timeout=30, message="one twin running, the other refused")
    loser = next(d for d in twins if d.proc.poll() is not None)
    winner = next(d for d in twins if d is not loser)
    assert loser.proc.returncode == 1
    loser._close_log()
    assert "node n1 is already running on catalog" in loser.log()
    assert nodes_of(winner)["n1"]["pid"] == winner.proc.pid
    assert winner.stop() == 0
