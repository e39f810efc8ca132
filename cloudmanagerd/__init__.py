"""cloudmanagerd: a drop folder turned into a content-addressed store.

Files dropped into the inbox are hashed (SHA-256), registered in a catalog, kept in a
byte-bounded local cache and copied redundantly to remote hosts.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from cloudmanagerd import CloudManager` loads the API (and its parts) only when asked: the
    # daemon and cloudmanagerctl import this package too and need none of it
    if name == "CloudManager":
        from .api import CloudManager
        return CloudManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
