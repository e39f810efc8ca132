"""The plowshare backend over stand-ins for plowup/plowdown/plowprobe/plowdel (tests/fakes): the
Remote contract, every documented exit code classified, garbage, hangs, and a daemon that puts a
copy on a file locker."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for
from remote_contract import RemoteContract, fetch, make_object

from cloudmanagerd.config import parse_remotes
from cloudmanagerd.remotes import build_remote
from cloudmanagerd.remotes.base import FILE, MISSING, REMOTE, TRANSIENT, Cancelled, RemoteError, Transfer
from cloudmanagerd.remotes.plowshare import PlowshareRemote
from cloudmanagerd.remotes.subprocesses import Timeout, run

FAKES = str(Path(__file__).resolve().parent / "fakes")
URL_PREFIX = "https://fake-locker.invalid/"


class Locker:
    """The stand-ins' file locker: its files, its control file, its call log."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def control(self) -> dict:
        path = self.root / "control.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def set(self, key: str, value: object) -> None:
        data = self.control()
        data[key] = value
        (self.root / "control.json").write_text(json.dumps(data))

    def fail(self, tool: str, **rule: object) -> None:
        """`tool` (or "tool@host") misbehaves: exit=N, hang=True, garbage="...", corrupt=True, times=K."""
        self.set(tool, rule)

    def calls(self) -> list[dict]:
        path = self.root / "calls.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def files(self, host: str = "fakelocker") -> list[Path]:
        folder = self.root / "files" / host
        return sorted(p for p in folder.iterdir() if "." not in p.name) if folder.exists() else []

    def hang_pids(self) -> list[int]:
        folder = self.root / "hangs"
        return [int(pid) for f in folder.iterdir() for pid in f.read_text().split()] if folder.exists() else []


@pytest.fixture
def locker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Locker:
    root = tmp_path / "locker"
    root.mkdir()
    monkeypatch.setenv("FAKE_PLOWSHARE_STORE", str(root))
    return Locker(root)


def plowshare(host: str = "fakelocker", **kwargs) -> PlowshareRemote:
    return PlowshareRemote("locker", host, bin_dir=FAKES, **kwargs)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def put_bytes(remote: PlowshareRemote, data: bytes, transfer: Transfer | None = None) -> tuple[str, str]:
    h, fd = make_object(data)
    try:
        return h, remote.put(h, fd, len(data), transfer)
    finally:
        os.close(fd)


def put_error(remote: PlowshareRemote, data: bytes = b"some bytes") -> RemoteError:
    with pytest.raises(RemoteError) as info:
        put_bytes(remote, data)
    assert "\n" not in str(info.value)
    return info.value


class TestPlowshare(RemoteContract):
    @pytest.fixture
    def remote(self, locker: Locker) -> PlowshareRemote:
        return plowshare()

    @pytest.fixture
    def broken_remote(self, locker: Locker) -> PlowshareRemote:
        return plowshare("nosuchlocker")  # plowup exits 2: no such module

    def test_empty_object(self, remote, locker) -> None:
        # Overrides the contract: plowup skips empty files ("filesize is null") and prints no URL,
        # so an empty file cannot have a copy on a file locker. FILE: a spare remote takes it.
        error = put_error(remote, b"")
        assert error.kind == FILE and "empty" in str(error)
        assert locker.calls() == []

    def test_the_url_is_plowup_last_line_and_the_host_names_the_file_by_hash(self, remote, locker) -> None:
        h, url = put_bytes(remote, b"named by hash")
        assert url.startswith(URL_PREFIX + "fakelocker/")
        (stored,) = locker.files()
        assert url.endswith("/" + stored.name)
        assert Path(str(stored) + ".name").read_text() == h


@pytest.mark.parametrize("code, kind", [
    (1, TRANSIENT),   # fatal error: not named by the issue, so retried (and counted)
    (2, REMOTE),      # no such module
    (3, TRANSIENT),   # network error
    (4, REMOTE),      # login failed
    (5, TRANSIENT),   # wait timeout
    (6, TRANSIENT),   # max tries reached
    (7, TRANSIENT),   # captcha
    (8, TRANSIENT),   # system failure
    (10, TRANSIENT),  # temporarily unavailable
    (11, FILE),       # password required
    (12, REMOTE),     # needs permissions
    (13, TRANSIENT),  # link dead, from plowup: not a download, so nothing to mark bad
    (14, FILE),       # file too big: this file cannot go there, a spare remote takes its place
    (15, REMOTE),     # bad command line
    (99, TRANSIENT),  # a code plowshare does not document
])
def test_every_plowup_exit_code_is_classified(locker: Locker, code: int, kind: str) -> None:
    locker.fail("plowup", exit=code, message=f"the host said no ({code})")
    error = put_error(plowshare())
    assert error.kind == kind
    assert f"exit {code}" in str(error)
    assert locker.files() == []


def test_remote_errors_say_what_to_fix(locker: Locker, tmp_path: Path) -> None:
    locker.fail("plowup", exit=2)
    assert "plowshare module 'fakelocker' is not installed" in str(put_error(plowshare()))
    locker.fail("plowup", exit=4)
    assert "set auth_file" in str(put_error(plowshare()))
    auth = tmp_path / "locker.auth"
    auth.write_text("me:secret\n")
    assert f"check auth_file {auth}" in str(put_error(plowshare(auth_file=str(auth))))
    locker.fail("plowup", exit=14)
    assert "file too big for fakelocker" in str(put_error(plowshare()))


def test_the_account_in_auth_file_reaches_plowshare_but_not_the_command_line(locker: Locker,
                                                                            tmp_path: Path) -> None:
    locker.set("auth", {"fakelocker": "me:s3cret pass"})
    auth = tmp_path / "locker.auth"
    auth.write_text("me:s3cret pass\n")
    remote = plowshare(auth_file=str(auth))
    remote.probe()
    h, url = put_bytes(remote, b"with an account")
    assert fetch(remote, h, url) == b"with an account"
    assert all("s3cret" not in arg for call in locker.calls() for arg in call["argv"])
    leftovers = [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("cloudmanagerd-plowshare-*")]
    assert leftovers == []
    # a plowshare.conf is handed over as it is
    rc = tmp_path / "plowshare.conf"
    rc.write_text('[General]\nfakelocker/a = "me:s3cret pass"\n')
    h, url = put_bytes(plowshare(auth_file=str(rc)), b"with a plowshare.conf")
    assert any(f"--plowsharerc={rc}" in call["argv"] for call in locker.calls())
    # a wrong password: login failed, the remote is unhealthy until auth_file is fixed
    auth.write_text("me:wrong\n")
    error = put_error(remote)
    assert error.kind == REMOTE and "login failed" in str(error)
    (tmp_path / "locker.auth").unlink()
    with pytest.raises(RemoteError) as info:
        remote.probe()
    assert info.value.kind == REMOTE and "cannot read auth_file" in str(info.value)


@pytest.mark.parametrize("garbage", ["Error: the upload form changed", ""])
def test_garbage_instead_of_a_url_is_no_copy(locker: Locker, garbage: str) -> None:
    locker.fail("plowup", garbage=garbage)
    error = put_error(plowshare())
    assert error.kind == TRANSIENT
    if garbage:
        assert str(error) == f"plowup printed no URL: {garbage}"
    else:
        assert "plowup printed nothing" in str(error)
    assert locker.files() == []


def test_a_plowup_that_skips_the_file_is_no_copy(locker: Locker, tmp_path: Path) -> None:
    # plowup exits 0 without a URL when it skips a file it cannot read; its notice is the reason
    fd = os.open(tmp_path, os.O_RDONLY)  # a folder, not a file
    try:
        with pytest.raises(RemoteError) as info:
            plowshare().put("ab" * 32, fd, 10)
    finally:
        os.close(fd)
    assert info.value.kind == TRANSIENT
    assert str(info.value) == f"plowup printed nothing: Skipping (/proc/self/fd/{fd}): cannot find file"


def test_a_link_dead_on_download_means_the_copy_is_gone(locker: Locker) -> None:
    remote = plowshare()
    h, url = put_bytes(remote, b"soon gone")
    locker.fail("plowdown", exit=13)
    with pytest.raises(RemoteError) as info:
        fetch(remote, h, url)
    assert info.value.kind == MISSING
    assert "gone" in str(info.value)


def test_a_plowdown_that_prints_a_path_outside_its_folder_is_refused(locker: Locker, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("must stay")
    remote = plowshare()
    h, url = put_bytes(remote, b"x")
    locker.fail("plowdown", garbage=str(victim))
    with pytest.raises(RemoteError) as info:
        fetch(remote, h, url)
    assert info.value.kind == TRANSIENT and "not the file it downloaded" in str(info.value)
    assert victim.read_text() == "must stay"


def test_corrupted_bytes_come_back_as_the_host_has_them(locker: Locker) -> None:
    # The backend cannot tell; the caller's SHA-256 of what get() wrote does (fetch marks the copy bad).
    remote = plowshare()
    locker.fail("plowup", corrupt=True, times=1)
    h, url = put_bytes(remote, b"precious bytes")
    assert hashlib.sha256(fetch(remote, h, url)).hexdigest() != h
    assert "plowup" not in locker.control()  # "times" ran out


def test_a_hung_plowup_is_killed_when_the_transfer_is_cancelled(locker: Locker) -> None:
    locker.fail("plowup", hang=True)
    transfer = Transfer(10)
    canceller = threading.Thread(target=lambda: (
        wait_for(lambda: len(locker.hang_pids()) == 2, message="the fake plowup hanging"),
        transfer.cancel("took 61s, longer than upload.stall plus its size at upload.min_rate")))
    canceller.start()
    started = time.monotonic()
    try:
        with pytest.raises(Cancelled) as info:
            put_bytes(plowshare(), b"0123456789", transfer)
    finally:
        canceller.join(30)
    assert time.monotonic() - started < 15
    assert "upload.stall" in str(info.value)
    wait_for(lambda: not any(alive(pid) for pid in locker.hang_pids()), timeout=5,
             message="plowup and its sleep child to be gone")
    assert locker.files() == []


def test_a_hung_plowprobe_times_out(locker: Locker) -> None:
    remote = plowshare(op_timeout=0.5)
    h, url = put_bytes(remote, b"probe me")
    locker.fail("plowprobe", hang=True)
    with pytest.raises(RemoteError) as info:
        remote.exists(h, url)
    assert info.value.kind == TRANSIENT and "0.5s" in str(info.value)
    wait_for(lambda: not any(alive(pid) for pid in locker.hang_pids()), timeout=5,
             message="plowprobe and its sleep child to be gone")


def test_exists_that_cannot_tell_raises_instead_of_calling_the_copy_lost(locker: Locker, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    remote = plowshare()
    h, url = put_bytes(remote, b"sized")
    locker.fail("plowprobe", no_size=True)
    with pytest.raises(RemoteError) as info:
        remote.exists(h, url)
    assert "does not report file sizes" in str(info.value)
    # no plowprobe at all
    only_up = tmp_path / "bin"
    only_up.mkdir()
    for tool in ("plowup", "plowdown"):
        (only_up / tool).symlink_to(Path(FAKES) / tool)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    if shutil.which("plowprobe"):
        pytest.fail("a real plowprobe is on /usr/bin:/bin; this check needs a machine without one")
    with pytest.raises(RemoteError) as info:
        PlowshareRemote("locker", "fakelocker", bin_dir=str(only_up)).exists(h, url)
    assert info.value.kind == REMOTE and "plowprobe is not installed" in str(info.value)


def test_delete_forgets_what_the_host_cannot_delete(locker: Locker) -> None:
    remote = plowshare()
    h, url = put_bytes(remote, b"delete me")
    locker.fail("plowdel", exit=2, times=1)  # the module has no delete function
    remote.delete(h, url)
    assert remote.exists(h, url) == len(b"delete me")
    remote.delete(h, url)
    assert remote.exists(h, url) is None
    remote.delete(h, url)  # link dead (13): already gone
    locker.fail("plowdel", exit=3)
    with pytest.raises(RemoteError) as info:
        remote.delete(h, url)
    assert info.value.kind == TRANSIENT


def test_plowup_not_installed_is_a_remote_problem(locker: Locker, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    remote = PlowshareRemote("locker", "fakelocker", bin_dir=str(tmp_path))
    if shutil.which("plowup"):
        pytest.fail("a real plowup is on /usr/bin:/bin; this check needs a machine without one")
    error = put_error(remote)
    assert error.kind == REMOTE and "plowup is not installed" in str(error) and str(tmp_path) in str(error)


def test_from_config_builds_a_plowshare_remote(tmp_path: Path) -> None:
    (rc,) = parse_remotes([{"name": "lk", "type": "plowshare", "host": "1fichier", "auth_file": "a.auth",
                            "bin_dir": "bin"}], base_dir=str(tmp_path))
    remote = build_remote(rc)
    assert isinstance(remote, PlowshareRemote)
    assert (remote.name, remote.kind, remote.host, remote.auth_file, remote.bin_dir) == (
        "lk", "plowshare", "1fichier", str(tmp_path / "a.auth"), str(tmp_path / "bin"))
    assert remote.reports_progress is False


def test_the_daemon_keeps_a_copy_on_a_file_locker(daemon_factory, locker: Locker) -> None:
    d = daemon_factory(remotes=1, start=False, upload={"redundancy": 2})
    d.config["remotes"].append({"name": "locker", "type": "plowshare", "host": "fakelocker", "bin_dir": FAKES})
    d.config_path.write_text(json.dumps(d.config))  # YAML is a superset of JSON
    d.start()
    data = os.urandom(100_000)
    (d.inbox / "report.pdf").write_bytes(data)
    h = hashlib.sha256(data).hexdigest()

    def copies() -> list[dict]:
        files = [f for f in json.loads(d.ctl("--json", "ls").stdout) if f["hash"] == h]
        return files[0]["copies"] if files else []

    found = wait_for(lambda: len(copies()) == 2 and copies(), timeout=30,
                     message=f"two copies of the file; log: {d.log()[-1500:]}")
    urls = {c["remote"]: c["url"] for c in found}
    assert urls["locker"].startswith(URL_PREFIX + "fakelocker/")
    (stored,) = locker.files()
    assert stored.read_bytes() == data
    assert urls["locker"].endswith("/" + stored.name)
    assert d.stop() == 0


# -- the subprocess runner both command-line backends share -------------------------------------

def test_the_runner_keeps_the_exit_code_and_the_stderr_tail() -> None:
    result = run(["sh", "-c", "echo chatter; echo first >&2; echo last >&2; exit 3"])
    assert (result.code, result.stdout, result.stderr_tail) == (3, b"chatter\n", ["first", "last"])
    assert result.last_stderr_line() == "last"


def test_the_runner_does_not_wait_for_a_child_left_holding_its_pipes(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    started = time.monotonic()
    result = run(["sh", "-c", f"sleep 600 & echo $! > {pidfile}; echo done"])
    assert result.code == 0 and result.stdout == b"done\n"
    assert time.monotonic() - started < 5
    wait_for(lambda: not alive(int(pidfile.read_text())), timeout=5, message="the straggler to be killed")


def test_the_runner_kills_a_command_past_its_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(Timeout) as info:
        run(["sleep", "600"], timeout=0.3, what="the sleeper")
    assert time.monotonic() - started < 5
    assert info.value.kind == TRANSIENT and "the sleeper" in str(info.value)


def test_the_runner_starts_nothing_for_a_transfer_already_cancelled(tmp_path: Path) -> None:
    transfer = Transfer(1)
    transfer.cancel("the daemon is stopping")
    with pytest.raises(Cancelled):
        run(["sh", "-c", f"touch {tmp_path / 'ran'}"], transfer=transfer)
    assert not (tmp_path / "ran").exists()


def test_a_stderr_handler_that_raises_stops_the_command() -> None:
    transfer = Transfer(1)

    def on_line(line: str) -> None:
        transfer.cancel("stalled")
        transfer.update(0)  # raises Cancelled, as the rclone backend's progress handler would

    started = time.monotonic()
    with pytest.raises(Cancelled):
        run(["sh", "-c", "echo progress >&2; exec sleep 600"], transfer=transfer, on_stderr_line=on_line)
    assert time.monotonic() - started < 5
