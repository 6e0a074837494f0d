"""The application's strings in the Markdown report, written so that nothing in them is markup.

A route, query shape, location or stack frame comes from the service and may hold anything:
`<script>`, backticks, `|`, line breaks. Every one goes through `code` (inline code, which
CommonMark renders as text whatever it holds), `text` (plain text, its markup escaped) or
`fenced` (a code block), and all three keep it on one line with `visible`:

    code("/r/<b>`x`|\n")             -> "``/r/<b>`x`|\\n``"
    code("a|b", cell=True)           -> "`a\\|b`"   (a table cell: GFM reads `\\|` as `|`)
    text("<img src=x> *a*")          -> "&lt;img src=x&gt; \\*a\\*"

Inside inline code `<` and `&` cannot be escaped (CommonMark shows `&lt;` as it is written), so
a viewer that is not CommonMark may still read HTML there: the report is CommonMark (with GFM
tables), and the tests render it with markdown-it-py to check no HTML comes out.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BACKTICKS = re.compile("`+")
# Markdown's inline markup (emphasis, links, code, tables, strikethrough, math); `<`, `>` and
# `&` become entities, which every Markdown and HTML viewer shows as the characters. An
# underscore between two letters or digits emphasizes nothing (CommonMark), so `n_plus_one`
# stays as it is written.
_MARKUP = re.compile(r"[\\`*\[\]|~$]|(?<![^\W_])_|_(?![^\W_])")


def visible(text: str) -> str:
    """`text` on one line: line breaks and other characters that do not print, escaped (`\\n`)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _longest_backticks(text: str) -> int:
    return max((len(run) for run in _BACKTICKS.findall(text)), default=0)


def code(value: Any, *, cell: bool = False) -> str:
    """`value` (JSON unless a string) as inline code: on one line, between more backticks than
    it holds in a row; its `|` escaped in a table `cell`."""
    content = visible(value if isinstance(value, str) else json.dumps(value))
    if cell:
        content = content.replace("|", "\\|")
    if not content.strip(" "):  # empty or only spaces: CommonMark keeps those as they are
        return f"`{content or ' '}`"
    fence = "`" * (_longest_backticks(content) + 1)
    # CommonMark strips one space from each end of a span that has both: a span starting or
    # ending with a backtick needs that space, and so does one that starts and ends with one.
    if content[0] in "` " or content[-1] in "` ":
        content = f" {content} "
    return f"{fence}{content}{fence}"


def text(value: Any) -> str:
    """`value` as plain Markdown text: on one line, nothing in it read as markup or HTML."""
    escaped = visible(str(value)).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKUP.sub(lambda found: "\\" + found[0], escaped)


def fenced(info: str, lines: list[str]) -> list[str]:
    """`lines` as a fenced code block, each on one line, the fence longer than any run of
    backticks inside."""
    shown = [visible(line) for line in lines]
    fence = "`" * max(3, max(map(_longest_backticks, shown), default=0) + 1)
    return [f"{fence}{info}", *shown, fence]
