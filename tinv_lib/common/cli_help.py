"""One `--help` style for every script.

argparse's `ArgumentDefaultsHelpFormatter` prints "(default: None)" for flags that are really
required (ours may come from `--config`, so argparse cannot enforce them), repeats a default the
help text already explains, hides flags without help and prints a default of " " as nothing.
This formatter says "(required)" for required flags, shows each default once, and quotes
string defaults whose spaces would otherwise be invisible.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

REQUIRED_MARK = "(required)"


class HelpFormatter(argparse.HelpFormatter):
    """Help lines as `help text (default: X)`, `help text (required)` or just `help text`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or getattr(action, "tinv_required", False):
            return f"{text} {REQUIRED_MARK}".strip()
        if not action.option_strings or any(action.default is unset for unset in (None, False, argparse.SUPPRESS)):
            return text
        if "default" in text.lower():  # the help already says what happens by default
            return text
        return f"{text} (default: {show_default(action.default)})".strip()


def show_default(value: object) -> str:
    """A default as a user types it; empty or space-padded strings quoted (`' '`, `''`)."""
    if isinstance(value, str) and (not value or value != value.strip()):
        text = repr(value)
    else:
        text = str(value)
    return text.replace("%", "%%")  # argparse %-formats help strings


def mark_required(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Mark flags that must be given (on the command line or in `--config`) as required in the
    help, without making argparse refuse a command line that leaves them to the config file."""
    wanted = set(names)
    for action in parser._actions:
        if action.dest in wanted:
            action.tinv_required = True
