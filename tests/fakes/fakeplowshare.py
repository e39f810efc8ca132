"""Stand-ins for plowshare's plowup, plowdown, plowprobe and plowdel, for the tests.

They honour plowshare's command-line contract, against a fake file locker kept in the folder
named by the environment variable FAKE_PLOWSHARE_STORE:

    plowup [--plowsharerc=FILE] [-a USER:PASSWORD] HOST FILE[:DESTNAME]
        stores FILE, prints some chatter, then https://fake-locker.invalid/<HOST>/<id> as its
        last stdout line; like plowup, it skips an empty or unreadable FILE with a notice on
        stderr and exit 0, printing no URL
    plowup --modules                      lists the modules (hosts) it knows
    plowdown [...] URL -o DIR --temp-rename
        writes DIR/<name>.part, renames it to DIR/<name>, prints that path
    plowprobe [--printf=%s%n] URL        prints the file's size; exit 13 when the link is dead
    plowdel URL                          deletes the file; exit 13 when the link is dead

Failures on demand come from <store>/control.json (a file, because a daemon's environment is
fixed when it starts), a JSON object:

    "modules": ["fakelocker", ...]       the hosts plowup knows (others: exit 2, no such module)
    "auth": {"HOST": "USER:PASSWORD"}    HOST wants this account (else exit 4, login failed)
    "TOOL" or "TOOL@HOST": a rule for that tool (on that host), with any of
        "exit": N, "message": "..."      print the message on stderr and exit N
        "hang": true                     run `sleep` in a child and wait for it forever
        "garbage": "text"                print this instead of a URL or path, exit 0
        "corrupt": true                  flip the first byte of what is stored or downloaded
        "no_size": true                  (plowprobe) print no size
        "times": K                       apply the rule K times, then drop it

Every run appends {"tool", "argv", "pid"} to <store>/calls.log; a hanging run writes its own
pid and its child's to <store>/hangs/<pid>.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys

DEFAULT_MODULES = ["fakelocker", "otherlocker", "thirdlocker"]
URL_PREFIX = "https://fake-locker.invalid/"
URL_RE = re.compile(re.escape(URL_PREFIX) + r"([A-Za-z0-9_.-]+)/([0-9a-f]+)$")


def fail(code: int, message: str) -> None:
    print(f"{TOOL}: {message}", file=sys.stderr)
    sys.exit(code)


TOOL = "plow"


def store() -> str:
    path = os.environ.get("FAKE_PLOWSHARE_STORE")
    if not path:
        fail(8, "FAKE_PLOWSHARE_STORE is not set")
    os.makedirs(path, exist_ok=True)
    return path


def control(root: str) -> dict:
    try:
        with open(os.path.join(root, "control.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def take_rule(root: str, host: str | None) -> dict:
    """The rule for this tool (and host), counting down its "times"."""
    path = os.path.join(root, "control.json")
    if not os.path.exists(path):
        return {}
    with open(path, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        data = json.load(f)
        for key in ([f"{TOOL}@{host}"] if host else []) + [TOOL]:
            rule = data.get(key)
            if rule is None:
                continue
            if "times" in rule:
                rule["times"] -= 1
                if rule["times"] <= 0:
                    del data[key]
                f.seek(0)
                f.truncate()
                json.dump(data, f)
            return rule
    return {}


def apply_failures(root: str, rule: dict) -> None:
    if rule.get("hang"):
        import subprocess

        child = subprocess.Popen(["sleep", "600"])
        os.makedirs(os.path.join(root, "hangs"), exist_ok=True)
        with open(os.path.join(root, "hangs", str(os.getpid())), "w") as f:
            f.write(f"{os.getpid()} {child.pid}\n")
        print("waiting for the host...", file=sys.stderr, flush=True)
        child.wait()
        sys.exit(1)
    if "exit" in rule:
        fail(int(rule["exit"]), rule.get("message", f"failing on purpose with exit {rule['exit']}"))
    if "garbage" in rule:
        print(rule["garbage"])
        sys.exit(0)


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(options, positional arguments) in plowshare's getopt style."""
    options: dict[str, str] = {}
    args: list[str] = []
    takes_value = {"-a", "-o", "-r", "-t", "--auth", "--output-directory", "--printf"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" in arg:
            key, _, value = arg.partition("=")
            options[key] = value
        elif arg in takes_value:
            options[arg] = argv[i + 1] if i + 1 < len(argv) else ""
            i += 1
        elif arg.startswith("-"):
            options[arg] = ""
        else:
            args.append(arg)
        i += 1
    return options, args


def credentials(options: dict[str, str], host: str) -> str | None:
    for key in ("-a", "--auth"):
        if key in options:
            return options[key]
    rc = options.get("--plowsharerc")
    if rc:
        with open(rc) as f:
            for line in f:
                key, sep, value = line.partition("=")
                if sep and key.strip() in (f"{host}/a", f"{host}/auth"):
                    return value.strip().strip('"')
    return None


def check_auth(root: str, options: dict[str, str], host: str) -> None:
    wanted = control(root).get("auth", {}).get(host)
    if wanted is not None and credentials(options, host) != wanted:
        fail(4, f"login failed on {host}")


def locate(root: str, url: str) -> tuple[str, str, str]:
    match = URL_RE.match(url)
    if not match:
        fail(2, f"no module for URL ({url})")
    host, ident = match.groups()
    path = os.path.join(root, "files", host, ident)
    return host, ident, path


def corrupt(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:] if data else b"\0"


def plowup(root: str, argv: list[str]) -> None:
    options, args = parse(argv)
    modules = control(root).get("modules", DEFAULT_MODULES)
    if "--modules" in options:
        print("\n".join(modules))
        return
    if len(args) < 2:
        fail(15, "usage: plowup [OPTIONS] MODULE FILE...")
    host, file = args[0], args[1]
    if host not in modules:
        fail(2, f"unsupported module ({host})")
    rule = take_rule(root, host)
    apply_failures(root, rule)
    check_auth(root, options, host)
    local, _, dest = file.partition(":")
    try:
        with open(local, "rb") as f:
            data = f.read()
    except OSError:
        print(f"Skipping ({local}): cannot find file", file=sys.stderr)  # and exit 0, like plowup
        return
    if not data:
        print(f"Skipping ({local}): filesize is null", file=sys.stderr)
        return
    if rule.get("corrupt"):
        data = corrupt(data)
    ident = os.urandom(8).hex()
    folder = os.path.join(root, "files", host)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ident + ".part"), "wb") as f:
        f.write(data)
    with open(os.path.join(folder, ident + ".name"), "w") as f:
        f.write(dest or os.path.basename(local))
    os.rename(os.path.join(folder, ident + ".part"), os.path.join(folder, ident))
    print(f"Starting upload ({host}): {local}", file=sys.stderr)
    print(f"Destination file: {dest or os.path.basename(local)}", file=sys.stderr)
    print(f"#DEL {URL_PREFIX}{host}/delete/{ident}")
    print(f"{URL_PREFIX}{host}/{ident}")


def plowdown(root: str, argv: list[str]) -> None:
    options, args = parse(argv)
    if not args:
        fail(15, "usage: plowdown [OPTIONS] URL...")
    host, ident, path = locate(root, args[0])
    rule = take_rule(root, host)
    apply_failures(root, rule)
    check_auth(root, options, host)
    if not os.path.exists(path):
        fail(13, f"link dead: {args[0]}")
    with open(path, "rb") as f:
        data = f.read()
    if rule.get("corrupt"):
        data = corrupt(data)
    with open(path + ".name") as f:
        name = f.read() or ident
    out = options.get("-o") or options.get("--output-directory") or "."
    final = os.path.join(out, name)
    temporary = final + ".part" if "--temp-rename" in options else final
    print(f"Starting download ({host}): {args[0]}", file=sys.stderr)
    with open(temporary, "wb") as f:
        f.write(data)
    if temporary != final:
        os.rename(temporary, final)
    print(final)


def plowprobe(root: str, argv: list[str]) -> None:
    options, args = parse(argv)
    if not args:
        fail(15, "usage: plowprobe [OPTIONS] URL...")
    host, ident, path = locate(root, args[0])
    rule = take_rule(root, host)
    apply_failures(root, rule)
    if not os.path.exists(path):
        fail(13, f"link dead: {args[0]}")
    size = "" if rule.get("no_size") else str(os.path.getsize(path))
    fmt = options.get("--printf", "%u%n")
    print(fmt.replace("%s", size).replace("%u", args[0]).replace("%n", "\n"), end="")


def plowdel(root: str, argv: list[str]) -> None:
    options, args = parse(argv)
    if not args:
        fail(15, "usage: plowdel [OPTIONS] URL...")
    host, ident, path = locate(root, args[0])
    rule = take_rule(root, host)
    apply_failures(root, rule)
    check_auth(root, options, host)
    if not os.path.exists(path):
        fail(13, f"link dead: {args[0]}")
    os.unlink(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + ".name")
    print(f"File {args[0]} deleted", file=sys.stderr)


def main(tool: str) -> None:
    global TOOL
    TOOL = tool
    root = store()
    with open(os.path.join(root, "calls.log"), "a") as f:
        f.write(json.dumps({"tool": tool, "argv": sys.argv[1:], "pid": os.getpid()}) + "\n")
    {"plowup": plowup, "plowdown": plowdown, "plowprobe": plowprobe, "plowdel": plowdel}[tool](root, sys.argv[1:])
