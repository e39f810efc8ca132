"""Remote backends, registered by their `type:` name in the config."""

from __future__ import annotations

from collections.abc import Callable

from ..config import RemoteConfig
from .base import Remote, RemoteError
from .directory import DirectoryRemote

BACKENDS: dict[str, Callable[[RemoteConfig], Remote]] = {
    "directory": lambda rc: DirectoryRemote(rc.name, str(rc.get("path"))),
}


def build_remote(rc: RemoteConfig) -> Remote:
    factory = BACKENDS.get(rc.type)
    if factory is None:
        raise RemoteError(f"remote {rc.name}: type {rc.type} is not available in this version")
    return factory(rc)


__all__ = ["BACKENDS", "Remote", "RemoteError", "build_remote"]
