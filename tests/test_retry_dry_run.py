"""`cloudmanagerctl retry --dry-run` counts what retry would requeue and moves nothing; `status`
says which pairs its byte figure counts (issue 15 items 5 and 6)."""

from __future__ import annotations

import hashlib
import json

from conftest import wait_for
from test_ctl_finish import break_remote


def test_retry_dry_run_counts_and_moves_nothing(daemon_factory) -> None:
    d = daemon_factory(start=False, remotes=3, upload={"redundancy": 3, "retry": {"initial": "1h", "max": "2h"}})
    break_remote(d, 1)
    break_remote(d, 2)
    d.start()
    data = b"two remotes are broken\n" * 10  # 230 B: human_size says bytes
    (d.inbox / "f.txt").write_bytes(data)
    h = hashlib.sha256(data).hexdigest()
    wait_for(lambda: d.status()["uploads"]["retrying"] == 2, message="the uploads to r1 and r2 waiting an hour")
    before = d.status()["uploads"]
    given_up, waiting = 0, 2

    for args in (("--all",), (h[:10],)):
        result = d.ctl("retry", "--dry-run", *args)
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode() == f"would requeue {given_up} given-up and {waiting} waiting pairs\n"
    out = json.loads(d.ctl("--json", "retry", "-n", "--all").stdout)
    assert out == {"requeued": 0, "would_requeue": 2, "given_up": given_up, "waiting": waiting, "dry_run": True}
    after = d.status()["uploads"]
    assert (after["failed"], after["retrying"], after["queued"]) == (before["failed"], before["retrying"], 0)
    info = json.loads(d.ctl("info", "--json", h).stdout)
    assert sorted((u["remote"], u["attempts"]) for u in info["uploads"]) == [("r1", 1), ("r2", 1)]

    # the status line says its byte figure is what the queued, active and retrying pairs hold
    line = next(x for x in d.ctl("status").stdout.decode().splitlines() if x.startswith("uploads"))
    assert f"({len(data) * waiting} B to send)" in line and "queued (" not in line, line

    # and the real retry moves what the dry run counted
    result = d.ctl("retry", "--all")
    assert result.stdout.decode() == f"requeued {given_up} given-up and {waiting} waiting pairs\n"
