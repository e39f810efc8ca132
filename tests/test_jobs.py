"""The job table: every job is scheduled as the table says, from the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudmanagerd import jobs
from cloudmanagerd.config import config_from_mapping


class RecordingScheduler:
    def __init__(self) -> None:
        self.added: dict[str, tuple] = {}

    def add_job(self, fn, trigger=None, seconds=None, id=None, next_run_time=None):  # noqa: A002 - APScheduler's name
        self.added[id] = (fn, trigger, seconds, next_run_time is not None)


def test_every_job_is_scheduled_with_its_interval_from_the_config(tmp_path: Path):
    config = config_from_mapping({"inbox": str(tmp_path / "in"), "cache": {"path": str(tmp_path / "c"),
                                  "capacity": "1MiB"}, "ingest": {"rescan": "7m"}, "cluster": {"lease": "10s"}},
                                 base_dir=str(tmp_path), environ={}, hostname="n1")
    calls: list[str] = []
    handlers = {job.id: (lambda name=job.id: calls.append(name)) for job in jobs.TABLE}
    guarded: list[str] = []

    def guard(fn):
        guarded.append(fn)
        return fn

    s = RecordingScheduler()
    jobs.schedule(s, jobs.TABLE, handlers, config, guard)
    assert set(s.added) == {job.id for job in jobs.TABLE}
    assert s.added["rescan"][1:] == ("interval", 420.0, False)
    assert s.added["reclaim"][2] == 5.0  # half the lease
    assert s.added["pump"][3] and s.added["heal"][3] and not s.added["scrub"][3]
    assert s.added["resume-removals"][1:3] == (None, None)  # once, at start
    s.added["heal"][0]()
    assert calls == ["heal"]
    assert len(guarded) == sum(job.guarded for job in jobs.TABLE)


def test_a_job_without_a_handler_is_a_programming_error_caught_at_start(tmp_path: Path):
    config = config_from_mapping({"inbox": str(tmp_path / "in"), "cache": {"path": str(tmp_path / "c"), "capacity": 1}},
                                 base_dir=str(tmp_path), environ={}, hostname="n1")
    with pytest.raises(ValueError, match="no handler for job"):
        jobs.schedule(RecordingScheduler(), jobs.TABLE, {}, config, lambda fn: fn)
