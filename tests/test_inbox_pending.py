"""`status`'s inbox pending count is never wrong for long (issue 15 item 6): a file that waits in
the inbox (for cache room, too large, held open by a writer) and is deleted from it leaves the
count, and the problem that named it, within seconds."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import wait_for

from cloudmanagerd.inbox import PendingQueue


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_deleted_busy_file_leaves_the_queue_before_its_next_look() -> None:
    present = {b"busy", b"soon"}
    looked: list[bytes] = []

    def stat_rel(rel: bytes):
        looked.append(rel)
        return os.stat("/") if rel in present else None

    clock = Clock()
    queue = PendingQueue(1.0, stat_rel, monotonic=clock, wall=clock)
    queue.put_later(b"busy", 60.0)  # a writer holds it open: looked at again in a minute
    queue.put_settle(b"soon")       # due at once: the settle check's business, not the prune's
    assert queue.prune_gone() == 0 and len(queue) == 2
    present.clear()
    looked.clear()
    assert queue.prune_gone() == 1
    assert looked == [b"busy"]
    assert len(queue) == 1 and queue.oldest_age() == 0.0


def test_a_deleted_waiting_file_leaves_status_within_seconds(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(cache={"capacity": "1MiB"})
    big = d.inbox / "too-big.iso"
    big.write_bytes(os.urandom(2 << 20))
    wait_for(lambda: d.status()["inbox"]["pending"] == 1 and any("too-big.iso" in p for p in d.status()["problems"]),
             timeout=15, message="the too-large file waiting, and said")
    big.unlink()
    wait_for(lambda: d.status()["inbox"]["pending"] == 0, timeout=5, message="the deleted file out of the count")
    assert not any("too-big.iso" in p for p in d.status()["problems"])
    assert "waiting in the inbox are gone from it" in d.log()
