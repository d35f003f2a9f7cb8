"""One ``--help`` style for every ``fortify`` parser: plain text, real defaults.

``HelpFormatter`` appends ``(default: X)`` to an option whose default is a real value and whose
help does not already state one; options without a value (``None``, flags that are off, empty
lists) get nothing appended, so their help text must say what happens when they are omitted.
Descriptions written as reStructuredText docstrings are shown as plain text.
"""

from __future__ import annotations

import argparse
import copy
import re

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc|ref|doc):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain(text: str) -> str:
    """``text`` without reStructuredText markup (roles and double-backquoted literals)."""
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


def show_default(value: object) -> str | None:
    """How a default reads in ``--help``; ``None`` when there is no value worth showing."""
    if value is None or value is False or value is argparse.SUPPRESS:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if value else None
    return str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every real default; keeps paragraphs whose lines are all indented (tables in an
    epilog) as they are, and re-wraps every other paragraph to the terminal width."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = plain(action.help or "")
        if "default" in text.lower() or action.option_strings == []:
            return text
        if action.nargs == 0:  # flags (store_true, help, version): the default is "off"
            return text
        shown = show_default(action.default)
        if shown is None:
            return text
        shown = shown.replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"default: {shown}"

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.nargs != 0:
            shown = show_default(action.default)
            if shown is not None:  # an option without help text still shows its default
                action = copy.copy(action)
                action.help = "default: " + shown.replace("%", "%%")
        return super()._format_action(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for para in plain(text).split("\n\n"):
            lines = para.strip("\n").splitlines()
            if lines and all(line.startswith(" ") for line in lines):
                out.append("\n".join(indent + line for line in lines))
            else:
                flat = self._whitespace_matcher.sub(" ", para).strip()
                out.append(argparse.HelpFormatter._fill_text(self, flat, width, indent))
        return "\n\n".join(out)
