"""What only the SQLite backend has: migrations from old files, its transaction helper on a real
file seen from a second connection (as another process would), WAL and durability settings."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmanagerd.catalog import MIGRATIONS, SCHEMA_VERSION, Catalog, IngestRecord
from cloudmanagerd.catalog import sqlite as sqlite_backend
from cloudmanagerd.catalog.sqlite import BUSY_TIMEOUT_MS
from cloudmanagerd.errors import NotFound

from conftest import wait_for
from test_catalog import T0, fake_hash, register


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "catalog.db"


@pytest.fixture
def catalog(db_path: Path) -> Iterator[Catalog]:
    c = Catalog.open(f"sqlite:///{db_path}", "node1")
    yield c
    c.close()


@contextlib.contextmanager
def raw(db_path: Path, timeout: float = 5.0) -> Iterator[sqlite3.Connection]:
    """A separate connection to the same file, as another process would have; committed and closed."""
    conn = sqlite3.connect(db_path, timeout=timeout)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def test_the_file_holds_every_table_and_the_version(catalog: Catalog, db_path: Path) -> None:
    with raw(db_path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    assert {"meta", "files", "ingests", "cache_entries", "uploads", "copies", "remote_stats", "transfer",
            "nodes"} <= tables
    assert version == str(SCHEMA_VERSION)


def test_a_version_1_catalog_is_upgraded_in_place_keeping_its_data(db_path: Path) -> None:
    # the database the first release wrote: migration 1 only, one file with a copy
    h = fake_hash("0ld0ld")
    db_path.parent.mkdir(parents=True)
    with raw(db_path) as conn:
        for statement in MIGRATIONS[0].split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '1')")
        conn.execute("INSERT INTO files(hash, name, size, added) VALUES (?, ?, 5, ?)", (h, b"old.txt", T0))
        conn.execute("INSERT INTO cache_entries(hash, node, size, last_used) VALUES (?, 'node1', 5, ?)", (h, T0))
        conn.execute("INSERT INTO copies(hash, remote, url, created) VALUES (?, 'r0', 'u', ?)", (h, T0))
    catalog = Catalog.open(f"sqlite:///{db_path}", "node1")
    try:
        assert catalog.schema_version() == SCHEMA_VERSION
        info = catalog.file_info(h)
        assert (info["name"], info["size"], info["cached"]) == (b"old.txt", 5, True)
        assert info["copies"] == [{"remote": "r0", "url": "u"}]
        register(catalog, fake_hash("new000"))  # and the upgraded schema takes new files
        assert len(catalog.list_files()) == 2
    finally:
        catalog.close()



def test_a_newer_schema_is_refused_with_a_clear_error(catalog: Catalog, db_path: Path) -> None:
    register(catalog, fake_hash("aaaaaa"))
    catalog.close()
    newer = SCHEMA_VERSION + 5
    with raw(db_path) as conn:
        conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(newer),))
    with pytest.raises(Exception) as info:
        Catalog.open(f"sqlite:///{db_path}", "node1")
    message = str(info.value)
    assert str(newer) in message and "newer" in message and "upgrade" in message
    assert "\n" not in message
    # and nothing was touched
    with raw(db_path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(newer)
        assert conn.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 1



def test_tx_commits_on_success(catalog: Catalog, db_path: Path) -> None:
    with catalog.db.tx() as conn:
        conn.execute("INSERT INTO meta(key, value) VALUES ('k', 'v')")
    with raw(db_path) as other:  # visible to another connection: committed
        assert other.execute("SELECT value FROM meta WHERE key='k'").fetchone() == ("v",)



def test_tx_rolls_back_on_an_exception(catalog: Catalog, db_path: Path) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with catalog.db.tx() as conn:
            conn.execute("INSERT INTO meta(key, value) VALUES ('k1', 'v')")
            conn.execute("INSERT INTO files(hash, name, size, added) VALUES ('x', x'00', 1, 0)")
            raise Boom()
    with raw(db_path) as other:
        assert other.execute("SELECT COUNT(*) FROM meta WHERE key='k1'").fetchone()[0] == 0
        assert other.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 0
    # the connection is usable afterwards: no transaction left open
    assert not catalog.db.connection().in_transaction
    with catalog.db.tx() as conn:
        conn.execute("INSERT INTO meta(key, value) VALUES ('k2', 'v')")
    with raw(db_path) as other:
        assert other.execute("SELECT COUNT(*) FROM meta WHERE key='k2'").fetchone()[0] == 1



def test_a_failing_statement_rolls_back_the_whole_batch(catalog: Catalog) -> None:
    h = fake_hash("bbbbbb")
    good = IngestRecord(h, b"good", 1)
    with pytest.raises(sqlite3.Error):
        with catalog.db.tx() as conn:
            conn.execute("INSERT INTO files(hash, name, size, added) VALUES (?, ?, 1, 0)", (h, b"good"))
            conn.execute("INSERT INTO files(hash, name, size, added) VALUES (?, ?, 1, 0)", (h, b"dup"))
    with pytest.raises(NotFound):
        catalog.file_info(h)
    catalog.finish_ingest([good], [], T0)
    assert catalog.file_info(h)["name"] == b"good"



def test_wal_journal_and_busy_timeout_are_set(catalog: Catalog, db_path: Path) -> None:
    conn = catalog.db.connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS >= 1000
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a commit is on disk
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    # WAL is a property of the file: every other connection sees it too
    with raw(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"



def test_a_reader_is_not_blocked_by_a_writer(catalog: Catalog, db_path: Path) -> None:
    register(catalog, fake_hash("cccccc"))
    with catalog.db.tx() as conn:
        conn.execute("INSERT INTO meta(key, value) VALUES ('w', 'x')")
        # while the write transaction is open, another connection still reads (WAL)
        with raw(db_path, timeout=0) as other:
            assert other.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 1
            assert other.execute("SELECT COUNT(*) FROM meta WHERE key='w'").fetchone()[0] == 0




def test_a_foreground_writer_goes_before_waiting_upload_writers(catalog: Catalog) -> None:
    """Upload threads (relaxed durability) committing back to back must not hold up ingest's commits:
    SQLite's own busy handler sleeps up to 100 ms between tries, which made single drops wait 60-150 ms."""
    gate = catalog.db._gate
    order: list[str] = []
    release = threading.Event()

    def write(name: str, background: bool, hold: threading.Event | None = None) -> None:
        if background:
            catalog.relax_durability()
        with catalog.db.tx() as conn:
            order.append(name)
            conn.execute("INSERT INTO meta(key, value) VALUES (?, 'x')", (name,))
            if hold is not None:
                hold.wait(10)
        catalog.db.release()

    first = threading.Thread(target=write, args=("upload-1", True, release))
    first.start()
    wait_for(lambda: order == ["upload-1"], timeout=10)
    second = threading.Thread(target=write, args=("upload-2", True))
    second.start()
    wait_for(lambda: gate.waiting[True] == 1, timeout=10)
    ingest = threading.Thread(target=write, args=("ingest", False))
    ingest.start()
    wait_for(lambda: gate.waiting[False] == 1, timeout=10)
    release.set()
    for t in (first, second, ingest):
        t.join(10)
    assert order == ["upload-1", "ingest", "upload-2"]
    assert {k for (k,) in catalog.db.connection().execute("SELECT key FROM meta WHERE value='x'")} == \
        {"upload-1", "upload-2", "ingest"}


@contextlib.contextmanager
def gate_held_by_another_thread(catalog: Catalog, timeout: float) -> Iterator[None]:
    """Another thread holds the write gate (in a transaction) until the block ends; waiting for it
    times out after `timeout` seconds."""
    catalog.db._gate.timeout = timeout
    release = threading.Event()

    def hold() -> None:
        with catalog.db.tx():
            release.wait(10)
        catalog.db.release()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        wait_for(lambda: catalog.db._gate._owner is not None, timeout=10)
        yield
    finally:
        release.set()
        holder.join(10)


def test_a_thread_that_cannot_get_the_write_lock_gets_the_busy_error(catalog: Catalog) -> None:
    with gate_held_by_another_thread(catalog, 0.2):
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            with catalog.db.tx():
                pass
    with catalog.db.tx() as conn:  # free again: the failed attempt left nothing held
        conn.execute("INSERT INTO meta(key, value) VALUES ('after', 'y')")


@pytest.mark.parametrize("background", [True, False])
def test_the_wal_stays_small_while_writers_commit(catalog: Catalog, db_path: Path, background: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon checkpoints the WAL itself, outside the write gate (SQLite's autocheckpoint ran inside a
    COMMIT): an upload thread after a few thousand rows, the ingest alone after four times as many."""
    monkeypatch.setattr(sqlite_backend, "CHECKPOINT_ROWS", 400)  # small, for a quick test
    if background:
        catalog.relax_durability()
    assert catalog.db.connection().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    for i in range(600):
        with catalog.db.tx() as conn:
            conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                             [(f"k{i}-{j}", "x" * 200) for j in range(100)])
    written = 600 * 100 * 200
    assert Path(f"{db_path}-wal").stat().st_size < written / 8
    with raw(db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'").fetchone()[0] == 60000


def test_a_transaction_that_fails_in_one_thread_leaves_the_write_lock_free_for_the_others(catalog: Catalog) -> None:
    catalog.db._gate.timeout = 2.0  # a gate left held would fail the second thread, not hang it
    failed: list[BaseException] = []

    def fail() -> None:
        try:
            with catalog.db.tx() as conn:
                conn.execute("INSERT INTO meta(key, value) VALUES ('lost', 'x')")
                raise KeyboardInterrupt  # not even an Exception
        except BaseException as exc:
            failed.append(exc)
        finally:
            catalog.db.release()

    t = threading.Thread(target=fail)
    t.start()
    t.join(10)
    assert len(failed) == 1 and isinstance(failed[0], KeyboardInterrupt)
    with catalog.db.tx() as conn:
        conn.execute("INSERT INTO meta(key, value) VALUES ('kept', 'y')")
    keys = {k for (k,) in catalog.db.connection().execute("SELECT key FROM meta")}
    assert "kept" in keys and "lost" not in keys


def test_an_upload_writer_is_not_starved_by_a_foreground_writer_committing_back_to_back(catalog: Catalog) -> None:
    """A foreground writer (the ingest over a big drop, a command loop) that calls tx() again at once
    after its commit must not keep an upload thread out until the busy timeout: the waiter woken by a
    release is handed the gate, not raced for it (it lost every race and failed 'database is locked')."""
    catalog.db._gate.timeout = 3.0  # starved, the upload fails after this instead of after 30 s
    done = threading.Event()
    outcome: list[BaseException | None] = []

    def upload() -> None:
        catalog.relax_durability()
        try:
            with catalog.db.tx() as conn:
                conn.execute("INSERT INTO meta(key, value) VALUES ('upload', 'x')")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            done.set()
            catalog.db.release()

    commits = 0
    with catalog.db.tx() as conn:  # the upload thread arrives while the foreground holds the gate
        conn.execute("INSERT INTO meta(key, value) VALUES ('f-first', 'x')")
        t = threading.Thread(target=upload)
        t.start()
        wait_for(lambda: catalog.db._gate.waiting[True] == 1, timeout=10)
    while not done.is_set() and commits < 100_000:
        with catalog.db.tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('f', ?)", (str(commits),))
        commits += 1
    t.join(10)
    assert outcome == [None], f"the upload writer failed after {commits} foreground commits: {outcome}"


def test_an_upload_writer_gets_its_turn_behind_several_foreground_writers(catalog: Catalog) -> None:
    """Foreground writers go first, but not forever: with two of them always waiting (ingest and a
    command loop), an upload thread is still let in within a few of their turns."""
    catalog.db._gate.timeout = 3.0
    stop = threading.Event()
    outcome: list[BaseException | None] = []

    def foreground(name: str) -> None:
        try:
            while not stop.is_set():
                with catalog.db.tx() as conn:
                    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, 'x')", (name,))
        finally:
            catalog.db.release()

    def upload() -> None:
        catalog.relax_durability()
        try:
            for i in range(20):
                with catalog.db.tx() as conn:
                    conn.execute("INSERT INTO meta(key, value) VALUES (?, 'x')", (f"upload-{i}",))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            catalog.db.release()

    writers = [threading.Thread(target=foreground, args=(f"f{i}",)) for i in range(3)]
    for t in writers:
        t.start()
    up = threading.Thread(target=upload)
    up.start()
    up.join(60)
    stop.set()
    for t in writers:
        t.join(10)
    assert outcome == [None]


def test_a_writer_interrupted_while_it_waits_at_the_gate_leaves_it_to_the_others(catalog: Catalog) -> None:
    """A signal (KeyboardInterrupt, a stop) that ends a wait at the gate takes the waiter out of the
    queue: the gate is never handed to a thread that left, to be held by nobody for good."""
    import signal

    class Stop(Exception):
        pass

    def raise_stop(signum: int, frame: object) -> None:
        raise Stop()

    previous = signal.signal(signal.SIGUSR1, raise_stop)
    main = threading.get_ident()
    try:
        with gate_held_by_another_thread(catalog, 5.0):

            def interrupt() -> None:
                wait_for(lambda: catalog.db._gate.waiting[False] == 1, timeout=10)
                signal.pthread_kill(main, signal.SIGUSR1)

            kicker = threading.Thread(target=interrupt)
            kicker.start()
            with pytest.raises(Stop):
                with catalog.db.tx():
                    pass
            kicker.join(10)
            assert catalog.db._gate.waiting[False] == 0
    finally:
        signal.signal(signal.SIGUSR1, previous)
    done: list[bool] = []

    def write() -> None:
        with catalog.db.tx() as conn:
            conn.execute("INSERT INTO meta(key, value) VALUES ('after', 'y')")
        done.append(True)
        catalog.db.release()

    t = threading.Thread(target=write)
    t.start()
    t.join(10)
    assert done == [True]


def test_a_transaction_opened_within_another_on_one_thread_is_refused_and_commits_nothing(catalog: Catalog) -> None:
    """tx() within tx() (a catalog method called inside another's transaction) must not roll the outer
    one back and commit the inner alone: half of a change on disk. It is refused; the whole is rolled back."""
    with pytest.raises(RuntimeError, match="within another"):
        with catalog.db.tx() as conn:
            conn.execute("INSERT INTO meta(key, value) VALUES ('outer', 'x')")
            with catalog.db.tx() as inner:
                inner.execute("INSERT INTO meta(key, value) VALUES ('inner', 'x')")
    assert catalog.db.connection().execute(
        "SELECT COUNT(*) FROM meta WHERE key IN ('outer', 'inner')").fetchone()[0] == 0
    with catalog.db.tx() as conn:  # and the gate is free again
        conn.execute("INSERT INTO meta(key, value) VALUES ('after', 'x')")


def test_a_checkpoint_held_back_by_a_reader_is_tried_again_soon_after(catalog: Catalog, db_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader (a long `ls` stream, a snapshot) holding old pages when a checkpoint runs leaves it
    unfinished; the next try must not wait for the full count of rows again, or the WAL grows by all of
    them each time a reader happens to be there (SQLite's own autocheckpoint tried at every commit)."""
    monkeypatch.setattr(sqlite_backend, "CHECKPOINT_ROWS", 400)  # the ingest alone: every 1,600 rows
    wal = Path(f"{db_path}-wal")

    def write(rows: int) -> None:
        for i in range(rows // 20):
            with catalog.db.tx() as conn:
                conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                 [(f"k{i}-{j}", "x" * 300) for j in range(20)])

    write(1600)  # a first checkpoint, finished: the WAL starts again from its beginning
    reader = sqlite3.connect(db_path)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM meta").fetchone()  # holds its snapshot through the checkpoint
        write(1600)
    finally:
        reader.close()
    held = wal.stat().st_size
    write(1400)  # less than a full count of rows: the checkpoint tried again finishes, the WAL is reused
    assert wal.stat().st_size < held * 1.2  # (the WAL had grown by the 1,400 rows: 2.9 -> 5.6 MB)


def test_a_process_that_writes_a_little_and_closes_leaves_no_wal_to_grow(catalog: Catalog, db_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An API script (or `cloudmanagerd restore`, a second node) writing fewer rows than a checkpoint's
    count beside a daemon that writes nothing (no remotes): each run's rows stayed in the WAL, which
    grew with every run, since SQLite's autocheckpoint is off and the closing connection is not the last."""
    monkeypatch.setattr(sqlite_backend, "CHECKPOINT_ROWS", 400)
    wal = Path(f"{db_path}-wal")
    catalog.db.connection()  # the daemon's connection stays open throughout
    sizes = []
    for run in range(5):
        script = Catalog.open(f"sqlite:///{db_path}", "node1")
        try:
            for i in range(30):
                with script.db.tx() as conn:
                    conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                     [(f"r{run}-{i}-{j}", "x" * 300) for j in range(40)])  # 1,200 rows a run
        finally:
            script.close()
        sizes.append(wal.stat().st_size)
    assert sizes[-1] < 2 * sizes[0], sizes


def _busy() -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database is locked")
    exc.sqlite_errorcode = sqlite3.SQLITE_BUSY
    return exc


def test_a_lock_sqlite_refuses_at_once_while_opening_is_tried_again(tmp_path: Path, monkeypatch) -> None:
    """Several nodes opening a new file together: SQLite may answer "locked" at once instead of waiting
    (where a wait could deadlock). The start tries again and opens the catalog, instead of failing."""
    real = sqlite_backend.SqliteDatabase.check
    calls: list[int] = []

    def check_locked_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise _busy()
        return real(self)

    monkeypatch.setattr(sqlite_backend.SqliteDatabase, "check", check_locked_once)
    catalog = Catalog.open(f"sqlite:///{tmp_path}/catalog.db", "node1")
    try:
        assert len(calls) == 2 and catalog.schema_version() == SCHEMA_VERSION
    finally:
        catalog.close()


def test_a_lock_that_stays_is_reported_after_three_tries(tmp_path: Path, monkeypatch) -> None:
    from cloudmanagerd.errors import StartupError

    calls: list[int] = []

    def always_locked(self):
        calls.append(1)
        raise _busy()

    monkeypatch.setattr(sqlite_backend.SqliteDatabase, "check", always_locked)
    with pytest.raises(StartupError, match="locked"):
        Catalog.open(f"sqlite:///{tmp_path}/catalog.db", "node1")
    assert len(calls) == 3
