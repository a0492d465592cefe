"""The model's Markdown as Telegram HTML (the parse mode that tolerates odd text best).

Only what Telegram can show is translated: code blocks, inline code, bold, italic,
strikethrough, links, headings (as bold), bullets and quotes. Everything else is escaped,
so the worst a strange input can do is show its asterisks.
"""

from __future__ import annotations

import re
from html import escape, unescape

from bot.fences import Kind, classify

_LANGUAGE = re.compile(r"[\w+#.-]+")
_INLINE = re.compile(
    r"(?P<tick>`+)(?P<code>[^\n]+?)(?P=tick)"
    # A URL may hold parentheses in pairs, as Wikipedia's do (CommonMark allows them).
    r"|\[(?P<label>[^\]\n]+)\]\((?P<url>https?://(?:[^\s()]|\([^\s()]*\))+)\)"
    # A closing ** followed by a third * leaves that one to an italic inside: ***x***.
    r"|\*\*(?P<bold>(?=\S)[^\n]+?(?<=\S))\*\*(?!\*)"
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
    segments: list[str] = []  # prose runs and code blocks, one line break apart
    prose: list[str] = []
    code: list[str] | None = None
    language = ""
    for line in classify(markdown.split("\n")):
        if line.kind is Kind.PROSE:
            prose.append(line.text)
        elif line.kind is Kind.OPENING:
            assert line.fence is not None
            if prose:
                segments.append(_prose(prose))
                prose = []
            code = []
            language = line.fence.language if _LANGUAGE.fullmatch(line.fence.language) else ""
        elif line.kind is Kind.CODE:
            assert code is not None
            code.append(line.text)
        else:
            assert code is not None
            segments.append(_block(code, language))
            code = None
    if code is not None:  # an unclosed fence runs to the end, as it does in Markdown
        segments.append(_block(code, language))
    elif prose:
        segments.append(_prose(prose))
    return "\n".join(segments)


def _block(lines: list[str], language: str) -> str:
    code = escape("\n".join(lines), quote=False)
    if language:
        return f'<pre><code class="language-{escape(language)}">{code}</code></pre>'
    return f"<pre>{code}</pre>"


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
