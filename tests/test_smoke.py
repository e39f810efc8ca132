"""The newcomer's path: drop a file, see it registered with its true hash, get it back, see it on both remotes."""

from __future__ import annotations

from pathlib import Path

from conftest import sha256_of, wait_for


def test_dropped_file_is_registered_cached_uploaded_and_comes_back(daemon_factory, workdir: Path) -> None:
    d = daemon_factory()
    src = workdir / "payload.bin"
    src.write_bytes(b"hello cloudmanagerd\n" * 1000)
    expected = sha256_of(src)
    (d.inbox / "payload.bin").write_bytes(src.read_bytes())

    files = wait_for(lambda: [f for f in d.files() if f["hash"] == expected and len(f["copies"]) == 2],
                     message="the file registered with two copies")
    assert files[0]["name"] == "payload.bin"
    assert not (d.inbox / "payload.bin").exists()
    for remote in d.config["remotes"]:
        copy = Path(remote["path"]) / expected[:2] / expected
        assert sha256_of(copy) == expected

    out = workdir / "back.bin"
    result = d.ctl("get", expected[:8], "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == src.read_bytes()
    assert d.stop() == 0
    assert not Path(d.socket_path).exists()
