"""A throwaway Debian 12 machine under systemd-nspawn, booted with systemd as PID 1.

The root filesystem is built once with debootstrap and cached under CACHE_DIR, keyed by a
hash of what went into it; every boot mounts it read-only with a tmpfs on top
(`--volatile=overlay`), so a test never changes the cached tree and needs no copy of it.
Wheels of the project's dependencies are built on the host (Debian 12 and CPython 3.11 on
both sides) and installed offline inside, so the machine needs no network at all.

This host has no systemd of its own, so there is no machined to register with:
`machinectl` and `systemd-run -M` cannot reach the container. Commands run inside with
`nsenter` into all of the leader's namespaces, with a clean environment, as root, like an
operator at the console.

`python tests/systemd/nspawn_machine.py build` builds (or finds) the cached root file
system and wheels and prints their paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CACHE_DIR = Path(os.environ.get("CLOUDMANAGERD_TEST_CACHE", "/var/cache/cloudmanagerd-test"))
SUITE = "bookworm"
VARIANT = "minbase"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "python3-dev", "gcc", "make",
            "pkg-config", "libsystemd-dev", "ca-certificates", "procps", "libc6-dev",
            # the Makefile's APT_RUN: make install needs it, and the container has no network
            "libpq5")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
REPO = Path(__file__).resolve().parents[2]
# What a clean copy of the source tree leaves out (as a fresh clone would not have them).
SOURCE_IGNORE = {".git", ".venv", "var", "build", "dist", ".pytest_cache", "__pycache__", ".mypy_cache",
                 ".ruff_cache"}
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class MachineError(RuntimeError):
    pass


# -- what the host needs ------------------------------------------------------------------------

def missing_prerequisites() -> list[str]:
    """Why this host cannot boot a container (empty when it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root")
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed (Debian packages systemd-container, debootstrap, "
                            "util-linux)")
    return problems


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses for the main archive of SUITE."""
    files = sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
    for path in files:
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", Path(path).read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                suites = fields.get("suites", "").split()
                if "deb" in fields.get("types", "").split() and SUITE in suites and \
                        "main" in fields.get("components", "").split():
                    return fields.get("uris", "").split()[0]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 4 and words[0] == "deb" and words[2] == SUITE and "main" in words[3:]:
                    return words[1]
    return DEFAULT_MIRROR


# -- the cached root file system -------------------------------------------------------------------

def rootfs_key() -> str:
    spec = {"suite": SUITE, "variant": VARIANT, "packages": sorted(PACKAGES), "arch": os.uname().machine}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_rootfs(log=print) -> Path:
    """The cached Debian 12 minbase tree, built with debootstrap when it is not there yet."""
    target = CACHE_DIR / f"rootfs-{rootfs_key()}"
    if (target / "usr/lib/systemd/systemd").exists():
        return target
    with _cache_lock():
        if (target / "usr/lib/systemd/systemd").exists():
            return target
        for stale in CACHE_DIR.glob("rootfs-*.building-*"):  # left by a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
        building = Path(tempfile.mkdtemp(prefix=f"{target.name}.building-", dir=CACHE_DIR))
        mirror = apt_mirror()
        log(f"building {target} with debootstrap from {mirror} (a few minutes, once)")
        cmd = ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}", SUITE, str(building),
               mirror]
        try:
            proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1200)
            if proc.returncode != 0:
                raise MachineError(f"debootstrap failed ({proc.returncode}):\n"
                                   + proc.stdout.decode(errors="replace")[-3000:])
            os.rename(building, target)
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
    return target


def ensure_wheels(python: str = sys.executable, log=print) -> Path:
    """Wheels of every dependency (and of the build backend), for `pip install --no-index` inside."""
    spec = b"".join((REPO / name).read_bytes() for name in ("setup.cfg", "pyproject.toml"))
    key = hashlib.sha256(spec + sys.version.encode()).hexdigest()[:16]
    target = CACHE_DIR / f"wheels-{key}"
    if (target / ".complete").exists():
        return target
    with _cache_lock():
        if (target / ".complete").exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        log(f"building wheels into {target}")
        for args in (["setuptools>=61", "wheel"], [str(REPO)]):
            proc = subprocess.run([python, "-m", "pip", "wheel", "-q", "-w", str(target), *args], check=False,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900, cwd="/")
            if proc.returncode != 0:
                shutil.rmtree(target, ignore_errors=True)
                raise MachineError(f"pip wheel {' '.join(args)} failed:\n"
                                   + proc.stdout.decode(errors="replace")[-3000:])
        # The project itself is built from its source tree inside, by `make install`.
        for own in target.glob("cloudmanagerd-*.whl"):
            own.unlink()
        (target / ".complete").touch()
    return target


def copy_source(dest: Path) -> Path:
    """The project's working tree as a fresh clone would have it (no venv, no build output)."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in SOURCE_IGNORE or n.endswith(".egg-info")}
    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)
    return dest


# -- a booted machine ---------------------------------------------------------------------------------

class Machine:
    """One booted container; use as a context manager: it is always powered off and reaped."""

    def __init__(self, rootfs: Path, name: str, workdir: Path, binds: list[str] = (),
                 bind_ro: list[str] = ()) -> None:
        self.rootfs = rootfs
        self.name = name
        self.workdir = workdir
        self.binds = list(binds)
        self.bind_ro = list(bind_ro)
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None
        self.console = workdir / "console.log"
        self._console = None

    def __enter__(self) -> Machine:
        try:
            self.boot()
        except BaseException:
            self.poweroff()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.poweroff()

    def boot(self, timeout: float = 120) -> None:
        cmd = ["systemd-nspawn", "--boot", f"--directory={self.rootfs}", "--volatile=overlay",
               f"--machine={self.name}", "--register=no", "--keep-unit", "--private-network",
               "--console=read-only", "--quiet"]
        cmd += [f"--bind={b}" for b in self.binds] + [f"--bind-ro={b}" for b in self.bind_ro]
        self._console = open(self.console, "ab")
        env = {"PATH": INSIDE_PATH, "SYSTEMD_LOG_COLOR": "0", "TERM": "dumb"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._console,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.proc.poll() is not None:
                raise MachineError(f"systemd-nspawn exited with {self.proc.returncode}:\n{self.console_tail()}")
            for child in _children_of(self.proc.pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        self.leader = child
            if time.monotonic() > deadline:
                raise MachineError(f"no systemd in the container after {timeout}s:\n{self.console_tail()}")
            time.sleep(0.05)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MachineError(f"the container did not finish booting in {timeout}s:\n{self.console_tail()}")
            r = self.run("systemctl is-system-running --wait", check=False, timeout=remaining)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                break
            if self.proc.poll() is not None:
                raise MachineError(f"systemd-nspawn exited with {self.proc.returncode}:\n{self.console_tail()}")
            time.sleep(0.1)  # the manager's bus may not be up yet: ask again
        if state == "degraded":
            failed = self.run("systemctl --failed --no-legend", check=False).stdout
            raise MachineError(f"the container booted degraded:\n{failed}")

    def run(self, script: str, check: bool = True, timeout: float = 120, user: str | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run a shell script inside, as root (or as `user`, with that user's groups), with a clean env."""
        assert self.leader is not None
        env = ["env", "-i", f"PATH={INSIDE_PATH}", "LANG=C.UTF-8", "TERM=dumb", "SYSTEMD_PAGER=",
               "SYSTEMD_COLORS=0"]
        if user is None:
            prefix = [*env, "HOME=/root", "USER=root"]
        else:
            prefix = [*env, f"HOME=/home/{user}", f"USER={user}", "setpriv", f"--reuid={user}",
                      f"--regid={user}", "--init-groups", "--reset-env"]
        cmd = ["nsenter", f"--target={self.leader}", "--all", "--", *prefix, "/bin/sh", "-c", script]
        r = subprocess.run(cmd, check=False, input=input, capture_output=True, text=True, timeout=timeout,
                           stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise MachineError(f"inside {self.name}{' as ' + user if user else ''}: {script!r} exited "
                               f"{r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}")
        return r

    def console_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.console.read_text(errors="replace")[-chars:]
        return ""

    def poweroff(self, timeout: float = 60) -> None:
        """An orderly shutdown (SIGTERM makes nspawn ask PID 1 to power off), then SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Killing a PID namespace's init kills everything in it.
                if self.leader is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        if self._console is not None:
            self._console.close()
            self._console = None


def _children_of(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit(f"usage: {sys.argv[0]} build")
    for problem in missing_prerequisites():
        sys.exit(problem)
    print(ensure_rootfs())
    print(ensure_wheels())
