"""The model's Markdown as Telegram HTML (the parse mode that tolerates odd text best).

Only what Telegram can show is translated: code blocks, inline code, bold, italic,
strikethrough, links, headings (as bold), bullets and quotes. Everything else is escaped,
so the worst a strange input can do is show its asterisks.
"""

from __future__ import annotations

import re
from html import escape, unescape

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[ \t]*$")
_INLINE = re.compile(
    r"(?P<tick>`+)(?P<code>[^\n]+?)(?P=tick)"
    r"|\[(?P<label>[^\]\n]+)\]\((?P<url>https?://[^\s)]+)\)"
    r"|\*\*(?P<bold>(?=\S)[^\n]+?(?<=\S))\*\*"
    r"|(?<![\w_])__(?P<bold2>(?=\S)[^\n]+?(?<=\S))__(?![\w_])"
    r"|~~(?P<strike>(?=\S)[^\n]+?(?<=\S))~~"
    r"|(?<![\w*])\*(?P<italic>(?=[^\s*])[^\n*]*?(?<=[^\s*]))\*(?![\w*])"
    r"|(?<![\w_])_(?P<italic2>(?=[^\s_])[^\n_]*?(?<=[^\s_]))_(?![\w_])"
)
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t#]*$")
_BULLET = re.compile(r"^([ \t]*)[-*+][ \t]+(.*)$")
_QUOTE = re.compile(r"^ {0,3}>[ \t]?(.*)$")


def has_markup(html: str, text: str) -> bool:
    """Whether rendering changed more than the escaping of ``<``, ``>`` and ``&``, and left
    something to see (Telegram refuses a message that shows nothing, such as an empty code
    block; plain text shows its backticks instead)."""
    return html != escape(text, quote=False) and bool(visible_text(html).strip())


def visible_text(html: str) -> str:
    return unescape(re.sub(r"<[^>]*>", "", html))


def to_html(markdown: str) -> str:
    out: list[str] = []
    prose: list[str] = []
    lines = markdown.split("\n")
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            prose.append(lines[index])
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not _FENCE.match(lines[end]):
            end += 1
        if prose:
            out.append(_prose(prose) + "\n")
            prose = []
        code = escape("\n".join(lines[index + 1:end]), quote=False)
        language = opening.group(1)
        out.append(f'<pre><code class="language-{escape(language)}">{code}</code></pre>'
                   if language else f"<pre>{code}</pre>")
        index = end + 1  # an unclosed fence runs to the end, as it would in Markdown
        if index < len(lines):
            out.append("\n")
    if prose:
        out.append(_prose(prose))
    return "".join(out)


def _prose(lines: list[str]) -> str:
    rendered: list[str] = []
    quote: list[str] = []
    for line in lines:
        quoted = _QUOTE.match(line)
        if quoted is not None:
            quote.append(_inline(quoted.group(1)))
            continue
        if quote:
            rendered.append("<blockquote>" + "\n".join(quote) + "</blockquote>")
            quote = []
        heading = _HEADING.match(line)
        bullet = _BULLET.match(line)
        if heading is not None and heading.group(1):
            rendered.append(f"<b>{_inline(heading.group(1))}</b>")
        elif bullet is not None:
            rendered.append(f"{bullet.group(1)}• {_inline(bullet.group(2))}")
        else:
            rendered.append(_inline(line))
    if quote:
        rendered.append("<blockquote>" + "\n".join(quote) + "</blockquote>")
    return "\n".join(rendered)


def _inline(text: str) -> str:
    out: list[str] = []
    position = 0
    for match in _INLINE.finditer(text):
        out.append(escape(text[position:match.start()], quote=False))
        position = match.end()
        groups = match.groupdict()
        if groups["code"] is not None:
            out.append(f"<code>{escape(groups['code'], quote=False)}</code>")
        elif groups["label"] is not None:
            out.append(f'<a href="{escape(groups["url"])}">{_inline(groups["label"])}</a>')
        elif (bold := groups["bold"] or groups["bold2"]) is not None:
            out.append(f"<b>{_inline(bold)}</b>")
        elif groups["strike"] is not None:
            out.append(f"<s>{_inline(groups['strike'])}</s>")
        else:
            out.append(f"<i>{_inline(groups['italic'] or groups['italic2'])}</i>")
    out.append(escape(text[position:], quote=False))
    return "".join(out)
