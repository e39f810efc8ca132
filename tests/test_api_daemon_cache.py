"""The API and a running daemon on one cache: each one's account follows what the other added and evicted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudmanagerd import CloudManager
from conftest import wait_for

pytestmark = pytest.mark.e2e


def _on_disk(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.glob("??/*"))


def test_a_fetch_by_the_api_makes_room_for_what_the_daemon_added(daemon_factory, workdir: Path):
    d = daemon_factory(remotes=1, cache={"capacity": "1000"})
    catalog = Path(d.config["state"]) / "catalog.sqlite3"
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "a").write_bytes(b"a" * 400)
    with CloudManager(str(catalog), str(d.cache), 1000, remotes=[dict(r) for r in d.config["remotes"]]) as cm:
        a = cm.upload(str(outside / "a"))
        assert a and cm.cloud_sync() == 1
        for name in ("b", "c"):  # the daemon takes 800 bytes: `a` must go for the second
            tmp = d.inbox / f".{name}"
            tmp.write_bytes(name.encode() * 400)
            os.rename(tmp, d.inbox / name)
        wait_for(lambda: d.status()["catalog"]["files"] == 3 and d.status()["inbox"]["pending"] == 0,
                 message="the daemon took both files in")
        wait_for(lambda: d.status()["safety"]["below_redundancy"] == 0, message="their copies")
        assert _on_disk(d.cache) <= 1000, "the daemon went past the capacity"
        assert not cm.on_cache(a)
        # the API fetches `a` back: it must evict what the daemon added, not go past the capacity
        path = cm.warm_up(a)
        assert path and Path(path).read_bytes() == b"a" * 400
        assert _on_disk(d.cache) <= 1000, sorted(p.name for p in d.cache.glob("??/*"))
        assert cm.used_space() <= 1000


def test_a_cache_past_its_capacity_is_brought_back_within_it(workdir: Path):
    remote = workdir / "r0"
    remote.mkdir()
    remotes = [{"name": "r0", "type": "directory", "path": str(remote)}]
    catalog, cache = str(workdir / "catalog.sqlite3"), str(workdir / "cache")
    with CloudManager(catalog, cache, 1000, remotes=remotes) as cm:
        for name in "ab":
            (workdir / name).write_bytes(name.encode() * 400)
            assert cm.upload(str(workdir / name))
        assert cm.cloud_sync() == 2 and cm.used_space() == 800
    # the same node opened with a smaller cache (or two faces that each found room at once)
    with CloudManager(catalog, cache, 500, remotes=remotes) as cm:
        assert cm.used_space() <= 500
        assert _on_disk(Path(cache)) <= 500


def test_uploads_claimed_by_a_killed_script_are_sent_by_the_running_daemon(daemon_factory, workdir: Path):
    import subprocess
    import sys
    import textwrap
    d = daemon_factory(remotes=1, cluster={"lease": "2s"})
    catalog = Path(d.config["state"]) / "catalog.sqlite3"
    (workdir / "f").write_bytes(b"claimed, then killed\n")
    script = textwrap.dedent(f"""
        import os, signal, time
        from cloudmanagerd import CloudManager
        cm = CloudManager({str(catalog)!r}, {str(d.cache)!r}, 1 << 20, remotes={[dict(r) for r in d.config["remotes"]]!r})
        h = cm.upload({str(workdir / "f")!r})
        claims = cm.catalog.claim_due(time.time(), 10, 60, due_by=float("inf"), owner=cm.uploader.claim_owner)
        print(h, len(claims), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of cloud_sync()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    h, claimed = proc.stdout.split()
    assert proc.returncode == -9 and int(claimed) >= 1, proc.stderr
    wait_for(lambda: d.status()["safety"]["below_redundancy"] == 0 and d.status()["uploads"]["active"] == 0,
             timeout=30, message="the daemon took back the dead script's claim and sent the copy")
    assert any((Path(d.config["remotes"][0]["path"])).rglob(h.decode()))
