"""Every example in README.md and docs/*.md works as written.

Conventions for the documentation:

- Each ```python block is executed on its own: a fresh namespace, a fresh temporary directory as
  the working directory. A block preceded by the line ``<!-- continues -->`` (blank lines
  between are fine) continues the block before it in the same file: it runs after it, in the
  same namespace and directory. Keep examples quick (seconds): train a few steps at most.
- Each command line starting with ``meanflow `` in a ```bash / ```sh / ```shell / ```console
  block (a leading ``$ `` prompt is dropped) or in an indented code block (four or more spaces)
  is parsed by :func:`meanflow.cli.build_parser`, so every subcommand and flag must exist
  (``torchrun ... -m meanflow ARGS`` lines too: their ``meanflow ARGS`` part).
  Trailing ``# comments`` are dropped and ``\\`` line continuations joined. Each ``--set
  KEY=VALUE`` must name a key of :func:`~meanflow.config.schema.config_keys` with a valid value,
  and each ``--preset`` one of :data:`~meanflow.config.presets.PRESETS`.
  Commands in inline backticks are prose (they may hold placeholders) and are not checked.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shlex
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
CONTINUES = "<!-- continues -->"
SHELL_LANGS = ("bash", "sh", "shell", "console")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


@dataclass
class Snippet:
    path: str  # relative to the repository root
    line: int  # 1-based line of the first line of code
    text: str
    continues: bool = False

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def extract(path: str) -> tuple[list[Snippet], list[Snippet]]:
    """The ```python blocks and the ``meanflow`` command lines of the markdown file ``path``."""
    rel = os.path.relpath(path, ROOT)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, commands = [], []
    i, last_text = 0, ""
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            marker, lang = fence.group(1), fence.group(2).lower()
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(marker):
                end += 1
            body = lines[i + 1:end]
            if lang in ("python", "py"):
                blocks.append(Snippet(rel, i + 2, "\n".join(body), last_text == CONTINUES))
            elif lang in SHELL_LANGS:
                commands += _commands(rel, i + 2, body, prompt=True)
            last_text, i = "", end + 1
            continue
        if re.match(r"^ {4,}\S", line):  # an indented code block (or list continuation)
            end = i
            while end < len(lines) and re.match(r"^ {4,}\S", lines[end]):
                end += 1
            commands += _commands(rel, i + 1, lines[i:end], prompt=True)
            last_text, i = lines[end - 1].strip(), end
            continue
        if line.strip():
            last_text = line.strip()
        i += 1
    return blocks, commands


def _commands(rel: str, first: int, body: list[str], prompt: bool) -> list[Snippet]:
    out: list[Snippet] = []
    j = 0
    while j < len(body):
        start, text = j, body[j].strip()
        while text.endswith("\\") and j + 1 < len(body):
            j += 1
            text = text[:-1] + " " + body[j].strip()
        if prompt and text.startswith("$ "):
            text = text[2:].lstrip()
        if text.startswith("torchrun ") and " -m meanflow " in text:  # torchrun's args dropped
            text = "meanflow " + text.split(" -m meanflow ", 1)[1]
        if text.startswith("meanflow "):
            out.append(Snippet(rel, first + start, text))
        j += 1
    return out


def command_problem(text: str) -> str | None:
    """Why the command line ``text`` (``meanflow ...``) would be refused, or None if it parses."""
    from meanflow.cli import build_parser
    from meanflow.config.presets import PRESETS
    from meanflow.config.overrides import set_value
    from meanflow.config.schema import TrainConfig, config_keys
    from meanflow.errors import MeanFlowError

    try:
        argv = shlex.split(text, comments=True)
    except ValueError as exc:
        return f"cannot split the line: {exc}"
    if not argv or argv[0] != "meanflow":
        return "does not start with 'meanflow'"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        return None if exc.code == 0 else (err.getvalue().strip() or f"exit {exc.code}")
    preset = getattr(args, "preset", None)
    if preset is not None and preset not in PRESETS:
        return f"unknown --preset {preset!r}"
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in config_keys():
            return f"unknown --set key in {item!r}"
        try:
            set_value(TrainConfig(), key.strip(), value.strip())
        except MeanFlowError as exc:
            return f"--set {item}: {exc}"
    return None


def _all() -> tuple[list[Snippet], list[Snippet]]:
    blocks, commands = [], []
    for path in DOCS:
        b, c = extract(path)
        blocks += b
        commands += c
    return blocks, commands


BLOCKS, COMMANDS = _all()


def _chains(blocks: list[Snippet]) -> list[list[Snippet]]:
    chains: list[list[Snippet]] = []
    for block in blocks:
        if block.continues and chains and chains[-1][0].path == block.path:
            chains[-1].append(block)
        else:
            chains.append([block])
    return chains


CHAINS = _chains(BLOCKS)


def test_the_documentation_has_examples_to_check():
    assert any(b.path == "README.md" for b in BLOCKS), "no ```python block found in README.md"
    assert len([c for c in COMMANDS if c.path == "README.md"]) >= 10
    assert any(c.path.startswith("docs") for c in COMMANDS)
    first = CHAINS[0][0]
    assert not first.continues or first.path != "README.md"


def test_command_check_can_fail(tmp_path):
    """The command check refuses what the CLI refuses; the extractor finds every form."""
    assert command_problem("meanflow train --data checkerboard --out runs/cb") is None
    assert command_problem("meanflow sample --run r --num 4 --out s.npy  # a comment") is None
    assert "--bogus-flag" in command_problem("meanflow train --data checkerboard --bogus-flag")
    assert command_problem("meanflow sampel --run r --num 4 --out s.npy")
    assert command_problem("meanflow sample --run r --out s.npy")  # --num is required
    assert "preset" in command_problem("meanflow train --data x --preset toy2d")
    assert "time.ration" in command_problem("meanflow train --data x --set time.ration=0.5")
    assert "time.ratio" in command_problem("meanflow train --data x --set time.ratio=half")
    page = tmp_path / "page.md"
    page.write_text("text\n\n    meanflow train --data x --oops\n\n```console\n$ meanflow eval \\\n"
                    "    --run r --reference checkerboard   # note\n```\n\n<!-- continues -->\n\n"
                    "```python\nx = 1\n```\n")
    blocks, commands = extract(str(page))
    assert [c.text for c in commands] == [
        "meanflow train --data x --oops",
        "meanflow eval  --run r --reference checkerboard   # note"]
    assert [c.line for c in commands] == [3, 6]
    assert command_problem(commands[0].text) and command_problem(commands[1].text) is None
    assert len(blocks) == 1 and blocks[0].continues and blocks[0].line == 13


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_parses(command):
    problem = command_problem(command.text)
    assert problem is None, f"{command.where}: {command.text}\n  {problem}"


@pytest.mark.parametrize("chain", CHAINS, ids=[c[0].where for c in CHAINS])
def test_python_example_runs(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_example__"}
    for block in chain:
        # pad with newlines so that a traceback names the markdown file and line
        code = compile("\n" * (block.line - 1) + block.text, os.path.join(ROOT, block.path), "exec")
        exec(code, namespace)
