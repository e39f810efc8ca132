"""Checks before the start (and for `--check-config`): can the daemon use the folders the config names?

The same checks serve the start and `--check-config`, so that a config said to be OK does not then
fail to start on a folder. Each problem is one line that says what to do.
"""

from __future__ import annotations

import contextlib
import os
import stat

from .config import Config, catalog_sqlite_path
from .errors import explain_oserror


def preflight(config: Config) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the folders, each one line that says what to do.

    The same checks serve the start and `--check-config`, so that a config said to be OK does
    not then fail to start on a folder. Errors stop the daemon (it could not take a single file
    in); a remote it cannot write to is only a warning: the daemon runs, reports the remote and
    uses the others.
    """
    problems: list[str] = []
    warnings: list[str] = []
    inbox = config.inbox
    link = inbox_link_problem(inbox)
    if link:
        problems.append(link)
    elif not os.path.isdir(inbox):
        problems.append(f"inbox: {inbox} does not exist or is not a folder (create it: mkdir -p {inbox})")
    elif _read_only(inbox):
        problems.append(f"inbox: {inbox} is on a read-only mount (files are moved out of it; {_REMOUNT})")
    elif not os.access(inbox, os.W_OK | os.X_OK):
        problems.append(f"inbox: {inbox} is not writable by user {_user()} "
                        f"(files are moved out of it; run: chown {_user()} {inbox})")
    folders = [("cache.path", config.cache.path), ("state", config.state), ("ingest.rejected", config.ingest.rejected),
               ("control.socket", os.path.dirname(config.control.socket) or ".")]
    sqlite = catalog_sqlite_path(config.catalog)
    if sqlite:
        folders.append(("catalog", os.path.dirname(sqlite) or "."))
    checked = set()
    for key, path in folders:
        if os.path.abspath(path) in checked:  # the catalog's folder is usually the state: said once
            continue
        checked.add(os.path.abspath(path))
        problem = _folder_problem(key, path)
        if problem:
            problems.append(problem)
    with contextlib.suppress(OSError):
        if not stat.S_ISSOCK(os.lstat(config.control.socket).st_mode):
            problems.append(f"control.socket {config.control.socket} exists and is not a socket; move it away "
                            "or choose another path")
    for rc in config.remotes:
        if rc.type == "directory":
            path = str(rc.get("path"))
            if os.path.isdir(path) and _read_only(path):
                warnings.append(f"remotes.{rc.name}: {path} is on a read-only mount (no copy can be made there; "
                                f"{_REMOUNT})")
            elif os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
                warnings.append(f"remotes.{rc.name}: {path} is not writable by user {_user()} (under systemd, "
                                f"add a drop-in with ReadWritePaths={path}; else chown it)")
    return problems, warnings


def promise_warnings(config: Config) -> list[str]:
    """Configs that start but cannot keep the promise of copies that outlive the node's disk, each a
    warning (not a refusal: a test box or a first try may mean it), logged at start and listed by
    --check-config: a folder remote on the cache's or the inbox's filesystem, two folder remotes on
    one filesystem, a single copy per file, fewer usable remotes than `upload.redundancy`."""
    warnings: list[str] = []
    local = [("the cache", _device(config.cache.path)), ("the inbox", _device(config.inbox))]
    seen: dict[int, str] = {}
    usable = 0
    for rc in config.remotes:
        if rc.type != "directory":
            usable += 1
            continue
        path = str(rc.get("path"))
        if not os.path.isdir(path):
            warnings.append(f"remote {rc.name}: {path} does not exist: no copy can be made there until it does "
                            f"(mount it, or mkdir -p {path})")
            continue
        if _unusable_folder(path):  # preflight() said why
            continue
        usable += 1
        dev = _device(path)
        if dev is None:
            continue
        shared = next((what for what, d in local if d == dev), None)
        if shared:
            warnings.append(f"remote {rc.name}: {path} is on the same filesystem as {shared}: this copy dies with "
                            "the disk (point it at another disk or a mounted NAS)")
        elif dev in seen:
            warnings.append(f"remote {rc.name}: {path} is on the same filesystem as remote {seen[dev]}: their "
                            "copies die together with that disk (point one at another disk)")
        seen.setdefault(dev, rc.name)
    redundancy = config.upload.redundancy
    if redundancy == 1:
        warnings.append("upload.redundancy is 1: each file has one copy, lost with its remote (set 2 or more, "
                        "with as many remotes)")
    if usable < redundancy:
        warnings.append(f"upload.redundancy is {redundancy} but {_usable(usable)}: files stay below it (fix the "
                        "remotes named above, or add remotes)")
    return warnings


def _usable(count: int) -> str:
    return "no remote is usable" if count == 0 else f"only {count} remote{'s' if count > 1 else ''} " \
        f"{'are' if count > 1 else 'is'} usable"


def _device(path: str) -> int | None:
    """st_dev of the folder, or of its nearest existing parent (where it would be created)."""
    while True:
        try:
            return os.stat(path).st_dev
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if parent == path:
                return None
            path = parent
        except OSError:
            return None


def _unusable_folder(path: str) -> bool:
    """A folder remote no copy can be written to now (as `preflight` warns)."""
    return _read_only(path) or not os.access(path, os.W_OK | os.X_OK)


def inbox_link_problem(inbox: str) -> str | None:
    """An inbox path whose last component is a symlink is refused: it would take whatever the
    link points to (anyone who may replace it could point it at any folder). Links higher up
    the path (/srv -> /data/srv) are the admin's own layout and are allowed; below the inbox
    nothing is ever followed (fsutil)."""
    if not os.path.islink(inbox):
        return None
    try:
        target = os.readlink(inbox)
    except OSError:
        target = "?"
    return (f"inbox: {inbox} is a symbolic link to {target}, which is never followed (set inbox to "
            f"the real folder, {os.path.realpath(inbox)}, or replace the link with a folder)")


_REMOUNT = "remount it read-write or choose another folder; under systemd, list it in ReadWritePaths="


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _folder_problem(key: str, path: str) -> str | None:
    """Why the daemon could not use the folder at `path`, creating it if missing; None when it can."""
    existing = path
    while True:
        try:
            st = os.stat(existing)
            break
        except FileNotFoundError:
            parent = os.path.dirname(existing)
            if parent == existing:
                return f"{key}: {path}: no part of it exists"
            existing = parent
        except OSError as exc:
            return explain_oserror(exc, f"{key}: {path}")
    creates = existing != path
    if not stat.S_ISDIR(st.st_mode):
        if creates:
            return f"{key}: {path} cannot be created: {existing} is not a folder"
        return f"{key}: {path} is not a folder (move it away or choose another path)"
    if _read_only(existing):
        where = f"{existing}, where it would be created," if creates else path
        return f"{key}: {where} is on a read-only mount ({_REMOUNT})"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = f"{path} cannot be created by user {_user()}" if creates else f"{path} is not writable by user {_user()}"
        return f"{key}: {what} (run: chown {_user()} {existing})"
    return None


def _user() -> str:
    import pwd
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
