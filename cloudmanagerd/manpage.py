"""The man page and the bash completion of cloudmanagerctl, generated from its argument parser, so that
neither can drift from the options the command really takes (`make docs` writes them; a test checks
that the committed files are what this module makes of the current parser).

    python -m cloudmanagerd.manpage MAN_FILE COMPLETION_FILE
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .ctl import parser as ctl_parser

# an option whose value is a path completes with file names
PATH_METAVARS = {"FILE", "PATH", "SOCKET"}


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))


def _roff(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines())


def _usage(p: argparse.ArgumentParser) -> str:
    """The usage line without "usage: PROG", on one line (roff fills it)."""
    return " ".join(p.format_usage().split()[2:])


def _option(action: argparse.Action) -> str:
    """`-o PATH, --output PATH` in roff."""
    value = "" if action.nargs == 0 else f" \\fI{_roff(action.metavar or action.dest.upper())}\\fR"
    if not action.option_strings:
        return f"\\fI{_roff(action.metavar or action.dest)}\\fR"
    return ", ".join(f"\\fB{_roff(o)}\\fR{value}" for o in action.option_strings)


def _options(actions: list[argparse.Action]) -> list[str]:
    out = []
    for action in actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help is None:
            continue
        help_text = action.help
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            help_text += f" ({', '.join(map(str, action.choices))})"
        out += [".TP", _option(action), _roff(help_text)]
    return out


def man_page(p: argparse.ArgumentParser | None = None) -> str:
    p = p or ctl_parser()
    sub = _subparsers(p)
    helps = {c.dest: c.help for c in sub._choices_actions}
    lines = [
        f'.TH CLOUDMANAGERCTL 1 "" "cloudmanagerd {__version__}" "User Commands"',
        ".SH NAME", "cloudmanagerctl \\- " + _roff(p.description.rstrip(".").lower()),
        ".SH SYNOPSIS", ".B cloudmanagerctl", _roff(_usage(p)),
        ".SH DESCRIPTION",
        _roff("cloudmanagerctl talks to a running cloudmanagerd over its control socket (found in the config, "
              "or given with -s). Human output by default; --json for scripts. Errors go to stderr as one line."),
        ".SH OPTIONS", *_options(p._actions),
        ".SH COMMANDS",
    ]
    for name, sp in sub.choices.items():
        lines += [f'.SS "{_roff(_usage(sp))}"', _roff(sp.description or helps.get(name) or ""),
                  *_options([a for a in sp._actions if a.dest != "json"])]
    lines += [".SH \"EXIT STATUS\"", _roff(p.epilog or ""),
              ".SH FILES", ".TP", "\\fI/etc/cloudmanagerd/config.yaml\\fR",
              _roff("the default config, where the control socket is found"),
              ".SH ENVIRONMENT", ".TP", "\\fBCLOUDMANAGERD_CONFIG\\fR", _roff("the config to read instead"),
              ".SH \"SEE ALSO\"", "\\fBcloudmanagerd\\fR(8), \\fBsystemctl\\fR(1)", ""]
    return "\n".join(lines)


def _words(actions: list[argparse.Action]) -> list[str]:
    return [o for a in actions for o in a.option_strings]


def bash_completion(p: argparse.ArgumentParser | None = None) -> str:
    """A bash completion function, without the bash-completion package's helpers (it works either way)."""
    p = p or ctl_parser()
    sub = _subparsers(p)
    every = [a for a in p._actions] + [a for sp in sub.choices.values() for a in sp._actions]
    valued = {o: a for a in every if a.nargs != 0 for o in a.option_strings}
    global_valued = [o for a in p._actions if a.nargs != 0 for o in a.option_strings]
    cases = []
    for kind, options in (("files", [o for o, a in valued.items() if a.metavar in PATH_METAVARS]),
                          ("free", [o for o, a in valued.items() if a.metavar not in PATH_METAVARS and not a.choices])):
        if options:
            action = 'COMPREPLY=($(compgen -f -- "$cur"))' if kind == "files" else "COMPREPLY=()"
            cases.append(f"        {'|'.join(sorted(options))}) {action}; return ;;")
    for o, a in sorted(valued.items()):
        if a.choices:
            cases.append(f'        {o}) COMPREPLY=($(compgen -W "{" ".join(a.choices)}" -- "$cur")); return ;;')
    commands = []
    for name, sp in sub.choices.items():
        files = any(not a.option_strings and a.metavar in PATH_METAVARS for a in sp._actions)
        commands.append(f'        {name}) opts="{" ".join(_words(sp._actions))}"; files={int(files)} ;;')
    return f"""# bash completion for cloudmanagerctl {__version__}: generated from its parser by
# `python -m cloudmanagerd.manpage` (make docs); do not edit by hand.
_cloudmanagerctl() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} cmd="" i opts files=0
    # the command: the first word that is neither an option nor an option's value
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            {'|'.join(global_valued)}) ((i++)) ;;
            -*) ;;
            *) cmd=${{COMP_WORDS[i]}}; break ;;
        esac
    done
    case "$prev" in
{chr(10).join(cases)}
    esac
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W "{" ".join(sub.choices)} {" ".join(_words(p._actions))}" -- "$cur"))
        return
    fi
    case "$cmd" in
{chr(10).join(commands)}
        *) return ;;
    esac
    if [[ $cur == -* || $files == 0 ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -F _cloudmanagerctl cloudmanagerctl
"""


def main(argv: list[str] | None = None) -> int:
    args = (argv if argv is not None else sys.argv[1:])
    if len(args) != 2:
        print("usage: python -m cloudmanagerd.manpage MAN_FILE COMPLETION_FILE", file=sys.stderr)
        return 2
    for path, text in zip(args, (man_page(), bash_completion())):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
