"""Catalog URLs in messages: never a password (config errors, start-up errors, logs, status)."""

from __future__ import annotations

import re
import urllib.parse


def safe_url(url: str) -> str:
    """The URL without its user, password or password parameter: what messages and logs may show.

    Everything up to the last '@' goes: a password may hold '?', '#' or '/' unencoded (libpq takes
    the user info up to the first '@' or '/'), which urlsplit would read as the query, fragment or
    path and so show."""
    try:
        scheme, sep, rest = url.partition("://")
        if not sep:
            return scrub(url)
        rest = rest.rpartition("@")[2]
        parts = urllib.parse.urlsplit(f"{scheme}://{rest}")
        query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
                 if k.lower() not in ("password", "user", "passfile", "sslpassword")]
        return f"{scheme}://{parts.netloc}{parts.path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    except ValueError:
        return url.split("://", 1)[0] + "://(unreadable URL)"


_CREDENTIALS = re.compile(r"(://)[^\s\"']*@|(password\s*=\s*)(?:'[^']*'|[^\s&\"']*)", re.IGNORECASE)


def scrub(text: str) -> str:
    """An error's first line with any user:password@ or password=... taken out (libpq quotes the
    whole URL when it cannot parse it)."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return _CREDENTIALS.sub(lambda m: m.group(1) or (m.group(2) + "***"), first)
