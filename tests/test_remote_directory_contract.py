"""The directory backend against the shared Remote contract, on real folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from remote_contract import RemoteContract

from cloudmanagerd.remotes.directory import DirectoryRemote


@pytest.fixture
def remote(tmp_path: Path) -> DirectoryRemote:
    (tmp_path / "remote").mkdir()
    return DirectoryRemote("dir", str(tmp_path / "remote"))


@pytest.fixture
def broken_remote(tmp_path: Path) -> DirectoryRemote:
    (tmp_path / "a-file").write_text("not a folder")
    return DirectoryRemote("dir", str(tmp_path / "a-file"))


class TestDirectoryRemote(RemoteContract):
    pass
