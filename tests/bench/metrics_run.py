"""A real run seen through the Prometheus endpoint (issue 15): the picture in the README (docs/metrics.png).

A fresh `python -m cloudmanagerd` with two folder remotes (redundancy 2, min_redundancy 1, log level
info), a cache smaller than what is dropped (so that it fills and eviction shows), and
`metrics.listen` on a free loopback port. Files (default 3,000 x 32 KiB, random content) are written
and `sync`ed in a staging folder, then renamed into the inbox in waves (what `mv` does on one
filesystem); /metrics is scraped every 0.5 s from the first rename until every file has its two
copies (and a few seconds more). The scrapes are plotted with matplotlib: ingest rate, the upload
queue per remote, cache use against capacity, files below min_redundancy.

    .venv/bin/python tests/bench/metrics_run.py                       # about a minute here
    .venv/bin/python tests/bench/metrics_run.py --files 500 --png /tmp/m.png --json /tmp/m.json

It also reports what a scrape costs while the daemon works (p50/p99/max seconds per scrape).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml
from benchlib import REPO, InboxDaemon, human_bytes, parse_size, say
from prometheus_client.parser import text_string_to_metric_families

SERIES = {  # what is kept of each scrape: (metric, labels) -> key in the JSON
    "ingested": ("cloudmanagerd_ingest_latency_seconds_count", {}),
    "cache_used": ("cloudmanagerd_cache_used_bytes", {}),
    "cache_capacity": ("cloudmanagerd_cache_capacity_bytes", {}),
    "below_min": ("cloudmanagerd_files_below_min_redundancy", {}),
    "pending": ("cloudmanagerd_inbox_pending_files", {}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> tuple[float, dict[str, float]]:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    spent = time.monotonic() - started
    point: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            for key, (name, labels) in SERIES.items():
                if s.name == name and s.labels == labels:
                    point[key] = s.value
            if s.name == "cloudmanagerd_uploads" and s.labels["state"] in ("queued", "active", "retrying"):
                key = f"uploads:{s.labels['remote']}"
                point[key] = point.get(key, 0) + s.value
    return spent, point


def drop(staging: Path, inbox: Path, names: list[str], waves: int, pause: float) -> None:
    per_wave = -(-len(names) // waves)
    for i in range(0, len(names), per_wave):
        for name in names[i:i + per_wave]:
            os.rename(staging / name, inbox / name)
        time.sleep(pause)


def plot(points: list[dict[str, float]], out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p["t"] for p in points]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    rate = [0.0] + [(b.get("ingested", 0) - a.get("ingested", 0)) / max(b["t"] - a["t"], 1e-9)
                    for a, b in zip(points, points[1:])]
    axes[0].plot(t, rate, color="tab:blue")
    axes[0].set_ylabel("files/s")
    axes[0].set_title("ingest rate  rate(cloudmanagerd_ingest_latency_seconds_count)", fontsize=9)
    remotes = sorted({k for p in points for k in p if k.startswith("uploads:")})
    for key in remotes:
        axes[1].plot(t, [p.get(key, 0) for p in points], label=key.split(":", 1)[1])
    axes[1].set_ylabel("pairs")
    axes[1].set_title("upload queue  sum by (remote) (cloudmanagerd_uploads{state!=\"failed\"})", fontsize=9)
    axes[1].legend(fontsize=8)
    axes[2].plot(t, [p.get("cache_used", 0) / 2**20 for p in points], label="used")
    axes[2].plot(t, [p.get("cache_capacity", 0) / 2**20 for p in points], "--", label="capacity")
    axes[2].set_ylabel("MiB")
    axes[2].set_title("cache  cloudmanagerd_cache_used_bytes, cloudmanagerd_cache_capacity_bytes", fontsize=9)
    axes[2].legend(fontsize=8)
    axes[3].plot(t, [p.get("below_min", 0) for p in points], color="tab:red", label="below min_redundancy")
    axes[3].plot(t, [p.get("pending", 0) for p in points], color="tab:gray", label="inbox pending")
    axes[3].set_ylabel("files")
    axes[3].set_title("cloudmanagerd_files_below_min_redundancy, cloudmanagerd_inbox_pending_files", fontsize=9)
    axes[3].legend(fontsize=8)
    axes[3].set_xlabel("seconds since the first drop (one scrape every 0.5 s)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=3000)
    p.add_argument("--size", type=parse_size, default=parse_size("32KiB"))
    p.add_argument("--capacity", type=parse_size, default=None,
                   help="cache.capacity (default: half of what is dropped)")
    p.add_argument("--waves", type=int, default=6, help="drop the files in this many waves")
    p.add_argument("--pause", type=float, default=2.0, help="seconds between waves")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between scrapes")
    p.add_argument("--png", type=Path, default=REPO / "docs" / "metrics.png")
    p.add_argument("--json", type=Path, help="write the scrapes here")
    args = p.parse_args()
    capacity = args.capacity or args.files * args.size // 2
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cm-metrics-", dir="/tmp") as tmp:
        root = Path(tmp)
        remotes = []
        for name in ("r0", "r1"):
            (root / name).mkdir()
            remotes.append({"name": name, "type": "directory", "path": str(root / name)})
        d = InboxDaemon(root, "d", remotes, "info", metrics={"listen": f"127.0.0.1:{port}"},
                        upload={"redundancy": 2, "min_redundancy": 1})
        d.config["cache"]["capacity"] = capacity
        d.config_path.write_text(yaml.safe_dump(d.config))
        staging = root / "staging"
        staging.mkdir()
        names = [f"f{i:05d}" for i in range(args.files)]
        for name in names:
            (staging / name).write_bytes(os.urandom(args.size))
        os.sync()
        say(f"{args.files} x {human_bytes(args.size)} staged; cache {human_bytes(capacity)}; "
            f"metrics on 127.0.0.1:{port}")
        d.start()
        points: list[dict[str, float]] = []
        costs: list[float] = []
        try:
            dropper = threading.Thread(target=drop, args=(staging, d.inbox, names, args.waves, args.pause))
            t0 = time.monotonic()
            dropper.start()
            done_at = None
            while True:
                cost, point = scrape(port)
                point["t"] = time.monotonic() - t0
                points.append(point)
                costs.append(cost)
                uploads = sum(v for k, v in point.items() if k.startswith("uploads:"))
                if (done_at is None and not dropper.is_alive() and point.get("ingested") == args.files
                        and uploads == 0 and point.get("below_min") == 0):
                    done_at = point["t"]
                if done_at is not None and point["t"] > done_at + 3:
                    break
                if point["t"] > 600:
                    say("gave up after 600 s")
                    break
                time.sleep(max(args.interval - cost, 0))
            dropper.join()
        finally:
            d.stop()
        costs.sort()
        summary = {"files": args.files, "size": args.size, "capacity": capacity, "all_safe_seconds": done_at,
                   "scrapes": len(costs), "scrape_p50": statistics.median(costs),
                   "scrape_p99": costs[int(0.99 * (len(costs) - 1))], "scrape_max": costs[-1],
                   "peak_ingest_rate": max((b.get("ingested", 0) - a.get("ingested", 0)) / (b["t"] - a["t"])
                                           for a, b in zip(points, points[1:])),
                   "load": os.getloadavg()[0]}
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps({"summary": summary, "points": points}))
        try:
            plot(points, args.png, f"cloudmanagerd: {args.files} x {human_bytes(args.size)} dropped in "
                 f"{args.waves} waves, 2 folder remotes, cache {human_bytes(capacity)} "
                 f"(load {summary['load']:.1f} on {os.cpu_count()} CPUs)")
        except ImportError:
            say("matplotlib is not installed (make bench installs it): no picture")
            return 0
        say(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
