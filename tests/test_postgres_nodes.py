"""Two daemons, each with its own inbox, cache and state, on one PostgreSQL catalog and the same two
folder remotes: what is dropped on either node is one file with one set of copies (each pair sent
once: the claims), the same content dropped on both at once is one entry, and a file registered on
one node is served by the other (fetched from a remote, verified)."""

from __future__ import annotations

import collections
import hashlib
import os
import re
from pathlib import Path

import pytest
import yaml

from conftest import Daemon, wait_for

pytestmark = pytest.mark.e2e

UPLOADED = re.compile(r"uploaded hash=([0-9a-f]{64}) remote=(\S+)")


def drop(d: Daemon, files: dict[str, bytes]) -> dict[str, str]:
    for name, data in files.items():
        tmp = d.root / f".{name}.part"
        tmp.write_bytes(data)
        os.rename(tmp, d.inbox / name)
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def test_two_nodes_share_one_catalog_and_send_each_pair_once(daemon_factory, postgres_url: str,
                                                              workdir: Path) -> None:
    shared = workdir / "shared"
    remotes = []
    for name in ("r0", "r1"):
        (shared / name).mkdir(parents=True)
        remotes.append({"name": name, "type": "directory", "path": str(shared / name)})
    nodes = []
    for name in ("n1", "n2"):
        root = workdir / name
        root.mkdir()
        d = daemon_factory(remotes=0, start=False, root=root, catalog=postgres_url, node=name,
                           upload={"redundancy": 2, "min_redundancy": 1}, cluster={"lease": "10s"})
        d.config["remotes"] = remotes
        d.config_path.write_text(yaml.safe_dump(d.config))
        nodes.append(d.start())
    n1, n2 = nodes

    only1 = drop(n1, {f"one{i}": os.urandom(700) for i in range(25)})
    only2 = drop(n2, {f"two{i}": os.urandom(700) for i in range(25)})
    same = {f"same{i}": os.urandom(900) for i in range(20)}
    both = drop(n1, same)
    drop(n2, same)
    every = {**only1, **only2, **both}

    def complete() -> bool:
        files = {f["hash"]: f for f in n2.files()}
        return len(files) == len(set(every.values())) and all(len(f["copies"]) == 2 for f in files.values())
    wait_for(complete, timeout=120, message="70 files, each with 2 copies, seen from either node")
    assert {f["hash"] for f in n1.files()} == set(every.values())  # one catalog: 70 entries, not 90

    # each (file, remote) pair sent once, by one node
    logs = n1.log() + n2.log()
    sends = collections.Counter(UPLOADED.findall(logs))
    assert len(sends) == 2 * len(set(every.values()))
    assert max(sends.values()) == 1, [pair for pair, n in sends.items() if n > 1][:5]
    for name in ("r0", "r1"):
        assert len([p for p in (shared / name).rglob("*") if p.is_file()]) == 70

    # a file dropped only on n1 is served by n2: fetched from a remote and verified
    h = only1["one3"]
    out = workdir / "from-n2.bin"
    result = n2.ctl("get", h, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == h
    assert n1.stop() == 0 and n2.stop() == 0


def test_a_killed_nodes_transfers_are_finished_by_another_node_after_its_lease(
        daemon_factory, postgres_url: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_remote_plowshare import FAKES, Locker, alive
    locker = Locker(workdir / "locker")
    locker.root.mkdir()
    monkeypatch.setenv("FAKE_PLOWSHARE_STORE", str(locker.root))
    locker.fail("plowup", hang=True, times=2)  # n1's two sends hang (then plowup works again)
    remote = {"name": "locker", "type": "plowshare", "host": "fakelocker", "bin_dir": FAKES}
    nodes = {}
    for name in ("n1", "n2"):
        root = workdir / name
        root.mkdir()
        d = daemon_factory(remotes=0, start=False, root=root, catalog=postgres_url, node=name,
                           upload={"redundancy": 1, "min_redundancy": 1, "concurrency": 4},
                           cluster={"lease": "5s"})
        d.config["remotes"] = [remote]
        d.config_path.write_text(yaml.safe_dump(d.config))
        nodes[name] = d
    n1, n2 = nodes["n1"].start(), nodes["n2"].start()
    try:
        files = {f"k{i}": os.urandom(2000) for i in range(2)}
        hashes = drop(n1, files)
        wait_for(lambda: len(locker.hang_pids()) == 4, timeout=30, message="n1's two plowups hanging")
        drop(n2, files)  # n2 holds the same bytes now, but n1's claims stand while n1 renews them
        wait_for(lambda: not any(n2.inbox.iterdir()) and len(n2.files()) == 2, message="n2 registered them")
        assert all(f["pending"] == ["locker"] and not f["copies"] for f in n2.files())
        n1.kill()  # SIGKILL in the middle of both transfers: nobody releases its claims

        def stored() -> bool:
            return all(len(f["copies"]) == 1 for f in n2.files())
        wait_for(stored, timeout=60, message="n2 finishing n1's transfers once n1's lease ran out")
        sent_by_n2 = {h for h, _ in UPLOADED.findall(n2.log())}
        assert sent_by_n2 == set(hashes.values())
        assert len(locker.files()) == 2
        assert n2.stop() == 0
    finally:
        for pid in locker.hang_pids():  # n1's plowups, orphaned by the SIGKILL
            if alive(pid):
                os.kill(pid, 9)
