"""Tests for cloudmanagerd.config: units, defaults, every error message, the sample file."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re
from pathlib import Path
from typing import Any

import pytest

from cloudmanagerd.config import (
    CacheConfig,
    Config,
    ConfigError,
    RemoteConfig,
    catalog_sqlite_path,
    config_from_mapping,
    format_duration,
    load_config,
    parse_duration,
    parse_rate,
    parse_remotes,
    parse_size,
)

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "config.yaml"
BASE = "/etc/cloudmanagerd"


def minimal(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"inbox": "/srv/cm/inbox", "cache": {"path": "/srv/cm/cache", "capacity": "1GiB"}}
    data.update(extra)
    return data


def directory(name: str, path: str | None = None) -> dict[str, Any]:
    return {"name": name, "type": "directory", "path": path or f"/mnt/{name}"}


def build(data: Any, environ: dict[str, str] | None = None, base_dir: str = BASE) -> Config:
    return config_from_mapping(data, base_dir=base_dir, environ=environ or {}, hostname="node-1")


def errors_of(data: Any, environ: dict[str, str] | None = None) -> list[str]:
    """The error lines for a bad config, checking the shape every message shares."""
    with pytest.raises(ConfigError) as caught:
        build(data, environ)
    errors = caught.value.errors
    assert errors, "a ConfigError without errors"
    assert str(caught.value) == "\n".join(errors)
    for line in errors:
        assert "\n" not in line
        assert re.match(r"^[\w.\[\]]+: \S", line), line
    return errors


def only_error(data: Any, key: str) -> str:
    errors = errors_of(data)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{key}: "), errors
    return errors[0]


# --- sizes, durations, rates -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500MB", 500 * 10**6),
        ("500MiB", 500 * 2**20),
        ("20GiB", 20 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("4KiB", 4096),
        ("10kB", 10_000),
        ("10K", 10_000),
        ("2T", 2 * 10**12),
        ("1TiB", 2**40),
        ("7B", 7),
        (" 5 MiB ", 5 * 2**20),
        ("123", 123),
        (123, 123),
        (0, 0),
        (1e9, 10**9),
    ],
)
def test_parse_size(text: Any, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "", "MB", "5XB", "5 M B", "1e9", None, [], True, float("nan")])
def test_parse_size_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match="expected a size like 20GiB"):
        parse_size(text)


@pytest.mark.parametrize("text", ["-5MB", -1])
def test_parse_size_rejects_negative_readably(text: Any) -> None:
    with pytest.raises(ValueError, match=r"got .*-.*cannot be negative"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("6h", 21600.0),
        ("1d", 86400.0),
        ("250ms", 0.25),
        ("1h30m", 5400.0),
        ("2 min", 120.0),
        ("90", 90.0),
        (45, 45.0),
        (1.5, 1.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: Any, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["soon", "", "5x", "s", "5 parsecs", "1h-5m", None, True, float("inf")])
def test_parse_duration_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match="expected a duration like 30s"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["-1s", -1, "-0.5"])
def test_parse_duration_rejects_negative(text: Any) -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64KiB/s", 65536.0),
        ("1GiB/h", 2**30 / 3600),
        ("10MB/s", 10e6),
        ("1.5KiB/s", 1536.0),
        ("0", 0.0),
        (0, 0.0),
        ("0B/s", 0.0),
    ],
)
def test_parse_rate(text: Any, expected: float) -> None:
    assert parse_rate(text) == pytest.approx(expected)


def test_parse_rate_needs_a_period() -> None:
    with pytest.raises(ValueError, match=r"'64KiB'.*/s"):
        parse_rate("64KiB")
    with pytest.raises(ValueError, match="/s"):
        parse_rate(100)


@pytest.mark.parametrize("text", ["5MB/fortnight", "fast", "/s", "-1MB/s", True, None])
def test_parse_rate_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match="expected a rate like 64KiB/s"):
        parse_rate(text)


@pytest.mark.parametrize(("seconds", "text"), [(30, "30s"), (600, "10m"), (21600, "6h"), (86400, "1d"), (0.25, "250ms"), (90, "90s")])
def test_format_duration_reads_back(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


# --- defaults --------------------------------------------------------------------------


def test_defaults() -> None:
    config = build(minimal())
    assert config.inbox == "/srv/cm/inbox"
    assert config.cache == CacheConfig(path="/srv/cm/cache", capacity=2**30, scrub=pytest.approx(2**30 / 3600))
    assert config.state == "/var/lib/cloudmanagerd"
    assert config.catalog == "sqlite:////var/lib/cloudmanagerd/catalog.sqlite3"
    assert config.node == "node-1"
    assert (config.control.socket, config.control.mode, config.control.group) == (
        "/run/cloudmanagerd/control.sock", 0o660, None)
    assert config.ingest.settle == 2.0
    assert config.ingest.observer == "inotify"
    assert config.ingest.rescan == 600.0
    assert config.ingest.ignore == (".*", "*.part", "*.tmp", "*~")
    assert config.ingest.rejected == "/srv/cm/rejected"
    assert config.upload.redundancy == config.upload.min_redundancy == 0
    assert config.upload.concurrency == 4
    assert (config.upload.retry.initial, config.upload.retry.max, config.upload.retry.max_attempts) == (30.0, 21600.0, 0)
    assert config.upload.stall == 60.0
    assert config.upload.min_rate == 65536.0
    assert config.cluster.lease == 60.0
    assert config.log.level == "info"
    assert config.remotes == ()
    assert config.source is None


def test_empty_sections_take_the_defaults() -> None:
    # "ingest:" with every key below commented out is YAML null.
    config = build(minimal(ingest=None, upload={"retry": None}, control=None, log=None, remotes=None))
    assert config == build(minimal())


def test_state_from_state_directory() -> None:
    config = build(minimal(), environ={"STATE_DIRECTORY": "/var/lib/cm-a:/var/lib/cm-b"})
    assert config.state == "/var/lib/cm-a"
    assert config.catalog == "sqlite:////var/lib/cm-a/catalog.sqlite3"


def test_explicit_state_wins_over_the_environment() -> None:
    config = build(minimal(state="/data/state"), environ={"STATE_DIRECTORY": "/var/lib/x"})
    assert config.catalog == "sqlite:////data/state/catalog.sqlite3"


def test_socket_from_runtime_directory() -> None:
    environ = {"RUNTIME_DIRECTORY": "/run/cm:/run/other"}
    assert build(minimal(), environ=environ).control.socket == "/run/cm/control.sock"
    given = minimal(control={"socket": "/tmp/cm.sock"})
    assert build(given, environ=environ).control.socket == "/tmp/cm.sock"


@pytest.mark.parametrize(("count", "redundancy"), [(0, 0), (1, 1), (3, 2)])
def test_redundancy_default(count: int, redundancy: int) -> None:
    config = build(minimal(remotes=[directory(f"r{i}") for i in range(count)]))
    assert config.upload.redundancy == redundancy
    assert config.upload.min_redundancy == redundancy


def test_node_defaults_to_the_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "storage-7")
    assert config_from_mapping(minimal(), base_dir=BASE, environ={}).node == "storage-7"


def test_a_node_name_with_a_slash_is_refused() -> None:
    # "node/api/pid" owns a script's upload claims: a node named like that would own them
    errors = errors_of({**minimal(), "node": "a/api/1"})
    assert len(errors) == 1 and errors[0].startswith("node: must not contain '/'"), errors


def test_a_remote_place_names_where_its_copies_live() -> None:
    config = build(minimal(remotes=[directory("nas"),
                                    {"name": "s3", "type": "s3", "bucket": "b", "prefix": "p/",
                                     "endpoint": "http://127.0.0.1:8333/"}]))
    nas, s3 = config.remotes
    assert nas.place == f"directory {nas.get('path')}"
    assert s3.place == "s3://b/p/ at http://127.0.0.1:8333"  # a trailing slash is the same endpoint


# --- paths -----------------------------------------------------------------------------


def test_relative_paths_are_resolved_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "config.yaml").write_text(
        "inbox: data/inbox\n"
        "cache: {path: data/cache, capacity: 1GiB}\n"
        "state: state\n"
        "catalog: sqlite:///db/catalog.sqlite3\n"
        "control: {socket: run/control.sock}\n"
        "remotes:\n"
        "  - {name: nas, type: directory, path: ../nas}\n"
        "  - {name: s3, type: s3, bucket: b, access_key_id: K, secret_access_key_file: s3.secret}\n"
    )
    config = load_config(folder / "config.yaml", environ={}, hostname="h")
    assert config.source == str(folder / "config.yaml")
    assert config.inbox == str(folder / "data" / "inbox")
    assert config.cache.path == str(folder / "data" / "cache")
    assert config.state == str(folder / "state")
    assert config.catalog == f"sqlite:///{folder}/db/catalog.sqlite3"
    assert catalog_sqlite_path(config.catalog) == str(folder / "db" / "catalog.sqlite3")
    assert config.control.socket == str(folder / "run" / "control.sock")
    assert config.ingest.rejected == str(folder / "data" / "rejected")
    assert config.remotes[0].get("path") == str(tmp_path / "nas")
    assert config.remotes[1].get("secret_access_key_file") == str(folder / "s3.secret")


def test_symlinks_in_paths_are_not_resolved(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config = build(minimal(inbox="inbox"), base_dir=str(tmp_path / "link"))
    assert config.inbox == str(tmp_path / "link" / "inbox")


def test_catalog_urls() -> None:
    assert build(minimal(catalog="sqlite:////abs/c.db")).catalog == "sqlite:////abs/c.db"
    url = "postgresql://cm:secret@db.example.org:5432/cm?sslmode=require"
    assert build(minimal(catalog=url)).catalog == url
    assert build(minimal(catalog="postgres://db/cm")).catalog == "postgres://db/cm"
    assert catalog_sqlite_path(url) is None


@pytest.mark.parametrize("url", ["mysql://db/cm", "sqlite://", "sqlite:///", "catalog.db", 5])
def test_catalog_rejects_other_schemes(url: Any) -> None:
    line = only_error(minimal(catalog=url), "catalog")
    assert "sqlite:///" in line and "postgresql://" in line
    assert repr(url) in line


@pytest.mark.parametrize("url", ["postgresq://cm:hunter2@db/cm", "host=db user=cm password=hunter2 dbname=cm",
                                 "mysql://cm:hunter2@db/cm"])
def test_a_refused_catalog_url_does_not_show_its_password(url: str) -> None:
    line = only_error(minimal(catalog=url), "catalog")
    assert "hunter2" not in line and "db" in line

# --- each error message ------------------------------------------------------------------


def test_required_keys() -> None:
    assert errors_of({}) == ["inbox: required", "cache.path: required", "cache.capacity: required"]


@pytest.mark.parametrize(
    ("data", "key", "bad"),
    [
        (minimal(cache={"path": "/c", "capacity": "lots"}), "cache.capacity", "'lots'"),
        (minimal(cache={"path": "/c", "capacity": 0}), "cache.capacity", "0"),
        (minimal(ingest={"settle": -1}), "ingest.settle", "-1"),
        (minimal(ingest={"rescan": "0s"}), "ingest.rescan", "'0s'"),
        (minimal(inbox=5), "inbox", "5"),
        (minimal(cache={"path": ["a"], "capacity": 1}), "cache.path", "a list"),
        (minimal(cache={"path": "/c", "capacity": 1, "scrub": "1GiB"}), "cache.scrub", "'1GiB'"),
        (minimal(ingest={"observer": "fanotify"}), "ingest.observer", "'fanotify'"),
        (minimal(ingest={"ignore": "*.tmp"}), "ingest.ignore", "'*.tmp'"),
        (minimal(ingest={"ignore": ["a/*.tmp"]}), "ingest.ignore", "'a/*.tmp'"),
        (minimal(upload={"concurrency": 0}), "upload.concurrency", "0"),
        (minimal(upload={"concurrency": "4"}), "upload.concurrency", "'4'"),
        (minimal(upload={"retry": {"max_attempts": -1}}), "upload.retry.max_attempts", "-1"),
        (minimal(upload={"retry": {"initial": "1h", "max": "10m"}}), "upload.retry.max", "10m"),
        (minimal(upload={"stall": "a while"}), "upload.stall", "'a while'"),
        (minimal(upload={"min_rate": "64KiB"}), "upload.min_rate", "'64KiB'"),
        (minimal(cluster={"lease": True}), "cluster.lease", "true"),
        (minimal(log={"level": "verbose"}), "log.level", "'verbose'"),
        (minimal(node="storage 1"), "node", "'storage 1'"),
        (minimal(node="a\tb"), "node", "'a\\tb'"),
        (minimal(node=""), "node", "''"),
        (minimal(control={"group": 5}), "control.group", "5"),
        (minimal(control={"socket": "/run/" + "x" * 120}), "control.socket", "xxx"),
        (minimal(state={"a": 1}), "state", "a mapping"),
        (minimal(ingest=["settle"]), "ingest", "a list"),
        (minimal(remotes={"name": "nas"}), "remotes", "a mapping"),
    ],
)
def test_error_names_the_key_and_the_value(data: dict[str, Any], key: str, bad: str) -> None:
    line = only_error(data, key)
    assert bad in line.partition(": ")[2]


def test_error_message_shapes() -> None:
    assert only_error(minimal(cache={"path": "/c", "capacity": "lots"}), "cache.capacity") == (
        "cache.capacity: expected a size like 20GiB, got 'lots'")
    assert only_error(minimal(ingest={"settle": -1}), "ingest.settle").startswith(
        "ingest.settle: expected a duration like 30s, got -1")
    assert only_error(minimal(inbox=5), "inbox") == "inbox: expected a path (a string), got 5"


def test_redundancy_must_be_at_least_one_with_remotes() -> None:
    data = minimal(remotes=[directory("a")], upload={"redundancy": 0})
    assert only_error(data, "upload.redundancy") == "upload.redundancy: must be at least 1, got 0"


def test_redundancy_zero_is_fine_without_remotes() -> None:
    assert build(minimal(upload={"redundancy": 0})).upload.redundancy == 0


@pytest.mark.parametrize(
    ("count", "wanted", "message"),
    [
        (2, 3, "upload.redundancy: 3 copies wanted but only 2 remotes are configured"),
        (1, 2, "upload.redundancy: 2 copies wanted but only 1 remote is configured"),
        (0, 1, "upload.redundancy: 1 copy wanted but no remotes are configured"),
    ],
)
def test_redundancy_above_the_remotes(count: int, wanted: int, message: str) -> None:
    data = minimal(remotes=[directory(f"r{i}") for i in range(count)], upload={"redundancy": wanted})
    assert errors_of(data) == [message]


def test_min_redundancy_at_most_redundancy() -> None:
    data = minimal(remotes=[directory("a"), directory("b")], upload={"min_redundancy": 3})
    line = only_error(data, "upload.min_redundancy")
    assert "(2)" in line and "got 3" in line
    data["upload"]["min_redundancy"] = 0
    assert build(data).upload.min_redundancy == 0


def test_unknown_key_with_suggestion() -> None:
    data = minimal()
    data["cache"]["capactiy"] = "2GiB"
    assert only_error(data, "cache.capactiy") == "cache.capactiy: unknown key (did you mean capacity?)"


def test_unknown_key_without_suggestion() -> None:
    assert errors_of(minimal(verbose=True)) == ["verbose: unknown key"]


def test_dotted_key_gets_a_nesting_hint() -> None:
    line = only_error(minimal(**{"upload.redundancy": 1}), "upload.redundancy")
    assert "nested under upload" in line


def test_rejected_inside_the_inbox() -> None:
    data = minimal(ingest={"rejected": "/srv/cm/inbox/rejected"})
    assert only_error(data, "ingest.rejected") == (
        "ingest.rejected: must be outside the inbox (droppers could tamper with it), "
        "got '/srv/cm/inbox/rejected'")


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"cache": {"path": "/srv/cm/inbox/.cache", "capacity": 1}}, "cache.path"),
        ({"cache": {"path": "/srv", "capacity": 1}}, "cache.path"),
        ({"state": "/srv/cm/inbox/state"}, "state"),
        ({"catalog": "sqlite:////srv/cm/inbox/c.db"}, "catalog"),
        ({"remotes": [directory("nas", "/srv/cm/inbox/nas")]}, "remotes[0].path"),
        ({"remotes": [directory("nas", "/srv/cm/cache")]}, "remotes[0].path"),
    ],
)
def test_folders_that_must_stay_apart(extra: dict[str, Any], key: str) -> None:
    only_error(minimal(**extra), key)


def test_several_errors_at_once() -> None:
    data = {
        "inbox": 5,
        "cache": {"path": "/c", "capacity": "lots", "capactiy": 1},
        "ingest": {"settle": -1},
        "upload": {"redundancy": 0},
        "remotes": [directory("nas")],
    }
    errors = errors_of(data)
    keys = sorted(line.partition(":")[0] for line in errors)
    assert keys == ["cache.capacity", "cache.capactiy", "inbox", "ingest.settle", "upload.redundancy"]


@pytest.mark.parametrize("root", [["inbox"], "inbox: /x", 5])
def test_root_must_be_a_mapping(root: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        build(root)
    (line,) = caught.value.errors
    assert "top level must be a mapping" in line


# --- remotes ---------------------------------------------------------------------------


def test_remote_options_are_sorted_with_defaults() -> None:
    config = build(minimal(remotes=[{"name": "s3", "type": "s3", "bucket": "cm", "region": "eu-west-1"}]))
    (remote,) = config.remotes
    assert remote.options == (
        ("bucket", "cm"), ("prefix", ""), ("region", "eu-west-1"), ("request_checksum", "when_supported"))
    assert remote.get("endpoint") is None
    assert remote.get("endpoint", "x") == "x"
    assert config.remote("s3") is remote
    assert config.remote("nope") is None


def test_every_remote_type() -> None:
    remotes = [
        directory("nas"),
        {"name": "s3", "type": "s3", "bucket": "cm", "prefix": "objects/", "endpoint": "http://127.0.0.1:8333",
         "access_key_id": "AK", "secret_access_key": "SK", "request_checksum": "when_required"},
        {"name": "lockers-1fichier", "type": "plowshare", "host": "1fichier", "auth_file": "auth", "bin_dir": "/opt/bin"},
        {"name": "gdrive", "type": "rclone", "remote": "gdrive:cm", "config": "rclone.conf"},
    ]
    config = build(minimal(remotes=remotes))
    assert [r.type for r in config.remotes] == ["directory", "s3", "plowshare", "rclone"]
    assert config.remotes[2].get("auth_file") == "/etc/cloudmanagerd/auth"
    assert config.remotes[3].get("config") == "/etc/cloudmanagerd/rclone.conf"
    assert config.upload.redundancy == 2


def test_remote_repr_hides_the_secret() -> None:
    remote = {"name": "s3", "type": "s3", "bucket": "cm", "access_key_id": "AK", "secret_access_key": "hunter2"}
    config = build(minimal(remotes=[remote]))
    assert config.remotes[0].get("secret_access_key") == "hunter2"
    assert "hunter2" not in repr(config)


@pytest.mark.parametrize(
    ("remote", "key", "words"),
    [
        ({"name": "s3", "type": "s3", "bucket": "b", "buckt": "c"}, "remotes[1].buckt",
         "unknown key for an s3 remote (did you mean bucket?)"),
        ({"name": "d", "type": "directory", "path": "/d", "bucket": "b"}, "remotes[1].bucket",
         "unknown key for a directory remote"),
        ({"name": "s3", "type": "s3"}, "remotes[1].bucket", "required"),
        ({"type": "directory", "path": "/d"}, "remotes[1].name", "required"),
        ({"name": "d"}, "remotes[1].type", "required"),
        ({"name": "f", "type": "ftp"}, "remotes[1].type", "'ftp'"),
        ({"name": "-bad", "type": "directory", "path": "/d"}, "remotes[1].name", "'-bad'"),
        ({"name": "a b", "type": "directory", "path": "/d"}, "remotes[1].name", "'a b'"),
        ({"name": "nas", "type": "directory", "path": "/d"}, "remotes[1].name", "remotes[0]"),
        ({"name": "d", "type": "directory"}, "remotes[1].path", "required"),
        ({"name": "p", "type": "plowshare"}, "remotes[1].host", "required"),
        ({"name": "r", "type": "rclone", "remote": "gdrive"}, "remotes[1].remote", "'gdrive'"),
        ({"name": "s3", "type": "s3", "bucket": "b", "endpoint": "127.0.0.1:8333"}, "remotes[1].endpoint",
         "'127.0.0.1:8333'"),
        ({"name": "s3", "type": "s3", "bucket": "b", "request_checksum": "never"}, "remotes[1].request_checksum",
         "'never'"),
        ({"name": "s3", "type": "s3", "bucket": "b", "access_key_id": "AK", "secret_access_key": "SK",
          "secret_access_key_file": "/s"}, "remotes[1].secret_access_key_file", "not both"),
        ({"name": "s3", "type": "s3", "bucket": "b", "secret_access_key": "SK"}, "remotes[1].secret_access_key",
         "access_key_id"),
        ({"name": "s3", "type": "s3", "bucket": "b", "secret_access_key_file": "/s"},
         "remotes[1].secret_access_key_file", "access_key_id"),
        ({"name": "s3", "type": "s3", "bucket": "b", "access_key_id": "AK"}, "remotes[1].access_key_id",
         "secret_access_key"),
        ({"name": "twin", "type": "directory", "path": "/mnt/nas"}, "remotes[1]", "same place as remotes[0]"),
        ("nas", "remotes[1]", "'nas'"),
    ],
)
def test_remote_errors(remote: Any, key: str, words: str) -> None:
    line = only_error(minimal(remotes=[directory("nas"), remote]), key)
    assert words in line


def test_parse_remotes_for_the_python_api(tmp_path: Path) -> None:
    remotes = parse_remotes([directory("nas", "nas")], base_dir=str(tmp_path))
    assert remotes == (RemoteConfig("nas", "directory", (("path", str(tmp_path / "nas")),)),)
    with pytest.raises(ConfigError, match=r"remotes\[0\]\.type: required"):
        parse_remotes([{"name": "x"}], base_dir=str(tmp_path))


# --- control.mode ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o660, "0660", "660", "0o660", " 0660 "])
def test_control_mode_forms(mode: Any) -> None:
    assert build(minimal(control={"mode": mode})).control.mode == 0o660


def test_control_mode_yaml_octal(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("inbox: /i\ncache: {path: /c, capacity: 1}\ncontrol: {mode: 0600}\n")
    assert load_config(path, environ={}, hostname="h").control.mode == 0o600


def test_control_mode_decimal_gets_a_hint() -> None:
    line = only_error(minimal(control={"mode": 660}), "control.mode")
    assert "got 660" in line and "0660" in line


@pytest.mark.parametrize("mode", [0o1777, "0999", "rw-rw----", True, -1, "07777"])
def test_control_mode_rejects(mode: Any) -> None:
    only_error(minimal(control={"mode": mode}), "control.mode")


# --- objects ---------------------------------------------------------------------------


def test_config_is_frozen_and_hashable() -> None:
    config = build(minimal(remotes=[directory("nas")]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.inbox = "/elsewhere"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.upload.retry.max = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.remotes[0].name = "x"  # type: ignore[misc]
    assert hash(config) == hash(build(minimal(remotes=[directory("nas")])))


def test_input_is_not_modified() -> None:
    data = minimal(remotes=[directory("nas")], upload={"retry": {"max": "1h"}})
    before = copy.deepcopy(data)
    build(data)
    assert data == before


def test_config_error_survives_pickling() -> None:
    error = ConfigError(["a: one", "b: two"])
    again = pickle.loads(pickle.dumps(error))
    assert again.errors == ["a: one", "b: two"]
    assert str(again) == "a: one\nb: two"


def test_yaml_off_turns_scrub_off() -> None:
    assert build(minimal(cache={"path": "/c", "capacity": 1, "scrub": False})).cache.scrub == 0.0


JUNK = [None, True, -1, 0, 1.5, "", "x", "-5", [], ["x"], {}, {"x": 1}]
KEYS = [
    ("inbox",), ("state",), ("catalog",), ("node",), ("cache",), ("cache", "path"), ("cache", "capacity"),
    ("cache", "scrub"), ("control",), ("control", "socket"), ("control", "mode"), ("control", "group"),
    ("ingest",), ("ingest", "settle"), ("ingest", "observer"), ("ingest", "rescan"), ("ingest", "ignore"),
    ("ingest", "rejected"), ("upload",), ("upload", "redundancy"), ("upload", "min_redundancy"),
    ("upload", "concurrency"), ("upload", "retry"), ("upload", "retry", "initial"), ("upload", "retry", "max"),
    ("upload", "retry", "max_attempts"), ("upload", "stall"), ("upload", "min_rate"), ("cluster",),
    ("cluster", "lease"), ("log",), ("log", "level"), ("remotes",), ("remotes", 0), ("remotes", 0, "name"),
    ("remotes", 0, "type"), ("remotes", 0, "path"), ("remotes", 1, "bucket"), ("remotes", 1, "endpoint"),
    ("remotes", 1, "secret_access_key"), ("remotes", 2, "host"), ("remotes", 3, "remote"),
]


@pytest.mark.parametrize("keys", KEYS, ids=lambda keys: ".".join(map(str, keys)))
def test_junk_anywhere_gives_config_error_only(keys: tuple[Any, ...]) -> None:
    for junk in JUNK:
        data: Any = minimal(
            upload={"retry": {}},
            remotes=[
                directory("nas"),
                {"name": "s3", "type": "s3", "bucket": "b"},
                {"name": "p", "type": "plowshare", "host": "h"},
                {"name": "r", "type": "rclone", "remote": "r:x"},
            ],
        )
        data.setdefault("cache", {})
        for section in ("control", "ingest", "cluster", "log"):
            data[section] = {}
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = junk
        try:
            build(data)
        except ConfigError as exc:
            assert exc.errors, f"a silent failure for {keys}={junk!r}"
            assert all("\n" not in line for line in exc.errors)


# --- files -----------------------------------------------------------------------------


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert len(caught.value.errors) == 1
    assert str(path) in str(caught.value)
    assert "No such file" in str(caught.value)


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        load_config(tmp_path, environ={})


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("inbox: [unclosed\n", "line 2"),
        ("inbox: /i\n  bad: indent\n", "line 2"),
        ("inbox: /i\ninbox: /j\n", "duplicate key 'inbox'"),
        ("cache:\n  capacity: 1\n  capacity: 2\n", "line 3"),
        ("inbox: \xff\n", "invalid YAML"),
    ],
)
def test_load_config_invalid_yaml(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    (line,) = caught.value.errors
    assert line.startswith(f"{path}: ")
    assert words in line


def test_load_config_empty_file_lists_the_required_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="inbox: required"):
        load_config(path, environ={})


def test_load_config_yaml_list_root(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("- inbox: /i\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(caught.value) == f"{path}: the top level must be a mapping of keys (inbox: ..., cache: ...), got a list"


def test_sample_config_loads() -> None:
    config = load_config(SAMPLE, environ={}, hostname="storage-1")
    assert config.inbox == "/srv/cloudmanager/inbox"
    assert config.cache.path == "/srv/cloudmanager/cache"
    assert config.cache.capacity == 20 * 2**30
    assert [(r.name, r.type, r.get("path")) for r in config.remotes] == [
        ("nas", "directory", "/srv/cloudmanager/remotes/EXAMPLE-move-to-another-disk")]
    assert config.ingest.rejected == "/srv/cloudmanager/rejected"


def uncomment(text: str) -> str:
    """The sample with every commented-out key and example remote switched on."""
    return re.sub(r"^(\s*)#(\s*(?:- )?[a-z_]+: .*)$", r"\1\2", text, flags=re.MULTILINE)


def test_sample_config_comments_are_valid_and_truthful(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(uncomment(SAMPLE.read_text()))
    config = load_config(path, environ={}, hostname="storage-1")
    assert [r.type for r in config.remotes] == ["directory", "s3", "plowshare", "rclone"]
    assert config.remotes[1].get("secret_access_key_file") == "/etc/cloudmanagerd/s3.secret"
    assert config.remotes[1].get("endpoint") == "http://127.0.0.1:8333"
    # The commented values are the defaults (where a default does not depend on the host).
    default = load_config(SAMPLE, environ={}, hostname="storage-1")
    for name in ("cache", "state", "catalog", "ingest", "cluster", "log", "scrub"):
        assert getattr(config, name) == getattr(default, name), name
    assert (config.control.socket, config.control.mode) == (default.control.socket, default.control.mode)
    assert dataclasses.replace(config.upload, redundancy=1, min_redundancy=1) == default.upload
    assert config.upload.redundancy == 2
