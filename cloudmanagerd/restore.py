"""`cloudmanagerd restore -c CONFIG [--force]`: a node that lost its disk gets its catalog back.

With only the config file: the newest snapshot of this node's catalog on the remotes (snapshots.py)
whose bytes hash to the SHA-256 in its name, that decompresses and that SQLite finds intact (a bad
one: the next older, on any remote), is installed as the catalog (temp file, fsync, rename). The
cache is gone with the disk: this node's cache entries are dropped, except objects still in the
cache folder whose bytes hash to their name. Then every remote that can be listed is listed:
objects the snapshot does not know (files added after it) are registered, named by their hash, with
their copy recorded (their bytes are verified at their first fetch, as every fetch's are), and
recorded copies whose object is gone are marked bad (the daemon's self-heal copies them again).

Progress goes to stderr, the summary to stdout. Exit 0 restored, 1 refused or failed.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import gzip
import os
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

from . import fsutil
from .catalog import SCHEMA_VERSION, Catalog, SchemaTooNew
from .config import DEFAULT_CONFIG_PATH, Config, catalog_sqlite_path, load_or_report
from .errors import CloudManagerError, StartupError, explain_oserror
from .hashing import sha256_fd
from .node import build_remotes
from .remotes.base import RESERVED, RemoteError
from .scrub import read_back
from .snapshots import Snapshot, listed, node_folder, supports

ADOPT_CHUNK = 5000  # objects registered per transaction
SQLITE_MAGIC = b"SQLite format 3\x00"  # how every SQLite database file begins


class Refused(Exception):
    """Restore cannot go on; the message says why and what to do."""


class BadSnapshot(Exception):
    """This snapshot cannot be used; the next older one is tried."""


def say(line: str) -> None:
    print(f"cloudmanagerd restore: {line}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cloudmanagerd restore",
                                description="Rebuild a lost node's catalog from the newest good snapshot on its "
                                "remotes, and register the objects the snapshot does not know.")
    p.add_argument("-c", "--config", default=os.environ.get("CLOUDMANAGERD_CONFIG", DEFAULT_CONFIG_PATH),
                   help=f"config file (default {DEFAULT_CONFIG_PATH})")
    p.add_argument("--force", action="store_true",
                   help="replace an existing catalog (it is kept beside, as <catalog>.before-restore-<time>)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    config = load_or_report(args.config)
    if config is None:
        return 1
    try:
        with _state_lock(config):
            summary = restore(config, args.force)
    except (Refused, CloudManagerError) as exc:
        say(str(exc))
        return 1
    except OSError as exc:
        say(explain_oserror(exc, exc.filename or "restore"))
        return 1
    except sqlite3.Error as exc:
        say(f"catalog {catalog_sqlite_path(config.catalog)}: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted: run restore again (with --force if it said the snapshot was installed)")
        return 130
    for line in summary:
        print(line)
    return 0


@contextlib.contextmanager
def _state_lock(config: Config) -> Iterator[None]:
    """The daemon's own lock on its state folder, held for the whole restore: refused while a daemon
    runs, and no daemon starts in the middle of it."""
    try:
        os.makedirs(config.state, exist_ok=True)
        fd = os.open(os.path.join(config.state, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _owned_like_folder(os.path.join(config.state, "lock"))
    except OSError as exc:
        raise Refused(f"state {config.state}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Refused(f"cloudmanagerd (or another restore) is running with state {config.state}: stop it "
                              "first (systemctl stop cloudmanagerd), then run restore again") from None
            raise
        if _answers(config.control.socket):
            raise Refused(f"a cloudmanagerd answers on {config.control.socket}: stop it first, then run "
                          "restore again")
        yield
    finally:
        os.close(fd)


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def restore(config: Config, force: bool) -> list[str]:
    path = catalog_sqlite_path(config.catalog)
    if path is None:
        raise Refused("the catalog is a PostgreSQL database: restore it with PostgreSQL's own tools "
                      "(pg_restore from a pg_dump, or a pg_basebackup); see the README")
    if _exists(path) and not force:
        raise Refused(f"catalog {path} exists: restore would replace it; run again with --force to replace it "
                      "(the current file is kept as " + os.path.basename(path) + ".before-restore-<time>)")
    try:
        remotes = build_remotes(config.remotes)
    except StartupError as exc:
        raise Refused(str(exc)) from None
    try:
        folder = os.path.dirname(path) or "."
        try:
            os.makedirs(folder, exist_ok=True)
        except FileExistsError:
            raise Refused(f"catalog folder {folder} is a file, not a folder (fix catalog: in the config)") from None
        _clear_leftovers(folder)
        snap, where, tmp = _newest_good(remotes, config.node, folder)
        kept = _install(tmp, path)
        if kept:
            say(f"the previous catalog is kept as {kept}")
        say(f"installed snapshot {snap.name} ({snap.stamp}) from remote {where} as {path}")
        catalog = Catalog.open(f"sqlite:///{path}", config.node)
        try:
            return _rebuild(catalog, config, remotes, snap, where)
        finally:
            catalog.close()
    finally:
        for remote in remotes.values():
            remote.close()


def _clear_leftovers(folder: str) -> None:
    """Temp files of a restore that was killed (we hold the state lock: no other restore runs)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".restore-") and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _owned_like_folder(path: str) -> None:
    """Run as root for a daemon that runs as its own user (the service's `cloudmanager`), a file this
    makes must belong to that user, or the daemon could not write it: the owner of its folder."""
    if os.geteuid() != 0:
        return
    st = os.stat(os.path.dirname(path) or ".")
    if st.st_uid != 0:
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)


def _exists(path: str) -> bool:
    return any(os.path.lexists(path + suffix) for suffix in ("", "-wal", "-journal"))


def _newest_good(remotes: dict[str, Any], node: str, folder: str) -> tuple[Snapshot, str, str]:
    """The newest snapshot that passes every check, downloaded and decompressed into a temp file
    beside the catalog: (snapshot, remote, temp path)."""
    candidates: list[tuple[Snapshot, str]] = []
    for name, remote in remotes.items():
        if not supports(remote):
            say(f"remote {name} ({remote.kind}) cannot hold catalog snapshots: skipped")
            continue
        try:
            found = listed(remote, node)
        except RemoteError as exc:
            say(f"remote {name}: cannot list catalog snapshots: {exc}")
            continue
        say(f"remote {name}: {len(found)} catalog snapshot(s) of node {node}"
            + (f", newest {found[0].stamp}" if found else ""))
        candidates += [(s, name) for s in found]
    candidates.sort(key=lambda c: (c[0].when, c[0].name), reverse=True)
    for snap, name in candidates:
        try:
            return snap, name, _fetch(remotes[name], node, snap, folder)
        except SchemaTooNew as exc:
            raise Refused(f"snapshot {snap.name} on remote {name} was made by a newer cloudmanagerd (catalog schema "
                          f"{exc.version}, this one reads up to {SCHEMA_VERSION}): upgrade cloudmanagerd, then run "
                          "restore again (an older snapshot would lose the names added since)") from None
        except BadSnapshot as exc:
            say(f"snapshot {snap.name} on remote {name} is not usable ({exc}); trying the next older")
        except RemoteError as exc:
            say(f"snapshot {snap.name} on remote {name} could not be read ({exc}); trying the next older")
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise Refused(f"snapshot {snap.name} on remote {name} ({snap.size} bytes compressed) does not fit in "
                          f"{folder} once decompressed: free room there, then run restore again (a snapshot "
                          "cloudmanagerd did not make can be deleted from the remote)") from None
    others = sorted(_other_nodes(remotes, node))
    if others:
        raise Refused(f"no usable catalog snapshot of node {node!r} on any remote; there are snapshots of "
                      f"node(s) {', '.join(others)}: set `node:` in the config to the lost machine's name "
                      "(it defaults to the hostname)")
    raise Refused(f"no usable catalog snapshot of node {node!r} on any remote (snapshots are made when "
                  "catalog_backup is on; is `node:` the same as on the lost machine?)")


def _other_nodes(remotes: dict[str, Any], node: str) -> set[str]:
    """The nodes that have snapshots on the remotes, by their folder names (for the hint)."""
    found: set[str] = set()
    for remote in remotes.values():
        if callable(getattr(remote, "list_snapshot_folders", None)):
            with contextlib.suppress(RemoteError):
                found |= {unquote(name) for name in remote.list_snapshot_folders(RESERVED)}
    return found - {node}


def _fetch(remote: Any, node: str, snap: Snapshot, folder: str) -> str:
    """Download, verify the SHA-256 of the name, decompress and check the database; the temp path."""
    with tempfile.TemporaryFile(dir=folder, prefix=".restore-") as gz:
        remote.get_snapshot(f"{node_folder(node)}/{snap.name}", gz.fileno())
        gz.seek(0)
        digest = sha256_fd(gz.fileno())
        if digest != snap.digest:
            raise BadSnapshot(f"its bytes hash to {digest[:12]}..., not to the {snap.digest[:12]}... of its name")
        gz.seek(0)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".restore-", suffix=".sqlite3")
        try:
            with open(fd, "wb") as out:
                try:
                    with gzip.GzipFile(fileobj=gz, mode="rb") as src:
                        # its first bytes say whether it is a database at all: a planted gzip of
                        # something else (a bomb of zeros) must not fill the disk before it is judged
                        head = src.read(len(SQLITE_MAGIC))
                        if head != SQLITE_MAGIC:
                            raise BadSnapshot("it is not a SQLite database")
                        out.write(head)
                        shutil.copyfileobj(src, out, 1 << 20)
                except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                    raise BadSnapshot(f"it does not decompress: {exc}") from None
                out.flush()
                os.fsync(out.fileno())
            try:
                # SQLite's own check of every page, and the schema brought up to this version
                Catalog.open(f"sqlite:///{tmp}", node, create=False).close()
            except SchemaTooNew:
                raise  # a good snapshot this version cannot read: not a reason to take an older one
            except StartupError as exc:
                raise BadSnapshot(str(exc)) from None
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp + suffix)  # empty after the last connection closed
        except BaseException:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp + suffix)
            raise
    return tmp


def _install(tmp: str, path: str) -> str | None:
    """Put the restored file in the catalog's place atomically; a catalog already there (with its WAL,
    which must never meet the new file) is moved aside first. Returns where the old one went."""
    folder = os.path.dirname(path) or "."
    kept = None
    if _exists(path):
        stamp = f"{path}.before-restore-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        kept, n = stamp, 1
        # a second restore within the second must not rename over the one the first kept
        while _exists(kept) or os.path.lexists(kept + "-shm"):
            kept, n = f"{stamp}.{n}", n + 1
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(path + suffix, kept + suffix)
    _owned_like_folder(tmp)
    os.rename(tmp, path)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return kept


def _rebuild(catalog: Catalog, config: Config, remotes: dict[str, Any], snap: Snapshot, where: str) -> list[str]:
    now = time.time()
    files = catalog.counts(config.upload.min_redundancy, config.upload.redundancy)["files"]
    say(f"the snapshot knows {files} file(s)")
    catalog.release_node_name(now)
    kept, dropped = _reconcile_cache(catalog, config.cache.path)
    say(f"cache: {kept} object(s) still in {config.cache.path} and verified, {dropped} evicted (not there)")
    adopted = {"files": 0, "copies": 0, "conflicts": 0}
    missing = 0
    unlisted: list[str] = []
    for name, remote in remotes.items():
        if not callable(getattr(remote, "list_objects", None)):
            say(f"remote {name} ({remote.kind}) cannot be listed: its objects are known only from the snapshot")
            continue
        try:
            found = dict(remote.list_objects())
        except RemoteError as exc:
            say(f"remote {name}: cannot list its objects ({exc}); files it got after the snapshot are not "
                "adopted from it (run restore --force again once it answers)")
            unlisted.append(name)
            continue
        known = catalog.good_copies_on(name)
        gone = sorted(known - set(found))
        if gone:
            missing += catalog.mark_copies_missing(name, gone, "missing at restore: not in the remote's listing", now)
        new = sorted(h for h in found if h not in known)
        counts = {"files": 0, "copies": 0, "conflicts": 0}
        for i in range(0, len(new), ADOPT_CHUNK):
            chunk = [(h, found[h], remote.object_url(h)) for h in new[i:i + ADOPT_CHUNK]]
            done, conflicted = catalog.adopt_objects(name, chunk, now)
            settled = _settle(catalog, name, remote, conflicted, now)
            done["conflicts"] -= settled
            done["copies"] += settled
            for key, value in done.items():
                counts[key] += value
        for key, value in counts.items():
            adopted[key] += value
        say(f"remote {name}: {len(found)} object(s); {counts['copies']} copies recorded "
            f"({counts['files']} new file(s) named by their hash), {len(gone)} recorded copies missing"
            + (f", {counts['conflicts']} of another size than the catalog says (not recorded)"
               if counts["conflicts"] else ""))
    # files left with no good copy anywhere: their bytes were only on the lost disk (or on a remote
    # not listed); the daemon keeps them listed, below min_redundancy, until `rm` or a copy turns up
    lost = catalog.counts(1, 1)["below_min"]
    lines = [f"restored {files} file(s) from snapshot {snap.name} ({snap.stamp}, remote {where})",
             f"adopted {adopted['files']} object(s) the snapshot did not know (named by their hash), "
             f"{adopted['copies']} copies recorded in all",
             f"copies missing: {missing} (marked bad; the daemon copies those files again)",
             f"cache: {kept} kept, {dropped} evicted"]
    if lost:
        lines.append(f"without a copy: {lost} file(s) have no good copy on any remote (their bytes were only on "
                     "the lost disk; they stay listed below min_redundancy until `cloudmanagerctl rm HASH`)")
    if adopted["conflicts"]:
        lines.append(f"conflicts: {adopted['conflicts']} object(s) of another size than the catalog says "
                     "(not recorded; `verify --remotes` checks them)")
    if unlisted:
        lines.append(f"not listed: {', '.join(unlisted)} (run restore --force again once reachable)")
    return lines


def _settle(catalog: Catalog, name: str, remote: Any, conflicted: list[str], now: float) -> int:
    """Objects listed with another size than the catalog's are read back: one that hashes to its name
    is the truth (the catalog's size came from another remote's listing of a copy cut short), and is
    recorded; the others stay unrecorded. Returns how many were recorded."""
    settled = 0
    for h in conflicted:
        url = remote.object_url(h)
        try:
            digest, size = read_back(remote, h, url)
        except RemoteError as exc:
            say(f"remote {name}: cannot read {h[:12]}... back ({exc}); its copy is not recorded")
            continue
        if digest == h:
            catalog.settle_size(h, size, name, url, now)
            settled += 1
            say(f"remote {name}: {h[:12]}... read back whole ({size} bytes): recorded; a copy of another size "
                "on another remote is marked bad")
    return settled


def _reconcile_cache(catalog: Catalog, cache_path: str) -> tuple[int, int]:
    """This node's cache entries: kept when the object is in the cache folder and hashes to its name,
    dropped otherwise (the daemon fetches a file back when it is asked for)."""
    kept = dropped = 0
    after = ""
    try:
        root: int | None = fsutil.open_root(cache_path)
    except OSError:
        root = None  # the cache folder is gone with the disk: the daemon makes a new one
    try:
        while entries := catalog.cached_entries(after, 1000):
            after = entries[-1][0]
            gone = [h for h, size in entries if root is None or not _intact(root, h, size)]
            if gone:
                catalog.drop_cache_entries(gone)
            dropped += len(gone)
            kept += len(entries) - len(gone)
    finally:
        if root is not None:
            os.close(root)
    return kept, dropped


def _intact(root: int, h: str, size: int) -> bool:
    try:
        with fsutil.subdir(root, [h[:2].encode()]) as folder:
            fd = os.open(h, fsutil.O_READ_FILE, dir_fd=folder)
    except OSError:
        return False
    try:
        return os.fstat(fd).st_size == size and sha256_fd(fd) == h
    finally:
        os.close(fd)
