"""The built-in calibration corpus: real Wikipedia articles turned from wikitext into prose.

The articles come from a bz2 MediaWiki XML export shipped by gensim (see
:func:`senslora.data.assets.wikipedia_sample_path`). Wikitext is turned into plain text by a
small regex cleaner (:func:`clean_wikitext`): good enough for calibration statistics, not a
full MediaWiki parser.
"""

from __future__ import annotations

import bz2
import functools
import html
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

from senslora.data.assets import wikipedia_sample_path

__all__ = ["clean_wikitext", "read_wikipedia_articles", "wikipedia_paragraphs"]

logger = logging.getLogger(__name__)

# Namespaces of a default English Wikipedia export: a title "Prefix:..." with one of these
# prefixes is not an article (used only when a page has no <ns> element).
_NAMESPACE_PREFIXES = frozenset(
    "media special talk user wikipedia file mediawiki template help category portal book "
    "draft module topic image project wp timedtext gadget".split()
)
# Tags whose content is not prose: dropped with everything inside them (their self-closing
# forms, like <ref name="x"/>, go with the other tags).
_DROPPED_TAGS = "ref|math|gallery|timeline|score|syntaxhighlight|source|chem|templatedata"
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_DROPPED_ELEMENT = re.compile(rf"<({_DROPPED_TAGS})\b[^>]*(?<!/)>.*?</\1\s*>", re.I | re.S)
_LINE_BREAK_TAG = re.compile(r"<br\s*/?>", re.I)
_HTML_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_EXTERNAL_LINK = re.compile(r"\[(?:(?:https?|ftp):)?//[^\s\[\]]*(?:\s+([^\[\]]*))?\]")
_NON_PROSE_LINK = re.compile(r"^\s*:?\s*(?:file|image|category|media)\s*:", re.I)
_RANGE_WORDS = frozenset({"to", "-", "–", "and", "or", "by", "x", "×", "+/-", "±"})
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*:")
_QUOTES = re.compile(r"'{2,}")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_HEADING_LINE = re.compile(r"^\s*=+.*=+\s*$")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_SPACES = re.compile(r"[ \t\u00a0]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])(?=\s|$)")
_SPACE_AFTER_PAREN = re.compile(r"\( +")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]*\s*\)")


def _replace_nested(text: str, opener: str, closer: str, replace: Callable[[str], str]) -> str:
    """Replace every ``opener inner closer`` span by ``replace(inner)``, innermost first.

    A small stack handles nesting: ``inner`` arrives with its own nested spans already
    replaced. A closer made of one repeated character (``]]``) is read from the right of a
    run, so ``[[File:x|a [b]]]`` closes after ``[b]``. An opener that is never closed is
    dropped by itself (its content is kept), and so is a closer with no opener, so that one
    stray bracket never swallows an article.
    """
    repeated = len(set(closer)) == 1
    closer_pattern = f"{re.escape(closer[0])}{{2,}}" if repeated else re.escape(closer)
    stack: list[list[str]] = [[]]
    position = 0
    for match in re.finditer(f"{re.escape(opener)}|{closer_pattern}", text):
        stack[-1].append(text[position : match.start()])
        position = match.end()
        token = match.group()
        if token == opener:
            stack.append([])
            continue
        if repeated and len(token) % 2:  # ']]]' is ']' then ']]'
            stack[-1].append(token[0])
        for _ in range(len(token) // len(closer) if repeated else 1):
            if len(stack) > 1:
                inner = "".join(stack.pop())
                stack[-1].append(replace(inner))
    stack[-1].append(text[position:])
    while len(stack) > 1:
        inner = "".join(stack.pop())
        stack[-1].append(inner)
    return "".join(stack[0])


def _drop(_: str) -> str:
    return ""


def _split_params(inner: str) -> list[str]:
    """Split a template's inner text at the pipes that are not inside a [[link|label]]."""
    parts, depth, start = [], 0, 0
    for match in re.finditer(r"\[\[|\]\]|\|", inner):
        token = match.group()
        if token != "|":
            depth = depth + 1 if token == "[[" else max(depth - 1, 0)
        elif depth == 0:
            parts.append(inner[start : match.start()].strip())
            start = match.end()
    parts.append(inner[start:].strip())
    return parts


def _template_text(inner: str) -> str:
    """Visible text of the template ``{{inner}}``: numbers of {{convert}}, text of {{lang}}.

    Every other template (citations, infoboxes, navigation, maintenance tags) is dropped.
    """
    name, *params = _split_params(inner)
    positional = [param for param in params if "=" not in param]
    name = name.lower()
    if name in ("convert", "cvt") and len(positional) >= 2:
        if positional[1] in _RANGE_WORDS and len(positional) >= 4:
            return " ".join(positional[:4])  # {{convert|2|to|4|km}} -> "2 to 4 km"
        return " ".join(positional[:2])  # {{convert|5|km|mi}} -> "5 km"
    if name == "lang" and len(positional) >= 2:
        return positional[1]  # {{lang|fr|Le Monde}} -> "Le Monde"
    return ""


def _link_text(inner: str) -> str:
    """The visible text of the link ``[[inner]]`` ('' for file, category, language links)."""
    target, _, label = inner.partition("|")
    if _NON_PROSE_LINK.match(target):
        return ""
    if not label and _INTERLANGUAGE.match(target):
        return ""
    return (label or target).strip()


def _clean_lines(text: str) -> str:
    """Drop heading lines, strip list markers and tidy the spaces of every line."""
    lines = []
    for line in text.split("\n"):
        if _HEADING_LINE.match(line):
            continue
        line = _LIST_MARKER.sub("", line.strip())
        line = _SPACES.sub(" ", line)
        line = _EMPTY_PARENS.sub("", line)
        line = _SPACE_AFTER_PAREN.sub("(", line)
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
        lines.append(_SPACES.sub(" ", line).strip())
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def clean_wikitext(wikitext: str) -> str:
    """Plain prose from wikitext: markup, templates, tables, references and headings removed.

    Lines of the result are the paragraphs and list items of the article.
    """
    text = _COMMENT.sub("", wikitext)
    text = _DROPPED_ELEMENT.sub("", text)
    text = _replace_nested(text, "{{", "}}", _template_text)
    text = _replace_nested(text, "{|", "|}", _drop)  # tables
    text = _replace_nested(text, "[[", "]]", _link_text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _LINE_BREAK_TAG.sub(" ", text)
    text = _HTML_TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = html.unescape(text)
    return _clean_lines(text)


def _local_name(tag: str) -> str:
    """``{namespace}page`` -> ``page``."""
    return tag.rsplit("}", 1)[-1]


def _is_article(title: str, namespace: str | None, wikitext: str) -> bool:
    if wikitext.lstrip()[:9].upper() == "#REDIRECT":
        return False
    if namespace is not None:
        return namespace.strip() == "0"
    prefix, colon, _ = title.partition(":")
    return not (colon and prefix.strip().lower() in _NAMESPACE_PREFIXES)


def _page_fields(page: ET.Element) -> tuple[str, str | None, str, bool]:
    """(title, namespace or None, wikitext, is_redirect) of a <page> element."""
    first_text: dict[str, str] = {}
    is_redirect = False
    for child in page.iter():
        name = _local_name(child.tag)
        if name == "redirect":
            is_redirect = True
        elif name in ("title", "ns", "text"):
            first_text.setdefault(name, child.text or "")
    title = first_text.get("title", "").strip()
    return title, first_text.get("ns"), first_text.get("text", ""), is_redirect


def _iter_pages(path: Path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of every article page of a (bz2) MediaWiki XML export."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as stream:
        for _, element in ET.iterparse(stream, events=("end",)):
            if _local_name(element.tag) != "page":
                continue
            title, namespace, wikitext, is_redirect = _page_fields(element)
            element.clear()
            if not is_redirect and _is_article(title, namespace, wikitext):
                yield title, wikitext


@functools.lru_cache(maxsize=8)
def _cached_articles(path: str) -> tuple[tuple[str, str], ...]:
    articles = []
    for title, wikitext in _iter_pages(Path(path)):
        text = clean_wikitext(wikitext)
        if text:
            articles.append((title, text))
    logger.info("read %d Wikipedia articles from %s", len(articles), path)
    return tuple(articles)


def _resolve(path: Path | str | None) -> str:
    resolved = Path(path) if path is not None else wikipedia_sample_path()
    if not resolved.is_file():
        raise FileNotFoundError(f"Wikipedia export not found: {resolved}")
    return str(resolved.resolve())


def read_wikipedia_articles(path: Path | str | None = None) -> list[tuple[str, str]]:
    """(title, plain text) of every article in a MediaWiki XML export, in file order.

    Redirects, pages outside the article namespace and articles that clean to nothing are
    skipped. ``path`` defaults to the export shipped by gensim; results are cached per path.
    """
    return list(_cached_articles(_resolve(path)))


def wikipedia_paragraphs(path: Path | str | None = None, min_words: int = 20) -> list[str]:
    """Paragraphs (lines of the cleaned articles) with at least ``min_words`` words, in order."""
    if isinstance(min_words, bool) or not isinstance(min_words, int) or min_words < 1:
        raise ValueError(f"min_words must be a positive integer, got {min_words!r}")
    return [
        paragraph
        for _, text in _cached_articles(_resolve(path))
        for paragraph in text.split("\n")
        if len(paragraph.split()) >= min_words
    ]
