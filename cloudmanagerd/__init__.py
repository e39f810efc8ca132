"""cloudmanagerd: a drop folder turned into a content-addressed store.

Files dropped into the inbox are hashed (SHA-256), registered in a catalog, kept in a
byte-bounded local cache and copied redundantly to remote hosts.
"""

__version__ = "0.1.0"
