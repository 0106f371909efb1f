"""One page per row, from the master smartlink (a JSON object whose strings are Jinja2
templates). Runs only in render processes (``server.jobs.child``), never in the API process
nor in a worker's supervising process.

``compile_master`` compiles once per job in the limited sandbox; a ``Renderer`` renders one row
at a time. Rendering is pure: the same row with the same assets always gives the same bytes,
which is what makes re-rendering a row after a crash harmless (the published file is replaced
by an identical one).

Page layout (all strategies)::

    <!DOCTYPE html><html lang=..><head> meta, <title>, styles </head>
    <body> body, <object id="smartlink-pdf" data=PDF type="application/pdf"></object>, scripts </body></html>
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from html.entities import html5 as html5_entities
from typing import Any

from jinja2 import TemplateSyntaxError, nodes

from server.jobs.contract import BATCH_PDF_RE, TemplateInvalid, template_fields
from server.jobs.sandbox import LimitedEnvironment, LimitHit

INLINE_LIMIT = 16 * 1024  # mixed: scripts at most this big go inside the page
_SYNTAX = ("{{", "{%", "{#")


class RowFailed(Exception):
    """This row cannot be rendered (bad PDF reference, an asset that could not be had)."""


@dataclass(frozen=True)
class Asset:
    """A remote asset or batch file as the worker resolved it: a file (``path``, ``size``) or
    the reason it could not be had (``error``), tried once per job."""

    path: str | None = None
    size: int = 0
    error: str | None = None


# A character reference as markupsafe writes them and as a person writes one on purpose: with its
# ``;``. ``html.unescape`` also reads HTML's legacy names without one, which turned a URL's
# ``?a=1&region=eu`` into ``?a=1®ion=eu`` (``&reg``), ``&times=`` into ``×=``, and so on.
_CHAR_REF = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")


def _unescape(text: str) -> str:
    """The text of autoescaped output: each complete character reference decoded, every other
    ``&`` kept as written."""
    return _CHAR_REF.sub(_char_ref, text) if "&" in text else text


def _char_ref(m: re.Match[str]) -> str:
    ref = m.group(0)
    if ref[1] == "#":
        return html.unescape(ref)
    return html5_entities.get(ref[1:], ref)  # an unknown name stays as written


class _Static:
    """A field without Jinja2 syntax: rendered once at compile time (most asset URLs are), and
    read as a URL once (``url``)."""

    __slots__ = ("text", "url")

    def __init__(self, text: str) -> None:
        self.text = text
        self.url = _unescape(text).strip()

    def render(self, _ctx: Any = None) -> str:
        return self.text


@dataclass
class Compiled:
    title: Any
    lang: Any
    body: Any
    styles: list[tuple[str, Any]]  # ("href" | "content", template)
    scripts: list[tuple[str, Any, bool]]  # ("src" | "content", template, inline)
    pdf: Any


# Tags that load another template by name: a smartlink's template is one document, and its
# environment has no loader (each such tag failed every row of the job it passed the start of).
_LOADING = {nodes.Include: "include", nodes.Extends: "extends", nodes.Import: "import", nodes.FromImport: "from"}


def _refuse_loading(where: str, source: str, env: LimitedEnvironment) -> None:
    if not any(word in source for word in ("include", "extends", "import")):
        return  # no such tag (most templates): not parsed twice
    node = next(env.parse(source).find_all(tuple(_LOADING)), None)
    if node is not None:
        raise TemplateInvalid(f"`{where}` line {node.lineno}: {{% {_LOADING[type(node)]} %}} loads another template, "
                              "and a smartlink template is one document: put what it would load in the template")


def compile_master(doc: dict[str, Any], env: LimitedEnvironment) -> Compiled:
    """Compile every field; raises ``TemplateInvalid`` naming the field and line of a syntax
    error or of a tag that would load another template (and the field of a limit hit while
    compiling)."""
    compiled: dict[str, Any] = {}
    for where, source in template_fields(doc):
        try:
            _refuse_loading(where, source, env)
            t = env.from_string(source)
            compiled[where] = _Static(t.render()) if not any(m in source for m in _SYNTAX) else t
        except TemplateSyntaxError as e:
            raise TemplateInvalid(f"Jinja2 syntax error in `{where}` line {e.lineno}: {e.message}") from None
        except LimitHit as e:
            raise TemplateInvalid(f"`{where}`: {e}") from None
        except ValueError as e:
            # A number literal Python will not convert at FILEDROP_MAX_NUMBER_DIGITS (int() in
            # Jinja2's lexer, repr() in its code generator): the client's, not a dead process.
            if "integer string conversion" not in str(e):
                raise
            raise TemplateInvalid(f"`{where}`: number size limit: a number in it has more digits than "
                                  f"FILEDROP_MAX_NUMBER_DIGITS ({env.max_digits})") from None
        except (SyntaxError, RecursionError) as e:
            # Jinja2's parser and code generator recurse once per level of nesting, and Python
            # compiles at most 20 nested loops and ~100 levels of indentation: a template nested
            # that deeply is the client's to simplify (raw, this was a 3,000-line traceback).
            why = e.msg if isinstance(e, SyntaxError) else "too deeply nested"
            raise TemplateInvalid(f"`{where}` is nested too deeply or is too complex to compile "
                                  f"({why})") from None
    styles = [("href" if f"styles[{i}].href" in compiled else "content",
               compiled.get(f"styles[{i}].href") or compiled[f"styles[{i}].content"])
              for i in range(len(doc.get("styles") or []))]
    scripts = [("src", compiled[f"scripts[{i}].src"], s.get("inline") is True) if f"scripts[{i}].src" in compiled
               else ("content", compiled[f"scripts[{i}].content"], True)
               for i, s in enumerate(doc.get("scripts") or [])]
    return Compiled(compiled.get("title"), compiled.get("lang"), compiled["body"], styles, scripts,
                    compiled.get("pdf"))


class AssetReader:
    """Reads asset files for pages, keeping the most recently used ones in memory up to
    ``budget`` bytes (``FILEDROP_JOB_ASSET_MEMORY``); bigger ones are read each time.

    Invariant: ``held`` is the sum of the sizes the kept entries were counted at (an entry is
    uncounted at the size it was counted at, not at its length: a data: URI's estimate is not its
    length, and the difference grew with every URI made room for, for the process's whole life)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0
        self._cache: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()  # key -> (value, size)

    def _get(self, key: tuple[str, str], make: Any, size: int) -> Any:
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit[0]
        value = make()
        if size <= self.budget:
            self._cache[key] = (value, size)
            self.held += size
            while self.held > self.budget:  # ends with this entry kept at the latest (size <= budget)
                _k, (_old, old_size) = self._cache.popitem(last=False)
                self.held -= old_size
        return value

    def read(self, path: str) -> bytes:
        def load() -> bytes:
            with open(path, "rb") as f:
                return f.read()
        return self._get(("raw", path), load, _size(path))

    def data_uri(self, path: str) -> str:
        return self._get(("b64", path), lambda: "data:application/pdf;base64," +
                         base64.b64encode(self.read(path)).decode("ascii"), _size(path) * 4 // 3 + 64)


def _size(path: str) -> int:
    return os.stat(path).st_size


def _url_text(t: Any, ctx: Mapping[str, Any]) -> str:
    # Autoescaped output is HTML; the URL itself is its unescaped text.
    return t.url if isinstance(t, _Static) else _unescape(t.render(ctx)).strip()


def _inline_js(code: str) -> str:
    return re.sub(r"</(script)", r"<\\/\1", code, flags=re.I).replace("<!--", "<\\!--")


def _inline_css(code: str) -> str:
    return re.sub(r"</(style)", r"<\\/\1", code, flags=re.I)


def _attr(value: str) -> str:
    return html.escape(value, quote=True)


def asset_key(url: str) -> str:
    return "url:" + url


@dataclass(frozen=True)
class Page:
    """A rendered row: the HTML, and files to publish beside it (``(name, source path)``)."""

    html: bytes
    extra: tuple[tuple[str, str], ...] = ()


@dataclass
class Renderer:
    """Renders the rows of one job (in a render process)."""

    compiled: Compiled
    strategy: str
    batch_id: str
    params: Mapping[str, Any]
    reader: AssetReader
    max_page_size: int
    assets: dict[str, Asset] = field(default_factory=dict)
    _inlined: dict[int, str] = field(default_factory=dict)  # static inline code, escaped once
    _fixed: tuple[str, str] | None = None  # style and script lines, when the same on every row
    _opening: str | None = None  # <html lang> and the head's first lines, when lang is static
    _last_pdf: tuple[str, str] = ("", "")  # (pdf, its element)

    def _inline(self, t: Any, ctx: Mapping[str, Any], tag: str) -> str:
        escape = _inline_js if tag == "script" else _inline_css
        if isinstance(t, _Static):
            hit = self._inlined.get(id(t))
            if hit is None:
                hit = self._inlined[id(t)] = f"<{tag}>{escape(t.text)}</{tag}>"
            return hit
        return f"<{tag}>{escape(t.render(ctx))}</{tag}>"

    def _asset(self, key: str, needs: list[str]) -> Asset | None:
        a = self.assets.get(key)
        if a is None:
            needs.append(key)
            return None
        if a.error is not None:
            raise RowFailed(a.error)
        return a

    def _text(self, a: Asset) -> str:
        assert a.path is not None
        return self.reader.read(a.path).decode("utf-8", "replace")

    def _styles_scripts(self, ctx: Mapping[str, Any], needs: list[str]) -> tuple[str, str]:
        """The page's style and script elements, each one a line. With ``smallest`` and no
        template syntax in any of them (the usual case) they are the same on every row: made
        once per job."""
        if self._fixed is not None:
            return self._fixed
        c = self.compiled
        styles: list[str] = []
        for kind, t in c.styles:
            if kind == "content":
                styles.append(self._inline(t, ctx, "style"))
                continue
            url = _url_text(t, ctx)
            if self.strategy == "original":
                a = self._asset(asset_key(url), needs)
                if a is not None:
                    styles.append(f"<style>{_inline_css(self._text(a))}</style>")
            else:
                styles.append(f'<link rel="stylesheet" href="{_attr(url)}">')
        scripts: list[str] = []
        for kind, t, inline in c.scripts:
            if kind == "content":
                scripts.append(self._inline(t, ctx, "script"))
                continue
            url = _url_text(t, ctx)
            if self.strategy == "smallest":
                scripts.append(f'<script src="{_attr(url)}"></script>')
                continue
            a = self._asset(asset_key(url), needs)
            if a is None:
                continue
            if self.strategy == "original" or inline or a.size <= INLINE_LIMIT:
                scripts.append(f"<script>{_inline_js(self._text(a))}</script>")
            else:
                scripts.append(f'<script src="{_attr(url)}"></script>')
        out = "".join(x + "\n" for x in styles), "".join(x + "\n" for x in scripts)
        if self.strategy == "smallest" and all(isinstance(t, _Static) for _k, t in c.styles) \
                and all(isinstance(t, _Static) for _k, t, _i in c.scripts):
            self._fixed = out
        return out

    def _html_open(self, ctx: Mapping[str, Any]) -> str:
        """``<html lang=..>`` and the head's first lines (made once when ``lang`` is static)."""
        if self._opening is not None:
            return self._opening
        lang_t = self.compiled.lang
        lang = _unescape(lang_t.render(ctx)) if lang_t is not None else ""
        text = (f'<html{f" lang={chr(34)}{_attr(lang)}{chr(34)}" if lang else ""}>\n<head>\n<meta charset="utf-8">\n'
                '<meta name="viewport" content="width=device-width, initial-scale=1">\n')
        if lang_t is None or isinstance(lang_t, _Static):
            self._opening = text
        return text

    def _pdf_tag(self, pdf: str) -> str:
        """The PDF's element; the last one is kept (a master's one PDF URL, on every row)."""
        if self._last_pdf[0] != pdf:
            self._last_pdf = (pdf, f'<object id="smartlink-pdf" data="{_attr(pdf)}" type="application/pdf"></object>\n')
        return self._last_pdf[1]

    def render(self, idx: int, reference_id: str, suffix: str, pdf_ref: str | None,
               data: Any) -> Page | list[str]:
        """The page, or the asset keys it still needs (the worker fetches them, then asks again).
        Raises ``RowFailed``, ``LimitHit`` or whatever the template raises on this row."""
        ctx: dict[str, Any] = {"data": data, "params": self.params, "reference_id": reference_id,
                               "suffix": suffix, "batch_id": self.batch_id, "pdf": ""}
        needs: list[str] = []
        extra: list[tuple[str, str]] = []
        c = self.compiled
        pdf_src = pdf_ref or (_url_text(c.pdf, ctx) if c.pdf is not None else "")
        pdf = ""
        if pdf_src:
            m = BATCH_PDF_RE.match(pdf_src)
            if m:
                a = self._asset("batch:" + m.group(1), needs)
                if a is not None and a.path is not None:
                    name = f"{reference_id}.{suffix}.pdf"
                    extra.append((name, a.path))
                    pdf = self.reader.data_uri(a.path) if self.strategy == "original" else name
            elif pdf_src.startswith(("https://", "http://")):
                if self.strategy == "original":
                    a = self._asset(asset_key(pdf_src), needs)
                    if a is not None and a.path is not None:
                        pdf = self.reader.data_uri(a.path)
                else:
                    pdf = pdf_src
            else:
                raise RowFailed(f"pdf {pdf_src!r} is not an http(s) URL or batch:<fileIdx>")
        ctx["pdf"] = pdf
        styles, scripts = self._styles_scripts(ctx, needs)
        if needs:
            return list(dict.fromkeys(needs))
        title = c.title.render(ctx) if c.title is not None else ""
        opening = self._html_open(ctx)
        body = c.body.render(ctx)
        pdf_tag = self._pdf_tag(pdf) if pdf else ""
        parts = ["<!DOCTYPE html>\n", opening, f"<title>{title}</title>\n", styles, "</head>\n<body>\n", body,
                 "\n", pdf_tag, scripts, "</body>\n</html>\n"]
        # Characters first (a page of more characters has more bytes): a huge body is refused
        # before it is copied into a page and encoded.
        size = sum(map(len, parts))
        if size <= self.max_page_size:
            page = "".join(parts).encode("utf-8")
            size = len(page)
        if size > self.max_page_size:
            raise LimitHit(f"page size limit: the page is {size:,} bytes or more, over FILEDROP_MAX_PAGE_SIZE "
                           f"({self.max_page_size:,} bytes)")
        return Page(page, tuple(extra))
