"""The daemon as an unprivileged user: unreadable files, an unwritable inbox, a shared setgid inbox.

CI runs as root, which ignores permission bits, so each test runs the daemon through
setpriv as another user on folders owned the way a real installation owns them.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Daemon, sha256_of, wait_for


def chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)


def home_for(workdir: Path, name: str, uid: int, gid: int) -> Path:
    """A folder the daemon's user owns, to hold its inbox, cache, state, remotes and socket."""
    base = workdir / name
    base.mkdir(mode=0o755)
    os.chown(base, uid, gid)
    return base


def registered(d: Daemon) -> dict[str, dict]:
    return {f["hash"]: f for f in d.files()}


def lines_with(text: str, *needles: str) -> list[str]:
    return [line for line in text.splitlines() if all(n in line for n in needles)]


# -- an unreadable file -----------------------------------------------------------------------------

def test_unreadable_file_is_rejected_and_the_daemon_keeps_ingesting(daemon_factory, workdir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    base = home_for(workdir, "nb", nobody.pw_uid, nobody.pw_gid)
    d = daemon_factory(user="nobody", start=False, root=base)
    chown_tree(base, nobody.pw_uid, nobody.pw_gid)
    staging = workdir / "root-staging"  # root's own, on the inbox's mount
    staging.mkdir(mode=0o700)
    d.start()

    secret = os.urandom(5000)
    fd = os.open(staging / "secret.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secret)
    os.close(fd)
    os.rename(staging / "secret.bin", d.inbox / "secret.bin")

    rejected = base / "rejected" / "secret.bin"
    wait_for(rejected.exists, message="the unreadable file moved to the rejected folder")
    assert not (d.inbox / "secret.bin").exists()
    assert rejected.read_bytes() == secret, "a rejected file must be kept whole"
    st = rejected.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    reasons = lines_with(d.log(), "secret.bin", "rejected")
    assert len(reasons) == 1 and "unreadable" in reasons[0], reasons

    data = os.urandom(7000)
    (d.inbox / "readable.bin").write_bytes(data)
    os.chmod(d.inbox / "readable.bin", 0o644)
    h = hashlib.sha256(data).hexdigest()
    wait_for(lambda: h in registered(d), message="a readable file ingested after the rejection")
    status = d.status()
    assert status["inbox"]["rejected"] == 1
    assert status["state"] in ("running", "degraded")
    assert "Traceback" not in d.log()
    assert d.stop() == 0


# -- an inbox the daemon's user cannot write ----------------------------------------------------------

def test_unwritable_inbox_refuses_to_start_with_one_line(daemon_factory, workdir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    base = home_for(workdir, "nb", nobody.pw_uid, nobody.pw_gid)
    d = daemon_factory(user="nobody", start=False, root=base)
    chown_tree(base, nobody.pw_uid, nobody.pw_gid)
    os.chown(d.inbox, 0, 0)
    os.chmod(d.inbox, 0o755)

    run = subprocess.run(d.command(), capture_output=True, text=True, timeout=60, cwd=base)
    assert run.returncode == 1, run
    out = (run.stdout + run.stderr).strip()
    assert "Traceback" not in out
    lines = out.splitlines()
    assert len(lines) == 1, lines
    assert str(d.inbox) in lines[0] and "not writable" in lines[0] and "nobody" in lines[0]
    assert "chown" in lines[0] or "chmod" in lines[0], f"the line must say what to do: {lines[0]}"
    assert not Path(d.socket_path).exists()

    check = subprocess.run(d.command("--check-config"), capture_output=True, text=True, timeout=60, cwd=base)
    assert check.returncode == 1, check
    checked = (check.stdout + check.stderr).strip()
    assert "Traceback" not in checked
    assert len(checked.splitlines()) == 1, checked
    message = checked.split("cloudmanagerd: ", 1)[1]
    assert lines[0].endswith(message), f"--check-config and the daemon disagree:\n{checked}\n{lines[0]}"


# -- a shared, setgid inbox ----------------------------------------------------------------------------

@dataclass
class SharedAccounts:
    group: str
    gid: int
    daemon_user: str      # runs cloudmanagerd, member of the group
    operator: str         # drops files, another member of the group


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def shared_accounts() -> Iterator[SharedAccounts]:
    """A test group and two members (the daemon's user and an operator), removed afterwards."""
    for tool in ("groupadd", "useradd", "userdel", "groupdel", "setpriv"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (Debian packages passwd and util-linux)")
    tag = uuid.uuid4().hex[:6]
    group, daemon_user, operator = f"cmtg{tag}", f"cmtd{tag}", f"cmto{tag}"
    created_users: list[str] = []
    created_group = False
    try:
        _run("groupadd", "--system", group)
        created_group = True
        # The daemon's user has the shared group as its primary group (as sysusers makes it); the
        # operator's primary group is another one and the shared group is supplementary, as for a
        # human, so the setgid bit (not the operator's primary group) gives new files the shared group.
        for user, primary in ((daemon_user, group), (operator, "nogroup")):
            _run("useradd", "--system", "--no-create-home", "--no-user-group", "--gid", primary,
                 "--groups", group, "--shell", "/usr/sbin/nologin", user)
            created_users.append(user)
        yield SharedAccounts(group, grp.getgrnam(group).gr_gid, daemon_user, operator)
    finally:
        for user in created_users:
            subprocess.run(["userdel", user], capture_output=True, timeout=60)
        if created_group:
            subprocess.run(["groupdel", group], capture_output=True, timeout=60)


def as_operator(accounts: SharedAccounts, script: str, cwd: Path, data: bytes = b"") -> None:
    """Run a shell script as the operator, with the operator's own groups (as a login would)."""
    done = subprocess.run(["setpriv", f"--reuid={accounts.operator}", "--regid=nogroup", "--init-groups",
                           "sh", "-c", script], input=data, capture_output=True, cwd=cwd, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")


def test_group_member_drops_into_setgid_inbox_and_the_daemon_renames(shared_accounts: SharedAccounts,
                                                                    daemon_factory, workdir: Path) -> None:
    acc = shared_accounts
    daemon_pw = pwd.getpwnam(acc.daemon_user)
    operator_pw = pwd.getpwnam(acc.operator)
    # As the tmpfiles snippet lays it out: a root the daemon owns, an inbox 2770 of the shared group.
    base = home_for(workdir, "srv", daemon_pw.pw_uid, acc.gid)
    d = daemon_factory(user=acc.daemon_user, start=False, root=base)
    chown_tree(base, daemon_pw.pw_uid, acc.gid)
    os.chmod(d.inbox, 0o2770)
    # The operator's own folder on the inbox's mount, setgid to the shared group so that a file staged
    # there and moved in (a rename keeps the group) is readable by the group.
    operator_staging = base / "operator-staging"
    operator_staging.mkdir()
    os.chown(operator_staging, operator_pw.pw_uid, acc.gid)
    os.chmod(operator_staging, 0o2750)
    d.start()

    drops = {
        "written.bin": ("umask 027; cat > inbox/written.bin", os.urandom(100_000)),
        "moved.bin": ("umask 027; cat > operator-staging/moved.bin && mv operator-staging/moved.bin inbox/",
                      os.urandom(200_000)),
        "shared/sub.bin": ("umask 007; mkdir -p inbox/shared && cat > inbox/shared/sub.bin",
                           os.urandom(300_000)),
    }
    for script, data in drops.values():
        as_operator(acc, script, base, data)
    expected = {name: hashlib.sha256(data).hexdigest() for name, (_script, data) in drops.items()}

    wait_for(lambda: set(expected.values()) <= {h for h, f in registered(d).items() if f["cached"]},
             message="the operator's files registered")
    wait_for(lambda: not [p for p in d.inbox.rglob("*") if p.is_file()], message="the inbox emptied")
    files = registered(d)
    for name, h in expected.items():
        assert files[h]["name"] == name
        obj = d.cache / h[:2] / h
        assert sha256_of(obj) == h
        st = obj.stat()
        # The very inode the operator wrote, renamed in (a copy would belong to the daemon's user),
        # with the shared group from the setgid inbox.
        assert st.st_uid == operator_pw.pw_uid, f"{name}: object owned by uid {st.st_uid}"
        assert st.st_gid == acc.gid
    rejected = base / "rejected"
    assert not rejected.exists() or not list(rejected.iterdir()), "nothing of the operator's may be rejected"
    assert "Traceback" not in d.log()
    assert d.stop() == 0


@pytest.mark.parametrize("layout", ["subfolder-022", "sticky-inbox"])
def test_a_file_the_daemon_may_not_move_does_not_hold_up_the_others(
        layout: str, shared_accounts: SharedAccounts, daemon_factory, workdir: Path) -> None:
    """subfolder-022: an operator with umask 022 makes a subfolder in the shared inbox, so the daemon
    may read the file there but not move it out. sticky-inbox: someone ran chmod +t on the inbox,
    so only a file's owner may move it. Either way the file stays put, one log line and status say
    why, and every other file flows on."""
    acc = shared_accounts
    daemon_pw = pwd.getpwnam(acc.daemon_user)
    base = home_for(workdir, "srv", daemon_pw.pw_uid, acc.gid)
    d = daemon_factory(user=acc.daemon_user, start=False, root=base)
    chown_tree(base, daemon_pw.pw_uid, acc.gid)
    if layout == "sticky-inbox":  # root's, group-writable, sticky: the daemon owns neither inbox nor file
        os.chown(d.inbox, 0, acc.gid)
        os.chmod(d.inbox, 0o3770)
    else:
        os.chmod(d.inbox, 0o2770)
    d.start()

    staging = base / "own-staging"
    staging.mkdir()

    def drop_movable(name: str, data: bytes) -> None:
        if layout == "subfolder-022":  # the operator, at the top of the inbox
            as_operator(acc, f"umask 027; cat > inbox/{name}", base, data)
        else:  # in a sticky inbox, the daemon's user may still move its own files
            (staging / name).write_bytes(data)
            os.chown(staging / name, daemon_pw.pw_uid, acc.gid)
            os.rename(staging / name, d.inbox / name)

    stuck = os.urandom(1000)
    if layout == "subfolder-022":
        rel, said_why = "mine/stuck.bin", "not writable"
        as_operator(acc, "umask 022; mkdir inbox/mine && cat > inbox/mine/stuck.bin", base, stuck)
    else:
        rel, said_why = "stuck.bin", "sticky"
        as_operator(acc, "umask 027; cat > inbox/stuck.bin", base, stuck)
    others = {f"g{i}.bin": os.urandom(2000) for i in range(12)}
    for name, data in others.items():
        drop_movable(name, data)

    wanted = {hashlib.sha256(data).hexdigest() for data in others.values()}
    wait_for(lambda: wanted <= set(registered(d)), timeout=15,
             message="the other files registered despite the stuck one")
    wait_for(lambda: any(rel in p for p in d.status()["problems"]),
             message="status naming the file that cannot be moved")
    assert (d.inbox / rel).read_bytes() == stuck
    assert hashlib.sha256(stuck).hexdigest() not in registered(d)
    said = lines_with(d.log(), rel, said_why)
    assert len(said) == 1, said

    # A copy of content already stored, dropped where the daemon may not remove it: it stays, said once.
    dup_rel = rel.replace("stuck.bin", "dup.bin")
    as_operator(acc, f"umask 022; cat > inbox/{dup_rel}", base, others["g0.bin"])
    wait_for(lambda: any(dup_rel in p for p in d.status()["problems"]),
             message="status naming the duplicate that cannot be removed")
    assert len(lines_with(d.log(), dup_rel, said_why)) == 1
    late = os.urandom(3000)
    drop_movable("late.bin", late)
    wait_for(lambda: hashlib.sha256(late).hexdigest() in registered(d), message="a later file registered")
    assert (d.inbox / dup_rel).read_bytes() == others["g0.bin"]
    assert len(registered(d)) == len(others) + 1
    assert "Traceback" not in d.log()
    assert d.stop() == 0
