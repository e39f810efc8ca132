"""The 0.2 exchange format: what other nodes (and the original cloud-manager) write is read; what is bad
is reported by entry index and nothing of it is taken."""

from __future__ import annotations

import json

import pytest

from cloudmanagerd.exchange import MAX_TEXT, Entry, ExchangeError, Location, dump, parse

H1 = "6e163442e29ec8d7538bc86fe2c4a48778e8ae2254632f0889da753b1c357b1b"
H2 = "a" * 64


def original_entry(**changes):
    # the README's own example, as the original wrote it (size as a string)
    entry = {"version": "0.2", "datetime": "1391212800", "filename": "README.md", "filesize": "23124",
             "filehash": H1, "uploads": [{"host_name": "mediafire", "url": "http://www.mediafire.com/?qorncpzfe74s9"},
                                         {"host_name": "anonfiles", "error": True}]}
    entry.update(changes)
    return entry


def test_reads_the_original_readme_example():
    (entry,) = parse(json.dumps([original_entry()]))
    assert entry == Entry(H1, b"README.md", 23124, 1391212800,
                          (Location("mediafire", "http://www.mediafire.com/?qorncpzfe74s9"), Location("anonfiles")))
    assert entry.uploads[1].error


def test_reads_version_0_1_without_a_name_and_numbers_as_numbers():
    (entry,) = parse(json.dumps([{"version": "0.1", "datetime": 1391212800.5, "filesize": 5, "filehash": H2,
                                  "uploads": []}]))
    assert (entry.filename, entry.filesize, entry.datetime) == (H2.encode(), 5, 1391212800)


def test_round_trip_keeps_names_that_are_not_utf8():
    entry = Entry(H2, b"caf\xe9/r\xc3\xa9sum\xc3\xa9.txt", 10, 1700000000, (Location("s3", "s3://b/k"),))
    text, count = dump([entry], None)
    assert count == 1 and text.isascii()
    assert parse(text) == [entry]
    assert json.loads(text)[0]["filesize"] == 10 and json.loads(text)[0]["datetime"] == "1700000000"


def test_dump_fits_whole_entries_in_the_limit():
    entries = [Entry(f"{i:064x}", f"f{i}".encode(), i, 1, ()) for i in range(10)]
    one = len(entries[0].to_json())
    text, count = dump(entries, 2 + 3 * one + 2 * 2)
    assert count == 3 and len(text) <= 2 + 3 * one + 4 and len(json.loads(text)) == 3
    assert dump(entries, one) == (None, 0)  # not even one fits with its brackets
    assert dump([], 1000) == (None, 0)


@pytest.mark.parametrize("bad, says", [
    (None, "expected JSON text"),
    (42, "expected JSON text"),
    ("", "not JSON"),
    ("{", "not JSON"),
    ("{}", "expected a JSON array"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (b"\xff[]", "not UTF-8"),
])
def test_texts_that_are_not_an_exchange(bad, says):
    with pytest.raises(ExchangeError) as err:
        parse(bad)
    assert says in str(err.value)


def test_an_oversized_text_is_refused_before_parsing():
    with pytest.raises(ExchangeError, match="over the limit"):
        parse("[" + " " * MAX_TEXT + "]")


@pytest.mark.parametrize("change, says", [
    ({"version": "0.3"}, "version"),
    ({"filehash": H1.upper()}, "filehash"),
    ({"filehash": H1 + "0"}, "filehash"),
    ({"filehash": "'; DROP TABLE files; --"}, "filehash"),
    ({"filesize": -1}, "filesize"),
    ({"filesize": "-1"}, "filesize"),
    ({"filesize": True}, "filesize"),
    ({"filesize": 1.5}, "filesize"),
    ({"filesize": 1 << 64}, "too large"),
    ({"datetime": "yesterday"}, "datetime"),
    ({"datetime": float("nan")}, "datetime"),
    ({"datetime": None}, "datetime"),
    ({"filename": ""}, "filename"),
    ({"filename": "a\x00b"}, "filename"),
    ({"filename": 7}, "filename"),
    ({"filename": "\ud800"}, "surrogate"),
    ({"uploads": {}}, "uploads"),
    ({"uploads": [{"host_name": "x"}]}, "needs a url"),
    ({"uploads": [{"host_name": "", "url": "u"}]}, "host_name"),
    ({"uploads": [{"host_name": "x", "url": "u", "error": True}]}, "both"),
    ({"uploads": [{"host_name": "x", "url": "u", "extra": 1}]}, "uploads[0]"),
    ({"extra": 1}, "unknown key"),
])
def test_each_bad_entry_is_named_by_index(change, says):
    good = original_entry()
    with pytest.raises(ExchangeError) as err:
        parse(json.dumps([good, original_entry(**change), good], allow_nan=True))
    assert err.value.problems and err.value.problems[0].startswith("entry 1: ")
    assert says in err.value.problems[0]
    assert len(err.value.problems) == 1


def test_every_bad_entry_is_reported():
    with pytest.raises(ExchangeError) as err:
        parse(json.dumps([1, original_entry(), "x", original_entry(filesize=-2)]))
    assert [p.split(":")[0] for p in err.value.problems] == ["entry 0", "entry 2", "entry 3"]


def test_millions_of_bad_entries_are_counted_but_only_the_first_named():
    with pytest.raises(ExchangeError) as caught:
        parse("[" + ",".join(["0"] * 1_000_000) + "]")
    assert caught.value.count == 1_000_000 and len(caught.value.problems) == 100
    assert str(caught.value).endswith("; and 999995 more")
