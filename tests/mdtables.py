"""A strict reader of GitHub-flavoured Markdown pipe tables, for checking rendered reports."""

from __future__ import annotations

import re

SEPARATOR = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+$")


def cells(line: str) -> list[str]:
    """The cells of one table row (a backslash-escaped pipe stays inside its cell)."""
    assert line.startswith("|") and line.endswith("|"), line
    parts = re.split(r"(?<!\\)\|", line[1:-1])
    return [p.strip() for p in parts]


def tables(text: str) -> list[list[list[str]]]:
    """Every table in `text` as rows of cells, header first; asserts each is well formed.

    A table is a run of consecutive lines starting with '|', after a blank
    line: a header row, a separator row with one '---' per column, then rows
    of exactly that many cells.
    """
    found, block, previous = [], [], ""
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not block:
                assert previous.strip() == "", f"table must follow a blank line: {previous!r}"
            block.append(line.rstrip())
            previous = line
            continue
        previous = line
        if block:
            assert len(block) >= 2, block
            header = cells(block[0])
            assert SEPARATOR.match(block[1]), block[1]
            assert len(cells(block[1])) == len(header), block[1]
            rows = [cells(row) for row in block[2:]]
            for row, line_text in zip(rows, block[2:]):
                assert len(row) == len(header), line_text
            found.append([header] + rows)
            block = []
    return found
