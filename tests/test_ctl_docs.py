"""cloudmanagerctl's man page and bash completion: generated from the parser (`make docs`), committed, and
what they say works (completion in a real bash, the page through groff without a warning)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from cloudmanagerd import manpage

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "docs" / "cloudmanagerctl.1"
COMPLETION = ROOT / "etc" / "bash-completion" / "cloudmanagerctl"


def test_committed_files_are_what_the_parser_makes() -> None:
    assert MAN.read_text() == manpage.man_page(), "run `make docs` and commit docs/cloudmanagerctl.1"
    assert COMPLETION.read_text() == manpage.bash_completion(), \
        "run `make docs` and commit etc/bash-completion/cloudmanagerctl"


def complete(line: str, cwd: Path | None = None) -> list[str]:
    """What bash offers for the last word of `line` (a trailing space: a new, empty word)."""
    words = line.split(" ")
    script = (f"source {COMPLETION}\n"
              f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
              "_cloudmanagerctl; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=30, check=True)
    assert result.stderr == b""
    return [w for w in result.stdout.decode().splitlines() if w]


def test_bash_completes_commands_options_choices_and_files(workdir: Path) -> None:
    assert complete("cloudmanagerctl st") == ["status"]
    assert set(complete("cloudmanagerctl ")) >= {"status", "ls", "info", "get", "rm", "verify", "--json", "-c"}
    assert complete("cloudmanagerctl status --c") == ["--check"]
    assert complete("cloudmanagerctl -c /etc/x.yaml --json rm --d") == ["--dry-run"]
    assert complete("cloudmanagerctl ls --state p") == ["pending"]
    assert complete("cloudmanagerctl ls --limit ") == []
    (workdir / "export.json").write_text("[]")
    (workdir / "other.txt").write_text("")
    assert complete("cloudmanagerctl import exp", cwd=workdir) == ["export.json"]
    assert complete("cloudmanagerctl get 0123abcd -o oth", cwd=workdir) == ["other.txt"]
    assert complete("cloudmanagerctl --socket oth", cwd=workdir) == ["other.txt"]


def test_the_man_page_renders_without_warnings() -> None:
    # groff comes with man (Debian's groff-base), which the page is for
    result = subprocess.run(["groff", "-man", "-ww", "-Tutf8", str(MAN)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=30)
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    text = re.sub(".\b", "", result.stdout.decode())  # no overstrike (bold, underline)
    for name in manpage._subparsers(manpage.ctl_parser()).choices:
        assert f"\n   {name} " in text or f"\n   {name}\n" in text, name
    assert "--dry-run" in text.replace("\u2010", "-") and "Nagios" in text
