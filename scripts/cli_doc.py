"""Regenerate docs/cli.md, the command-line reference, from the parsers' ``--help`` (a test
checks the file is current).

    python scripts/cli_doc.py > docs/cli.md
"""

from __future__ import annotations

import os

# argparse wraps help to the terminal's width: fixed here, so the page is the same everywhere
os.environ["COLUMNS"] = "100"

from meanflow.cli import _leaf_parsers, build_parser  # noqa: E402


def render() -> str:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0]
    lines = [
        "# Command-line reference",
        "",
        "Every `meanflow` command and option, as `--help` prints them. This page is generated",
        "by `python scripts/cli_doc.py > docs/cli.md`; a test keeps it current. User errors",
        "are one line `meanflow: error: ...` with exit code 2.",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
        "",
    ]
    for command in _leaf_parsers(sub):
        name = command.prog.removeprefix("meanflow ")
        lines += [f"## meanflow {name}", "", "```text", command.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
