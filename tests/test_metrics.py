"""Prometheus metrics: the endpoint of a real daemon, the textfile, `cloudmanagerctl metrics`, the config."""

from __future__ import annotations

import os
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloudmanagerd.config import ConfigError, config_from_mapping
from cloudmanagerd.errors import StartupError
from cloudmanagerd.metrics import Metrics
from conftest import default_config, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition text: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        return reply.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return parse(scrape_text(port))


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


# -- the Metrics part on its own (a fixed status) ---------------------------------------------------

def fake_status() -> dict[str, Any]:
    return {"node": "n1", "problems": [], "catalog": {"files": 3, "bytes": 300},
            "cache": {"files": 2, "used": 200, "capacity": 1000},
            "inbox": {"pending": 1, "rejected": 0}, "uploads": {"queued_bytes": 20},
            "remotes": [{"name": "r0", "healthy": True, "copies": 3, "errors": 1}],
            "safety": {"below_min": 0, "below_min_bytes": 0, "below_redundancy": 1, "oldest_below_min": None},
            "transfer": {"total_outgoing": 300, "total_incoming": 0}}


def fake_figures() -> dict[str, Any]:
    return {"uploads": {("r0", "queued"): 2}, "cache_unverified": 0, "cache_oldest_verified": 1000.0}


def part(**kwargs: Any) -> Metrics:
    return Metrics(status=fake_status, figures=fake_figures, pending_age=lambda: 4.0,
                   remote_names=lambda: ["r0", "r1"], **kwargs)


def test_the_text_has_the_figures_with_bounded_labels() -> None:
    m = part()
    m.registered(["a" * 64], [time.time() - 2.5])
    m.uploaded("a" * 64, "r0", 1000, 0.2)
    samples = parse(m.text())
    assert value(samples, "cloudmanagerd_files", state="evicted") == 1
    assert value(samples, "cloudmanagerd_uploads", remote="r0", state="queued") == 2
    assert value(samples, "cloudmanagerd_uploads", remote="r1", state="queued") == 0
    assert value(samples, "cloudmanagerd_inbox_oldest_pending_seconds") == 4.0
    assert value(samples, "cloudmanagerd_ingest_latency_seconds_count") == 1
    assert value(samples, "cloudmanagerd_ingest_latency_seconds_bucket", le="3.0") == 1
    assert value(samples, "cloudmanagerd_ingest_latency_seconds_bucket", le="2.0") == 0
    assert value(samples, "cloudmanagerd_upload_size_bytes_sum", remote="r0") == 1000
    assert value(samples, "cloudmanagerd_scrub_last_full_pass_timestamp_seconds") == 1000.0
    assert ("cloudmanagerd_remote_last_success_timestamp_seconds", (("remote", "r1"),)) not in samples
    m.forget_remotes(["r1"])  # a reload removed r0
    assert not [name for name, labels in parse(m.text()) if ("remote", "r0") in labels
                and name.startswith(("cloudmanagerd_upload_", "cloudmanagerd_remote_last"))]
    assert any(name == "process_resident_memory_bytes" for name, _ in samples)
    for name, labels in samples:
        for key, label in labels:
            assert len(label) < 64, (name, key, label)  # never a hash


def test_costly_figures_are_counted_again_only_after_twenty_times_their_cost() -> None:
    from cloudmanagerd.metrics import _Spaced

    clock = [100.0]
    calls = []

    def figures() -> dict[str, Any]:
        calls.append(clock[0])
        clock[0] += 0.5  # the count takes 0.5 s
        return {"n": len(calls)}

    spaced = _Spaced(figures, share=0.05, clock=lambda: clock[0])
    assert spaced() == {"n": 1}
    clock[0] += 9.0  # 9 s after: reused
    assert spaced() == {"n": 1}
    clock[0] += 1.0  # 10 s after the count ended: counted again
    assert spaced() == {"n": 2} and len(calls) == 2


def test_the_textfile_is_replaced_whole_and_parses(tmp_path: Path) -> None:
    path = tmp_path / "cloudmanagerd.prom"
    m = part(textfile=str(path))
    path.write_text("old\n")
    inode = path.stat().st_ino
    m.write_textfile()
    assert path.stat().st_ino != inode  # a new file renamed over the old one: never half written
    assert value(parse(path.read_text()), "cloudmanagerd_cache_capacity_bytes") == 1000
    assert sorted(os.listdir(tmp_path)) == ["cloudmanagerd.prom"]  # no temp file left


def test_an_unwritable_textfile_is_one_warning_and_no_crash(tmp_path: Path, caplog) -> None:
    m = part(textfile=str(tmp_path / "missing-folder" / "x.prom"))
    m.write_textfile()
    m.write_textfile()
    lines = [r.getMessage() for r in caplog.records if "metrics.textfile" in r.getMessage()]
    assert len(lines) == 1 and "missing-folder" in lines[0] and "cannot write it" in lines[0]
    assert "its folder does not exist (create it first)" in lines[0]


def test_a_full_disk_says_so_and_keeps_the_old_textfile(tmp_path: Path, caplog, monkeypatch) -> None:
    """The advice must fit the error: "fix the folder or its permissions" was said for a full disk too."""
    import errno

    path = tmp_path / "m.prom"
    path.write_text("old\n")
    m = part(textfile=str(path))

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    m.write_textfile()
    monkeypatch.undo()
    line, = [r.getMessage() for r in caplog.records if "metrics.textfile" in r.getMessage()]
    assert "cannot write it: no space left on the device (free some space on it)" in line
    assert "permissions" not in line
    assert path.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["m.prom"]


def test_a_status_that_cannot_be_read_is_a_series_not_a_traceback(caplog, capsys) -> None:
    def broken() -> dict[str, Any]:
        raise sqlite3.OperationalError("database is locked")

    m = Metrics(status=broken, figures=fake_figures, pending_age=lambda: 0.0, remote_names=lambda: [],
                listen=("127.0.0.1", free_port()))
    m.start()
    try:
        samples = scrape(m.address[1])
    finally:
        m.stop()
    assert value(samples, "cloudmanagerd_scrape_error") == 1
    assert any(name == "process_resident_memory_bytes" for name, _ in samples)
    assert not any(name.startswith("cloudmanagerd_files") for name, _ in samples)
    assert "metrics: cannot read the status: database is locked" in caplog.text
    assert "Traceback" not in caplog.text
    assert value(parse(part().text()), "cloudmanagerd_scrape_error") == 0

    def wrong() -> dict[str, Any]:
        return {"node": "n1"}  # a collector bug (a missing key): a 500 and one line, no traceback

    m = Metrics(status=wrong, figures=fake_figures, pending_age=lambda: 0.0, remote_names=lambda: [],
                listen=("127.0.0.1", free_port()))
    m.start()
    try:
        with pytest.raises(urllib.error.HTTPError, match="500"):
            scrape(m.address[1])
    finally:
        m.stop()
    assert "metrics: a scrape failed: KeyError" in caplog.text and "Traceback" not in caplog.text
    assert "Traceback" not in capsys.readouterr().err


def test_a_name_filter_in_the_query_never_hides_the_series() -> None:
    m = part(listen=("127.0.0.1", free_port()))
    m.start()
    try:
        url = f"http://127.0.0.1:{m.address[1]}/metrics?name[]=cloudmanagerd_files"
        with urllib.request.urlopen(url, timeout=10) as reply:
            samples = parse(reply.read().decode())
    finally:
        m.stop()
    assert value(samples, "cloudmanagerd_files", state="cached") == 2


def test_a_port_in_use_is_a_startup_error_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=rf"metrics.listen 127.0.0.1:{port}: .*another program"):
            part(listen=("127.0.0.1", port)).start()


def test_a_silent_client_neither_blocks_scrapes_forever_nor_the_stop() -> None:
    m = part(listen=("127.0.0.1", free_port()))
    m.start()
    try:
        port = m.address[1]
        with socket.create_connection(("127.0.0.1", port)) as silent:
            silent.sendall(b"GET /metr")  # and then nothing
            started = time.monotonic()
            assert value(scrape(port), "cloudmanagerd_cache_used_bytes") == 200  # served after the timeout
            assert time.monotonic() - started < 8
            with socket.create_connection(("127.0.0.1", port)) as second:
                second.sendall(b"GET /")
                time.sleep(0.2)  # let the server take this connection: the stop must cut it off
                started = time.monotonic()
                m.stop()
                assert time.monotonic() - started < 3
    finally:
        m.stop()
    # the autouse no_leaks fixture fails the test if the metrics-http thread or a socket is left


def test_a_client_trickling_its_headers_cannot_hold_the_endpoint() -> None:
    """Slowloris: a header line every second never lets the per-read timeout fire; the connection's
    whole request still gets CLIENT_TIMEOUT, so a real scrape waiting behind it is served."""
    import select

    from cloudmanagerd.metrics import CLIENT_TIMEOUT

    m = part(listen=("127.0.0.1", free_port()))
    m.start()
    try:
        port = m.address[1]
        with socket.create_connection(("127.0.0.1", port)) as slow, \
                socket.create_connection(("127.0.0.1", port)) as scraper:
            slow.sendall(b"GET /metrics HTTP/1.1\r\n")
            time.sleep(0.2)  # the server takes the slow client first
            scraper.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            started = time.monotonic()
            reply = b""
            while time.monotonic() - started < 3 * CLIENT_TIMEOUT:
                try:
                    slow.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass  # cut off: what the fix does
                if select.select([scraper], [], [], 1.0)[0]:
                    reply = scraper.recv(65536)
                    break
            assert reply.startswith(b"HTTP/1.0 200"), "the scrape waited behind a trickling client"
            assert time.monotonic() - started < CLIENT_TIMEOUT + 3
    finally:
        m.stop()


# -- the config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("metrics, message", [
    ({"listen": "localhost"}, "metrics.listen: expected an address like 127.0.0.1:9464"),
    ({"listen": "127.0.0.1:70000"}, "metrics.listen: the port must be 1 to 65535"),
    ({"listen": 9464}, "metrics.listen: expected an address"),
    ({"textfile": "/var/lib/node_exporter/cm.txt"}, "metrics.textfile: node_exporter's textfile collector "
                                                    "reads only files named *.prom"),
    ({"lisen": "127.0.0.1:9464"}, "metrics.lisen: unknown key (did you mean listen?)"),
])
def test_bad_metrics_config_is_one_clear_line(tmp_path: Path, metrics: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(default_config(tmp_path, metrics=metrics), base_dir=str(tmp_path))
    assert [e for e in info.value.errors if e.startswith(message)], info.value.errors


def test_a_textfile_in_the_inbox_or_cache_is_refused(tmp_path: Path) -> None:
    """The daemon would ingest its own metrics every 15 s (a new file each time, uploaded for ever)."""
    for folder in ("inbox", "cache"):
        config = default_config(tmp_path, metrics={"textfile": str(tmp_path / folder / "sub" / "m.prom")})
        with pytest.raises(ConfigError) as info:
            config_from_mapping(config, base_dir=str(tmp_path))
        assert [e for e in info.value.errors if e.startswith("metrics.textfile: must be outside the inbox")], \
            info.value.errors


def test_metrics_are_off_by_default_and_parse(tmp_path: Path) -> None:
    assert config_from_mapping(default_config(tmp_path), base_dir=str(tmp_path)).metrics.listen is None
    c = config_from_mapping(default_config(tmp_path, metrics={"listen": "[::1]:9464", "textfile": "m.prom"}),
                            base_dir=str(tmp_path))
    assert c.metrics.listen == ("::1", 9464) and c.metrics.textfile == str(tmp_path / "m.prom")


# -- a real daemon ---------------------------------------------------------------------------------

def test_a_real_daemon_scraped_while_files_arrive_and_upload(daemon_factory, workdir: Path) -> None:
    port = free_port()
    textfile = workdir / "textfile" / "cloudmanagerd.prom"
    textfile.parent.mkdir()
    d = daemon_factory(metrics={"listen": f"127.0.0.1:{port}", "textfile": str(textfile)},
                       upload={"redundancy": 2, "min_redundancy": 2})
    before = scrape(port)
    assert value(before, "cloudmanagerd_files", state="cached") == 0
    assert value(before, "cloudmanagerd_remote_healthy", remote="r0") == 1
    wait_for(textfile.exists, message="the textfile")
    assert value(parse(textfile.read_text()), "cloudmanagerd_cache_capacity_bytes") == 1 << 30

    for i in range(20):
        (d.inbox / f"f{i}").write_bytes(os.urandom(1000 + i))
    def all_safe() -> bool:
        status = d.status()  # one status: two could see 19 files safe, then 20 files
        return status["safety"]["below_min"] == 0 and status["catalog"]["files"] == 20
    wait_for(all_safe, timeout=30, message="20 files safe")
    after = scrape(port)
    status = d.status()
    assert value(after, "cloudmanagerd_files", state="cached") == status["cache"]["files"] == 20
    assert value(after, "cloudmanagerd_cache_used_bytes") == status["cache"]["used"]
    assert value(after, "cloudmanagerd_files_below_min_redundancy") == 0
    assert value(after, "cloudmanagerd_ingest_latency_seconds_count") == 20
    for remote in ("r0", "r1"):
        assert value(after, "cloudmanagerd_upload_duration_seconds_count", remote=remote) == 20
        assert value(after, "cloudmanagerd_remote_copies", remote=remote) == 20
        assert value(after, "cloudmanagerd_uploads", remote=remote, state="queued") == 0
        assert value(after, "cloudmanagerd_remote_last_success_timestamp_seconds", remote=remote) > time.time() - 60
    assert value(after, "cloudmanagerd_transfer_bytes_total", direction="outgoing") == 2 * status["catalog"]["bytes"]
    # incoming counts the files taken in from the inbox too (no remote was read): the help must say so
    assert value(after, "cloudmanagerd_transfer_bytes_total", direction="incoming") == status["catalog"]["bytes"]
    assert "# HELP cloudmanagerd_transfer_bytes_total bytes that entered this node (incoming: files taken in" \
        in scrape_text(port)

    ctl = d.ctl("metrics")
    assert ctl.returncode == 0, ctl.stderr
    from_ctl = parse(ctl.stdout.decode())
    assert value(from_ctl, "cloudmanagerd_files", state="cached") == 20
    assert {name for name, _ in from_ctl} == {name for name, _ in after}
    assert d.stop() == 0
    with pytest.raises(OSError):
        scrape(port)  # the endpoint went with the daemon


def test_a_dead_remote_shows_in_the_metrics(daemon_factory, workdir: Path) -> None:
    port = free_port()
    d = daemon_factory(metrics={"listen": f"127.0.0.1:{port}"}, upload={"retry": {"initial": "30s"}})
    broken = Path(d.config["remotes"][1]["path"])
    broken.rename(broken.with_name("gone"))
    (d.inbox / "one").write_bytes(b"x" * 100)
    wait_for(lambda: value(scrape(port), "cloudmanagerd_remote_healthy", remote="r1") == 0, timeout=30,
             message="r1 reported down")
    samples = scrape(port)
    assert value(samples, "cloudmanagerd_remote_healthy", remote="r0") == 1
    assert value(samples, "cloudmanagerd_uploads", remote="r1", state="retrying") == 1
    assert value(samples, "cloudmanagerd_problems") >= 1
    assert d.stop() == 0


def test_files_waiting_for_room_age_in_the_oldest_pending(daemon_factory) -> None:
    """inbox_pending_files counts the files waiting for room in the cache; the oldest pending age must
    count them too, or a cache full for hours reads 0 s on the dashboard and never fires an alert."""
    port = free_port()
    d = daemon_factory(remotes=1, metrics={"listen": f"127.0.0.1:{port}"}, cache={"capacity": 10_000},
                       upload={"redundancy": 1, "min_redundancy": 1})
    remote = Path(d.config["remotes"][0]["path"])
    remote.rename(remote.with_name("gone"))  # no copy can be made, so nothing can leave the cache
    (d.inbox / "big").write_bytes(b"a" * 8000)
    wait_for(lambda: d.status()["catalog"]["files"] == 1, message="big registered")
    (d.inbox / "waits").write_bytes(b"b" * 5000)
    wait_for(lambda: "cache full" in " ".join(d.status()["problems"]), message="waits for room")
    wait_for(lambda: value(scrape(port), "cloudmanagerd_inbox_oldest_pending_seconds") >= 2, timeout=10,
             message="the waiting file's age in cloudmanagerd_inbox_oldest_pending_seconds")
    assert value(scrape(port), "cloudmanagerd_inbox_pending_files") == 1
    assert d.stop() == 0


def test_a_reload_keeps_the_endpoint_and_names_the_restart(daemon_factory) -> None:
    port, other = free_port(), free_port()
    d = daemon_factory(metrics={"listen": f"127.0.0.1:{port}"})
    d.config["metrics"] = {"listen": f"127.0.0.1:{other}", "textfile": "/nonexistent/x.prom"}
    d.config_path.write_text(__import__("yaml").safe_dump(d.config))
    assert d.ctl("reload").returncode == 0
    assert "metrics.listen, metrics.textfile changed; restart cloudmanagerd to apply them" in d.log()
    assert value(scrape(port), "cloudmanagerd_scrape_error") == 0  # the running endpoint stays
    assert d.stop() == 0


def test_stuck_scrapers_neither_wedge_the_daemon_nor_hold_up_its_stop(daemon_factory) -> None:
    port = free_port()
    d = daemon_factory(metrics={"listen": f"127.0.0.1:{port}"})
    stuck = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]  # the listen backlog is 5
    try:
        for s in stuck:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        (d.inbox / "during").write_bytes(b"z" * 321)
        wait_for(lambda: d.status()["catalog"]["files"] == 1, message="ingest while scrapers hang")
        started = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - started < 10
    finally:
        for s in stuck:
            s.close()


def test_a_port_in_use_stops_the_daemon_with_one_line(daemon_factory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = daemon_factory(start=False, metrics={"listen": f"127.0.0.1:{port}"})
        d.start(wait=False)
        assert d.proc.wait(30) == 1
        d._close_log()
    log = d.log()
    assert f"metrics.listen 127.0.0.1:{port}: cannot listen: Address already in use" in log
    assert "Traceback" not in log


# -- the Grafana dashboard ---------------------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parents[1] / "etc" / "grafana-dashboard.json"
PROMQL_WORDS = {  # functions, aggregations and keywords: what an identifier in PromQL may be besides a metric
    "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "time", "vector",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "label_values", "topk", "bottomk", "abs", "clamp_min", "delta", "deriv", "changes", "resets"}


def dashboard_queries() -> list[str]:
    import json
    board = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in board["panels"]:
        queries += [t["expr"] for t in panel.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            queries.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return queries


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers, ranges,
    grouping clauses, Grafana variables, numbers and PromQL's own words are taken out."""
    import re
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r",\s*instance\)", ")", expr)  # label_values(metric, label)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return words - PROMQL_WORDS


def test_every_dashboard_query_names_only_metrics_a_real_daemon_exports(daemon_factory) -> None:
    port = free_port()
    d = daemon_factory(metrics={"listen": f"127.0.0.1:{port}"})
    (d.inbox / "one").write_bytes(b"y" * 5000)
    wait_for(lambda: d.status()["uploads"]["copies"] == 2, message="two copies")
    assert ("cloudmanagerd_scrub_last_full_pass_timestamp_seconds", ()) not in scrape(port)  # none yet
    assert d.ctl("verify").returncode == 0  # a full pass over the cache
    exported = {name for name, _ in scrape(port)}
    queries = dashboard_queries()
    assert len(queries) > 30
    unknown = {}
    for expr in queries:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        if names - exported:
            unknown[expr] = sorted(names - exported)
    assert not unknown, unknown
    assert metric_names('sum by (le) (rate(cloudmanagerd_nope_bucket{x="a"}[5m]))') == {"cloudmanagerd_nope_bucket"}
    assert d.stop() == 0
