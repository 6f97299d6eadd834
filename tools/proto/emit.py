"""Helpers both code generators use: an indenting line writer and field grouping."""

from __future__ import annotations

from tools.proto.spec import Field


class Lines:
    """Collects generated lines; `w(text, indent)` appends one, indented by 4 spaces a level."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "", indent: int = 0) -> None:
        self.lines.append(("    " * indent + text) if text else "")


def fixed_groups(fields: tuple[Field, ...]) -> list[list[Field] | Field]:
    """Consecutive fixed-width fields become one struct; variable ones stand alone."""
    groups: list[list[Field] | Field] = []
    for f in fields:
        if f.fixed:
            if groups and isinstance(groups[-1], list):
                groups[-1].append(f)
            else:
                groups.append([f])
        else:
            groups.append(f)
    return groups
