"""Plain-text ``--help``: command descriptions are module docstrings written in reST (for the API docs);
:func:`plain` turns the markup a terminal would show raw (````literal````, ``:role:`x```, ``::`` blocks)
into plain text, so ``corral COMMAND --help`` reads as prose."""

from __future__ import annotations

import re

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)


def plain(text: str | None) -> str | None:
    """``text`` without reST inline markup; a paragraph ending in ``::`` ends in ``:`` (a lone ``::``
    line goes)."""
    if not text:
        return text
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if "." in m.group(1) else m.group(1), text)
    text = _LITERAL.sub(r"\1", text)
    lines = []
    for line in text.splitlines():
        if line.strip() == "::":
            continue
        lines.append(re.sub(r"(\S)::\s*$", r"\1:", line))
    return "\n".join(lines)
