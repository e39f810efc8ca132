#!/usr/bin/env python3
"""One benchmark report (issue 12): every benchmark side by side with its peer, in one run.

    make bench                                      # the full run (long: see tests/bench/README.md)
    .venv/bin/python tests/bench/report.py --quick  # small sizes, for development (about 2 minutes)
    .venv/bin/python tests/bench/report.py --only ingest,safe --no-write

Runs the scripts in this folder one after the other as subprocesses, each with `--json FILE`:

  ingest   ingest_bench.py --remote: mv and cp drops, git annex add, rclone copy, 1 GiB vs openssl,
           drop-to-registered latency while a 10,000-file upload runs (daemon with one folder remote)
  safe     safe_bench.py: registered and safe vs rclone copy and rclone copy && sync (one folder remote)
  upload   upload_bench.py --concurrency 4: to SeaweedFS S3 vs rclone copy (--transfers 4 and 16)
  get      get_bench.py --only dir,s3: get of an evicted file vs rclone copy and dd conv=fsync
  status   status_bench.py: status p99 with 1,000,000 files in a fabricated catalog

Every daemon runs with its remotes on and default concurrency. Then it prints one table, ratios
first, each row with the issue's target and PASS/MISS, and (unless --no-write) writes the same
figures to docs/benchmarks.md and a chart to docs/benchmarks.png (matplotlib, installed by
`make bench`). Each script's own report is kept in docs/benchmarks.md, below the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import REPO, say

HERE = Path(__file__).resolve().parent
BENCHES = ["ingest", "safe", "upload", "get", "status"]
SHARED_NOTE = "2 CPU cores shared with other engineers' test runs: figures vary from run to run"


def commands(quick: bool, tmp: str) -> dict[str, list[str]]:
    """Each bench's command line (without --json), full or --quick."""
    t = ["--tmp", tmp]
    if quick:
        return {
            "ingest": ["ingest_bench.py", "--remote", "--quick", "--files", "500", "--big-repeat", "1",
                       "--latency-count", "50", "--latency-load", "3000",
                       "--only", "mv,cp,annex,rclone-copy,big,latency", *t],
            "safe": ["safe_bench.py", "--quick", "--files", "500", *t],
            "upload": ["upload_bench.py", "--quick", "--files", "100", "--big-size", "64MiB",
                       "--concurrency", "4", "--rclone-transfers", "4,16", *t],
            "get": ["get_bench.py", "--quick", "--only", "dir,s3", *t],
            "status": ["status_bench.py", "--files", "50000", "--calls", "200", "--interval", "5",
                       "--ctl-runs", "3", "--reuse", *t],
        }
    return {
        "ingest": ["ingest_bench.py", "--remote", "--only", "mv,cp,annex,rclone-copy,big,latency", *t],
        "safe": ["safe_bench.py", *t],
        "upload": ["upload_bench.py", "--concurrency", "4", "--rclone-transfers", "4,16", *t],
        "get": ["get_bench.py", "--only", "dir,s3", *t],
        "status": ["status_bench.py", "--reuse", *t],
    }


def run_bench(name: str, cmd: list[str], out_dir: Path) -> tuple[dict[str, Any] | None, str, float, str]:
    """Run one script; (its JSON figures or None, its printed report, seconds, error text)."""
    js = out_dir / f"{name}.json"
    full = [sys.executable, str(HERE / cmd[0]), *cmd[1:], "--json", str(js)]
    say(f"{name}: {' '.join(cmd)}", tag="report")
    t0 = time.monotonic()
    proc = subprocess.run(full, cwd=REPO, stdout=subprocess.PIPE, text=True)  # stderr: progress, shown as is
    seconds = time.monotonic() - t0
    text = proc.stdout.strip()
    error = "" if proc.returncode == 0 else f"exit code {proc.returncode}"
    figures = None
    if js.exists():
        figures = json.loads(js.read_text())
    elif not error:
        error = "no figures written"
    say(f"{name}: done in {seconds:.0f} s{'; ' + error if error else ''}", tag="report")
    return figures, text, seconds, error


# -- the rows -----------------------------------------------------------------------------------

@dataclass
class Row:
    figure: str
    ours: float | None      # seconds, ms or MB (see unit)
    peer: float | None      # the peer's seconds, or the absolute target
    peer_label: str         # "rclone copy", or "" for an absolute target
    goal: float | None      # the ratio that passes (peer rows: peer/ours >= goal; absolute: ours <= peer);
    #                         None: reported without a target
    unit: str = "s"
    source: str = ""
    note: str = ""

    @property
    def absolute(self) -> bool:
        return not self.peer_label

    @property
    def ratio(self) -> float | None:
        """Peer rows: the peer's time over ours (higher is better); absolute rows: target over measured."""
        if self.ours is None or self.peer is None or self.ours <= 0:
            return None
        return self.peer / self.ours

    @property
    def verdict(self) -> str:
        r = self.ratio
        return "n/a" if r is None else "info" if self.goal is None else "PASS" if r >= self.goal else "MISS"

    @property
    def score(self) -> float | None:
        """The ratio over its goal: >= 1 passes (the chart's bar)."""
        r = self.ratio
        return None if r is None or self.goal is None else r / self.goal

    def target_text(self) -> str:
        if self.absolute:
            return f"<= {self.peer:g} {self.unit}"
        return "—" if self.goal is None else f">= {self.goal:g}x"

    def cells(self) -> list[str]:
        r = self.ratio
        ours = "—" if self.ours is None else f"{self.ours:,.3g} {self.unit}" if self.unit != "s" else f"{self.ours:.2f} s"
        if self.absolute:
            peer = "(target)"
        else:
            peer = "—" if self.peer is None else f"{self.peer:.2f} s {self.peer_label}"
        return ["—" if r is None else f"{r:.2f}x", self.target_text(), self.verdict, self.figure, ours, peer,
                self.source + (f"; {self.note}" if self.note else "")]


HEADER = ["ratio", "target", "result", "figure", "cloudmanagerd", "peer", "from / notes"]


def best(values: list[float] | None) -> float | None:
    return min(values) if values else None


def build_rows(f: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    ing, safe, up, get, st = (f.get(k) for k in BENCHES)
    if ing:
        n, sz = ing["files"], ing["file_size"] // 1024
        sec = ing["seconds"]
        for drop in ("mv", "cp"):
            rows.append(Row(f"{n:,} x {sz} KiB registered, {drop} drop", sec.get(drop), sec.get("annex"),
                            "git annex add", 20, source="ingest_bench --remote"))
        rows.append(Row(f"{n:,} x {sz} KiB registered, cp drop", sec.get("cp"), sec.get("rclone-copy"),
                        "rclone copy", 1, source="ingest_bench --remote"))
    if safe:
        runs = safe["runs"]
        n, sz = safe["args"]["files"], safe["args"]["file_size"] // 1024
        rows.append(Row(f"{n:,} x {sz} KiB registered, mv drop", best(runs.get("registered")), best(runs.get("rclone copy")),
                        "rclone copy", 1, source="safe_bench"))
        rows.append(Row(f"{n:,} x {sz} KiB safe (a durable copy on the remote)", best(runs.get("safe")),
                        best(runs.get("rclone copy && sync")), "rclone copy && sync", 1, source="safe_bench",
                        note="best of interleaved runs"))
    if ing and ing["big_ingest_runs"]:
        rows.append(Row(f"{ing['big_size'] / 2**20:g} MiB registered, page cache warm", best(ing["big_ingest_runs"]),
                        best(ing["big_openssl_runs"]), "openssl dgst -sha256", 1, source="ingest_bench --remote"))
    if ing and ing["latencies_ms"]:
        lat = sorted(ing["latencies_ms"])
        note = (f"{len(lat)} drops, {ing['latency_during_load']} during a {ing['latency_load']:,}-file upload"
                if ing["latency_load"] else f"{len(lat)} drops, no upload running")
        for pct, goal in ((50, 20.0), (99, 100.0)):
            k = max(1, -(-len(lat) * pct // 100))
            rows.append(Row(f"drop-to-registered p{pct} while uploading", lat[int(k) - 1], goal, "", 1,
                            unit="ms", source="ingest_bench --remote", note=note))
    if up:
        small = {k: min(v, key=lambda r: r["seconds"]) for k, v in up["small"].items()}
        big = {k: min(v, key=lambda r: r["seconds"]) for k, v in up["big"].items()}
        cm = small.get("cm c=4")
        for key in ("rclone t=16", "rclone t=4"):
            peer = small.get(key)
            rows.append(Row(f"S3 {up['args']['files']:,} x {up['args']['file_size'] // 1024} KiB, drop to all copies", cm and cm["seconds"],
                            peer and peer["seconds"], f"rclone copy --transfers {key.split('=')[1]}",
                            1 if key == "rclone t=16" else None, source="upload_bench, upload.concurrency 4",
                            note="ingest included" if key == "rclone t=16" else "rclone's default transfers"))
        if "cm" in big:
            peer = big.get("rclone defaults")
            rows.append(Row(f"S3 {up['args']['big_size'] / 2**20:g} MiB upload", big["cm"]["seconds"], peer and peer["seconds"], "rclone copy", 1,
                            source="upload_bench", note="measured alone: from registered until the copy"))
    if get:
        rows_by = {(r["phase"], r["baseline_of"] or ("get" if r["what"].endswith("write)") else "cached")): r
                   for r in get["rows"]}
        for phase, label in (("dir", "folder"), ("s3", "S3")):
            ours = rows_by.get((phase, "get"))
            for base, tool, goal in (("rclone", "rclone copy", 1.0), ("dd", "dd bs=1M conv=fsync", 0.8)):
                peer = rows_by.get((phase, base))
                if ours is None and peer is None:
                    continue
                size = (ours or peer)["size"] / 2**20
                rows.append(Row(f"get of an evicted {size:g} MiB from {label}", ours and ours["seconds"],
                                peer and peer["seconds"], tool, goal, source="get_bench",
                                note="measured alone; page cache dropped" + ("; target of issue 5" if base == "dd"
                                                                             else "")))
    if st:
        rows.append(Row(f"status p99 at {st['files']:,} files", st["p99_ms"], 5.0, "", 1, unit="ms",
                        source="status_bench", note=f"p50 {st['p50_ms']:.2f} ms; feeder dropping files meanwhile"))
    rss: dict[str, float] = {}
    if ing:
        rss.update({f"ingest {k}": v for k, v in ing["rss"].items() if v})
    if safe and safe.get("rss"):
        rss["safe"] = safe["rss"]
    if up:
        for k, v in list(up["small"].items()) + list(up["big"].items()):
            for run in v:
                if run.get("rss"):
                    rss[f"upload {k}"] = max(rss.get(f"upload {k}", 0), run["rss"])
    if st and st.get("hwm_mb"):
        rss["status"] = st["hwm_mb"]
    if rss:
        worst = max(rss, key=rss.get)
        rows.append(Row("daemon peak RSS (VmHWM), all daemons", rss[worst], 100.0, "", 1, unit="MB",
                        source="all", note=f"highest in {worst}; {len(rss)} daemon phases read"))
    return rows


# -- the outputs ----------------------------------------------------------------------------------

def text_table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [line(HEADER), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def md_table(rows: list[list[str]]) -> list[str]:
    esc = lambda c: c.replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER),
            *("| " + " | ".join(esc(c) for c in r) + " |" for r in rows)]


def machine() -> dict[str, str]:
    with open("/proc/cpuinfo") as fh:
        cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), platform.processor())
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "?"
    # prose (*.md) does not change a figure: only other tracked changes mark the commit as modified
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!*.md"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return {"machine": f"{os.cpu_count()} CPU ({cpu}), {ram:.0f} GiB RAM, Linux {platform.release()}, "
                       f"Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "commit": commit + (" (with uncommitted changes)" if dirty else "")}


def chart(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.score is not None]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(shown) + 1.6), dpi=80)
    labels = [f"{r.figure} vs {r.peer_label}" if r.peer_label else f"{r.figure} ({r.target_text()})"
              for r in shown]
    scores = [r.score for r in shown]
    colors = ["#2e7d32" if r.verdict == "PASS" else "#c62828" for r in shown]
    y = range(len(shown))[::-1]
    ax.barh(list(y), scores, color=colors)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(1, color="black", linewidth=1)
    ax.set_yticks(list(y), labels, fontsize=8)
    for yi, r in zip(y, shown):
        ax.text(r.score, yi, f" {r.ratio:.2f}x", va="center", fontsize=7)
    ax.set_xlabel("measured / target  (right of the line: target met; log scale)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, for development (about 2 minutes)")
    p.add_argument("--only", default=",".join(BENCHES), help=f"benches to run (default {','.join(BENCHES)})")
    p.add_argument("--tmp", default="/tmp", help="where the benches' temp folders go (default /tmp)")
    p.add_argument("--docs", default=str(REPO / "docs"), help="where benchmarks.md and .png go (default docs/)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--from-json", metavar="DIR", help="render from the JSON files of an earlier run in DIR")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    only = [b for b in args.only.split(",") if b]
    if set(only) - set(BENCHES):
        p.error(f"--only: choose from {', '.join(BENCHES)}")
    started = time.monotonic()
    load0 = os.getloadavg()[0]
    figures: dict[str, Any] = {}
    texts: dict[str, str] = {}
    notes: list[str] = []
    out_dir = Path(args.from_json or tempfile.mkdtemp(prefix="cm-report-", dir=args.tmp))
    cmds = commands(args.quick, args.tmp)
    for name in only:
        if args.from_json:
            js = out_dir / f"{name}.json"
            if js.exists():
                figures[name] = json.loads(js.read_text())
            texts[name] = (out_dir / f"{name}.txt").read_text() if (out_dir / f"{name}.txt").exists() else ""
            continue
        fig, text, seconds, error = run_bench(name, cmds[name], out_dir)
        (out_dir / f"{name}.txt").write_text(text)
        texts[name] = text
        if fig is not None:
            figures[name] = fig
        notes.append(f"{name}: `{' '.join(cmds[name])}`, {seconds:.0f} s" + (f", FAILED: {error}" if error else ""))
    rows = build_rows(figures)
    m = machine()
    load1 = os.getloadavg()[0]
    mode = "--quick (small sizes: a development check, not the issue's figures)" if args.quick else "full sizes"
    head = [f"machine: {m['machine']}; {SHARED_NOTE}",
            f"date: {m['date']}; commit: {m['commit']}; mode: {mode}; wall time {time.monotonic() - started:.0f} s; "
            f"1-min load {load0:.1f} at the start, {load1:.1f} at the end",
            "every daemon as users run it: its remotes on (one folder or S3 remote, redundancy 1), default "
            "concurrency; ratio = the peer's time / ours (absolute targets: target / measured); >= the target passes"]
    cells = [r.cells() for r in rows]
    passed = sum(r.verdict == "PASS" for r in rows)
    missed = sum(r.verdict == "MISS" for r in rows)
    summary = f"{passed} targets met, {missed} missed, {sum(r.verdict == 'n/a' for r in rows)} not measured"
    print("\n".join(["cloudmanagerd benchmark report (issue 12)", *head, "", *text_table(cells), "", summary,
                     *notes]), flush=True)
    if not args.no_write:
        docs = Path(args.docs)
        docs.mkdir(exist_ok=True)
        png = docs / "benchmarks.png"
        try:
            chart(rows, png, f"cloudmanagerd vs peers ({'--quick, ' if args.quick else ''}{m['date']}, "
                             f"commit {m['commit'].split()[0]}; {os.cpu_count()} shared CPUs)")
        except ImportError:
            say("matplotlib is not installed (make bench installs it): no chart", tag="report")
        md = ["# Benchmarks", "",
              "Written by `make bench` (`tests/bench/report.py`; see tests/bench/README.md). Do not edit by hand.", "",
              *(f"- {h}" for h in head), "", "![cloudmanagerd vs its peers](benchmarks.png)", "",
              *md_table(cells), "", summary, "", "## The runs", "", *(f"- {n}" for n in notes), ""]
        for name in only:
            if texts.get(name):
                md += [f"### {name}", "", "```", texts[name], "```", ""]
        # the "Several nodes" section is cluster_bench.py's, run on its own (a PostgreSQL server and
        # several daemons): kept as it was
        old = docs / "benchmarks.md"
        kept = old.read_text().partition("\n## Several nodes\n") if old.exists() else ("", "", "")
        if kept[1]:
            md += [kept[1].strip("\n"), kept[2]]
        (docs / "benchmarks.md").write_text("\n".join(md))
        say(f"wrote {docs / 'benchmarks.md'} and {png}; raw figures in {out_dir}", tag="report")
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
