"""A Griffe extension for the API pages: show the docstrings' ``>>>`` examples as code blocks.

branchify's docstrings put their runnable examples straight after the prose (pytest runs them as
doctests) instead of under a Google-style ``Examples:`` header, and Markdown reads a bare ``>>>``
as three nested quotes. This wraps each example, up to the blank line that ends it as a doctest,
in a ``pycon`` fence. Loaded by ``mkdocs.yml``; it changes only what the docs show.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """Wrap every doctest example of ``text`` (from its ``>>>`` line to the next blank line) in a ``pycon`` fence."""
    out: list[str] = []
    in_fence = in_example = False
    indent = ""
    for line in text.split("\n"):
        stripped = line.lstrip()
        if in_example and not stripped:
            out.append(f"{indent}```")
            in_example = False
        elif not in_example and stripped.startswith("```"):
            in_fence = not in_fence
        elif not in_example and not in_fence and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}```pycon")
            in_example = True
        out.append(line)
    if in_example:
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    """Fence the doctest examples of every docstring Griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
