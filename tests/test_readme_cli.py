"""The README names every sub-command and every option the parser has (issue 21)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from leantune.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def walk(parser, path=()):
    """(sub-command path, parser) for the parser and every nested sub-parser."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from walk(child, path + (name,))


def missing_from_readme(text: str) -> list[str]:
    missing = []
    for path, parser in walk(build_parser()):
        if path and not _names_command(text, path):
            missing.append(f"sub-command `{' '.join(path)}`")
        for action in parser._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help" and \
                        not re.search(re.escape(opt) + r"(?![\w-])", text):
                    missing.append(f"`{' '.join(path) or 'leantune'} {opt}`")
    return missing


def _names_command(text: str, path: tuple) -> bool:
    """A top-level sub-command starts a table cell (`` | `name``); a nested one is named on a
    line that also names its parent."""
    if len(path) == 1:
        return re.search(r"\|\s*`" + re.escape(path[0]) + r"[\s`]", text) is not None
    words = r"\b.*\b".join(re.escape(p) for p in path)
    return re.search(r"\b" + words + r"\b", text) is not None


def test_readme_names_every_subcommand_and_option():
    missing = missing_from_readme(README.read_text(encoding="utf-8"))
    assert not missing, "README.md does not mention: " + ", ".join(missing)


def test_the_check_catches_an_omission():
    assert "sub-command `bench`" in missing_from_readme("| `train` |")
    assert any("--dry-run" in m for m in missing_from_readme(README.read_text().replace("--dry-run", "")))
