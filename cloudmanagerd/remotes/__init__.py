"""Remote backends, registered by their `type:` name in the config.

Backends are imported on first use, so that a daemon with only folder remotes never loads
boto3 or the plowshare package.
"""

from __future__ import annotations

import importlib

from ..config import RemoteConfig
from .base import Remote, RemoteError

# type -> (module, factory function taking a RemoteConfig)
BACKENDS: dict[str, tuple[str, str]] = {
    "directory": ("cloudmanagerd.remotes.directory", "from_config"),
    "s3": ("cloudmanagerd.remotes.s3", "from_config"),
    "rclone": ("cloudmanagerd.remotes.rclone", "from_config"),
    "plowshare": ("cloudmanagerd.remotes.plowshare", "from_config"),
}


def build_remote(rc: RemoteConfig) -> Remote:
    entry = BACKENDS.get(rc.type)
    if entry is None:
        raise RemoteError(f"remote {rc.name}: unknown type {rc.type}")
    module = importlib.import_module(entry[0])
    return getattr(module, entry[1])(rc)


__all__ = ["BACKENDS", "Remote", "RemoteError", "build_remote"]
