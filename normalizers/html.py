"""HTML bodies of every channel: sanitized HTML for the desk and readable text for everyone else."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import nh3

# No remote schemes for anything a mail client would load by itself; cid: keeps inline images.
_URL_SCHEMES = {"http", "https", "mailto", "tel", "cid"}
_DROP_CONTENT = {
    "script", "style", "title", "head", "noscript", "template", "object", "iframe", "svg", "math",
}  # fmt: skip
_BLOCK = {
    "address", "article", "aside", "blockquote", "center", "dd", "div", "dl", "dt", "fieldset",
    "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li",
    "main", "nav", "ol", "p", "pre", "section", "table", "tr", "ul",
}  # fmt: skip
_BLANK_LINES = re.compile(r"\n{3,}")
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")


def _attribute_filter(tag: str, attribute: str, value: str) -> str | None:
    # A remote image is a tracking pixel or a content swap after delivery: only inline (cid:) stays.
    if tag == "img" and attribute == "src" and not value.strip().lower().startswith("cid:"):
        return None
    return value


def sanitize(html: str) -> str:
    """Remove scripts, event handlers, styles and remote resources; keep structure, links, cid: images."""
    return nh3.clean(
        html,
        clean_content_tags=_DROP_CONTENT,
        url_schemes=_URL_SCHEMES,
        attribute_filter=_attribute_filter,
        link_rel="noopener noreferrer nofollow",
    )


class _TextExtractor(HTMLParser):
    """Block elements become line breaks, blockquotes become ``> `` lines (so reply stripping works)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.current: list[str] = []
        self.skip = 0
        self.quote = 0
        self.pre = 0

    def _break(self) -> None:
        text = "".join(self.current)
        if not self.pre:
            text = _SPACES.sub(" ", text).strip()
        self.lines.append(("> " * self.quote) + text if text else ("> " * self.quote).rstrip())
        self.current = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROP_CONTENT:
            self.skip += 1
        elif tag == "br":
            self._break()
        elif tag in _BLOCK:
            if self.current:
                self._break()
            if tag == "blockquote":
                self.quote += 1
            elif tag == "pre":
                self.pre += 1
            elif tag == "li":
                self.current.append("- ")
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt and not self.skip:
                self.current.append(f"[{alt}]")

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROP_CONTENT:
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCK:
            if self.current:
                self._break()
            if tag == "blockquote":
                self.quote = max(0, self.quote - 1)
            elif tag == "pre":
                self.pre = max(0, self.pre - 1)
            elif tag in {"p", "div", "table"} and self.lines and self.lines[-1]:
                self.lines.append("")
        elif tag in {"td", "th"}:
            self.current.append(" ")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.current.append(data if self.pre else data.replace("\n", " "))


def to_text(html: str) -> str:
    """Readable plain text from an HTML body."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    if parser.current:
        parser._break()
    text = "\n".join(line.rstrip() for line in parser.lines)
    return _BLANK_LINES.sub("\n\n", text).strip()
