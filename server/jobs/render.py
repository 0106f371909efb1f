"""The master smartlink (a JSON object whose strings are Jinja2 templates) and one page per row.

``compile_template`` validates and compiles once per job (sandboxed, autoescaped); a
``Renderer`` renders rows in a worker thread. Rendering is pure apart from the publish step:
the same row with the same assets always gives the same bytes, which is what makes re-rendering
a row after a crash harmless (the final file is replaced by an identical one).

Page layout (all strategies)::

    <!DOCTYPE html><html lang=..><head> meta, <title>, styles </head>
    <body> body, <object id="smartlink-pdf" data=PDF type="application/pdf"></object>, scripts </body></html>
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import html
import json
import os
import re
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.jobs.publish import Item, publish_batch

STRATEGIES = ("smallest", "mixed", "original")
INLINE_LIMIT = 16 * 1024  # mixed: scripts at most this big go inside the page
# \Z, not $: `$` also matches before a trailing newline, which would let "ref\n" through into a
# file name.
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")
BATCH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")
BATCH_PDF_RE = re.compile(r"^batch:(\d{1,9})\Z")


class TemplateInvalid(ValueError):
    """The master smartlink is unusable; the message says where."""


@dataclass(frozen=True)
class AssetError:
    """A remote asset or batch file that could not be had (cached so it is tried once per job)."""

    message: str


@dataclass
class Compiled:
    title: Any
    lang: Any
    body: Any
    styles: list[tuple[str, Any]]  # ("href" | "content", template)
    scripts: list[tuple[str, Any, bool]]  # ("src" | "content", template, inline)
    pdf: Any


class _Static:
    """A field without Jinja2 syntax: rendered once at compile time (most asset URLs are)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def render(self, _ctx: Any = None) -> str:
        return self.text


_SYNTAX = ("{{", "{%", "{#")


def _env() -> ImmutableSandboxedEnvironment:
    # Immutable: `params` is one object shared by every row (and render thread) of a job. With
    # the plain sandbox a template could `params.x.append(data)`, so a page would show other
    # rows' data and depend on which rows rendered before it (a re-render after a crash would
    # not give the same bytes). Per-template state still works through `namespace()`.
    return ImmutableSandboxedEnvironment(autoescape=True, auto_reload=False, cache_size=0)


def compile_template(text: str | bytes) -> tuple[Compiled, str]:
    """Validate and compile the master smartlink; returns it and its canonical JSON.

    Raises ``TemplateInvalid`` for non-JSON, a missing/non-string ``body``, a malformed
    ``styles``/``scripts`` list, or a Jinja2 syntax error (with the field and line).
    """
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise TemplateInvalid(f"not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise TemplateInvalid("must be a JSON object")
    if not isinstance(doc.get("body"), str) or not doc["body"].strip():
        raise TemplateInvalid("has no `body` (a non-empty string)")
    env = _env()

    def comp(where: str, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise TemplateInvalid(f"`{where}` must be a string")
        try:
            t = env.from_string(value)
        except TemplateSyntaxError as e:
            raise TemplateInvalid(f"Jinja2 syntax error in `{where}` line {e.lineno}: {e.message}") from None
        if not any(m in value for m in _SYNTAX):
            return _Static(t.render())
        return t

    def items(key: str) -> list[dict[str, Any]]:
        v = doc.get(key, [])
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            raise TemplateInvalid(f"`{key}` must be a list of objects")
        return v

    styles: list[tuple[str, Any]] = []
    for i, s in enumerate(items("styles")):
        if isinstance(s.get("href"), str):
            styles.append(("href", comp(f"styles[{i}].href", s["href"])))
        elif isinstance(s.get("content"), str):
            styles.append(("content", comp(f"styles[{i}].content", s["content"])))
        else:
            raise TemplateInvalid(f"`styles[{i}]` needs `href` or `content`")
    scripts: list[tuple[str, Any, bool]] = []
    for i, s in enumerate(items("scripts")):
        inline = s.get("inline") is True
        if isinstance(s.get("src"), str):
            scripts.append(("src", comp(f"scripts[{i}].src", s["src"]), inline))
        elif isinstance(s.get("content"), str):
            scripts.append(("content", comp(f"scripts[{i}].content", s["content"]), True))
        else:
            raise TemplateInvalid(f"`scripts[{i}]` needs `src` or `content`")
    # Every other string is a template too: check its syntax now rather than never.
    for k, v in doc.items():
        if k not in ("title", "lang", "body", "pdf", "styles", "scripts") and isinstance(v, str):
            comp(k, v)
    compiled = Compiled(
        title=comp("title", doc.get("title")),
        lang=comp("lang", doc.get("lang")),
        body=comp("body", doc["body"]),
        styles=styles,
        scripts=scripts,
        pdf=comp("pdf", doc.get("pdf") or None),
    )
    return compiled, json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def check_row(row: Any, min_suffix: int) -> str | None:
    """Why ``row`` breaks the data contract, or None (``suffix`` may be absent)."""
    if not isinstance(row, dict):
        return "a row must be a JSON object"
    ref = row.get("reference_id")
    if not isinstance(ref, str) or not NAME_RE.match(ref):
        return "reference_id must be 1-128 of A-Z a-z 0-9 _ -"
    suffix = row.get("suffix")
    if suffix not in (None, ""):
        if not isinstance(suffix, str) or not NAME_RE.match(suffix):
            return "suffix must be of A-Z a-z 0-9 _ -"
        if len(suffix) < min_suffix:
            return f"suffix must be at least {min_suffix} characters long"
    pdf = row.get("pdf")
    if pdf not in (None, ""):
        if not isinstance(pdf, str) or not (pdf.startswith(("https://", "http://")) or BATCH_PDF_RE.match(pdf)):
            return "pdf must be empty, an http(s) URL or batch:<fileIdx>"
    data = row.get("data", {})
    if not isinstance(data, dict):
        return "data must be a JSON object"
    return None


@dataclass(frozen=True)
class RowIn:
    idx: int
    reference_id: str
    suffix: str
    pdf: str | None
    data: str  # JSON


@dataclass
class RowOut:
    idx: int
    status: str  # "done" | "error" | "skipped" | "need"
    error: str | None = None
    needs: tuple[str, ...] = ()


def _url_text(t: Any, ctx: Mapping[str, Any]) -> str:
    # Autoescaped output is HTML; the URL itself is its unescaped text.
    return html.unescape(t.render(ctx)).strip()


def _inline_js(code: str) -> str:
    return re.sub(r"</(script)", r"<\\/\1", code, flags=re.I).replace("<!--", "<\\!--")


def _inline_css(code: str) -> str:
    return re.sub(r"</(style)", r"<\\/\1", code, flags=re.I)


def _attr(value: str) -> str:
    return html.escape(value, quote=True)


def asset_key(url: str) -> str:
    return "url:" + url


@dataclass
class Renderer:
    """Renders and publishes rows of one job. Thread-safe for concurrent ``render_rows`` calls."""

    compiled: Compiled
    strategy: str
    batch_id: str
    params: Mapping[str, Any]
    out_dir: Path
    _b64: dict[str, str] = field(default_factory=dict)

    def _asset(self, assets: Mapping[str, Any], key: str, needs: list[str]) -> Any:
        if key not in assets:
            needs.append(key)
            return None
        v = assets[key]
        if isinstance(v, AssetError):
            raise _RowFailed(v.message)
        return v

    def _pdf_data_uri(self, key: str, raw: Any) -> str:
        uri = self._b64.get(key)
        if uri is None:
            data = raw if isinstance(raw, bytes) else Path(raw).read_bytes()
            uri = "data:application/pdf;base64," + base64.b64encode(data).decode("ascii")
            if key.startswith("url:"):  # one shared PDF for many rows; batch PDFs are usually one per row
                self._b64[key] = uri
        return uri

    def render_one(self, row: RowIn, assets: Mapping[str, Any]) -> tuple[str | None, list[str], list[Item]]:
        """(page HTML or None if assets are missing, missing asset keys, extra files to publish)."""
        data = json.loads(row.data)
        ctx: dict[str, Any] = {"data": data, "params": self.params, "reference_id": row.reference_id,
                               "suffix": row.suffix, "batch_id": self.batch_id, "pdf": ""}
        needs: list[str] = []
        extra: list[Item] = []
        c = self.compiled
        # The PDF, as this strategy embeds it.
        pdf_src = row.pdf or (_url_text(c.pdf, ctx) if c.pdf is not None else "")
        pdf = ""
        if pdf_src:
            m = BATCH_PDF_RE.match(pdf_src)
            if m:
                key = "batch:" + m.group(1)
                path = self._asset(assets, key, needs)
                if path is not None:
                    pdf_name = f"{row.reference_id}.{row.suffix}.pdf"
                    extra.append(Item(pdf_name, source=str(path)))
                    pdf = self._pdf_data_uri(key, path) if self.strategy == "original" else pdf_name
            elif pdf_src.startswith(("https://", "http://")):
                if self.strategy == "original":
                    raw = self._asset(assets, asset_key(pdf_src), needs)
                    if raw is not None:
                        pdf = self._pdf_data_uri(asset_key(pdf_src), raw)
                else:
                    pdf = pdf_src
            else:
                raise _RowFailed(f"pdf {pdf_src!r} is not an http(s) URL or batch:<fileIdx>")
        ctx["pdf"] = pdf
        styles: list[str] = []
        for kind, t in c.styles:
            if kind == "content":
                styles.append(f"<style>{_inline_css(t.render(ctx))}</style>")
                continue
            url = _url_text(t, ctx)
            if self.strategy == "original":
                raw = self._asset(assets, asset_key(url), needs)
                if raw is not None:
                    styles.append(f"<style>{_inline_css(raw.decode('utf-8', 'replace'))}</style>")
            else:
                styles.append(f'<link rel="stylesheet" href="{_attr(url)}">')
        scripts: list[str] = []
        for kind, t, inline in c.scripts:
            if kind == "content":
                scripts.append(f"<script>{_inline_js(t.render(ctx))}</script>")
                continue
            url = _url_text(t, ctx)
            if self.strategy == "smallest":
                scripts.append(f'<script src="{_attr(url)}"></script>')
                continue
            raw = self._asset(assets, asset_key(url), needs)
            if raw is None:
                continue
            if self.strategy == "original" or inline or len(raw) <= INLINE_LIMIT:
                scripts.append(f"<script>{_inline_js(raw.decode('utf-8', 'replace'))}</script>")
            else:
                scripts.append(f'<script src="{_attr(url)}"></script>')
        if needs:
            return None, needs, []
        title = c.title.render(ctx) if c.title is not None else ""
        lang = html.unescape(c.lang.render(ctx)) if c.lang is not None else ""
        body = c.body.render(ctx)
        pdf_tag = f'<object id="smartlink-pdf" data="{_attr(pdf)}" type="application/pdf"></object>\n' if pdf else ""
        page = (
            "<!DOCTYPE html>\n"
            f'<html{f" lang={chr(34)}{_attr(lang)}{chr(34)}" if lang else ""}>\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title}</title>\n"
            + "".join(s + "\n" for s in styles)
            + "</head>\n<body>\n"
            + body + "\n" + pdf_tag
            + "".join(s + "\n" for s in scripts)
            + "</body>\n</html>\n"
        )
        return page, [], extra

    def render_rows(self, rows: Sequence[RowIn], assets: Mapping[str, Any],
                    stop: Callable[[], bool]) -> list[RowOut]:
        """Render and publish ``rows``; rows after ``stop()`` turns true are ``skipped``."""
        out: list[RowOut] = []
        items: list[Item] = []
        owners: dict[str, int] = {}  # file name -> position in out
        for row in rows:
            if stop():
                out.append(RowOut(row.idx, "skipped"))
                continue
            try:
                page, needs, extra = self.render_one(row, assets)
            except _RowFailed as e:
                out.append(RowOut(row.idx, "error", str(e)))
                continue
            except Exception as e:  # a template that fails on this row's data
                out.append(RowOut(row.idx, "error", f"render failed: {e.__class__.__name__}: {e}"))
                continue
            if page is None:
                out.append(RowOut(row.idx, "need", needs=tuple(dict.fromkeys(needs))))
                continue
            name = f"{row.reference_id}.{row.suffix}.html"
            out.append(RowOut(row.idx, "done"))
            for it in (Item(name, data=page.encode("utf-8")), *extra):
                owners[it.name] = len(out) - 1
                items.append(it)
        if items:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name, err in publish_batch(self.out_dir, items).items():
                r = out[owners[name]]
                r.status, r.error = "error", err
        return out


class _RowFailed(Exception):
    pass


@dataclass(frozen=True)
class JobSpec:
    """Everything a render process needs to rebuild a job's ``Renderer`` (picklable)."""

    job_id: str
    template: str
    strategy: str
    batch_id: str
    params_json: str
    out_dir: str

    def renderer(self) -> Renderer:
        compiled, _ = compile_template(self.template)
        return Renderer(compiled, self.strategy, self.batch_id, json.loads(self.params_json), Path(self.out_dir))


def die_with_parent(parent_pid: int) -> None:
    """Initializer of a render process: it must not outlive a server killed with SIGKILL (its
    siblings hold the task queue open, so it would wait on it forever)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before the prctl
        os._exit(0)


_PROCESS_RENDERERS: OrderedDict[str, Renderer] = OrderedDict()  # per render process: compiled once per job


def render_in_process(spec: JobSpec, rows: Sequence[RowIn], assets: Mapping[str, Any],
                      budget: float) -> list[RowOut]:
    """Entry point in a render process (``FILEDROP_RENDER_PROCESSES`` > 0): renders ``rows`` for
    at most about ``budget`` seconds; rows not reached are returned ``skipped`` (the caller checks
    for cancellation, then sends them again)."""
    deadline = time.monotonic() + budget
    r = _PROCESS_RENDERERS.get(spec.job_id)
    if r is None:
        r = _PROCESS_RENDERERS[spec.job_id] = spec.renderer()
        while len(_PROCESS_RENDERERS) > 8:
            _PROCESS_RENDERERS.popitem(last=False)
    else:
        _PROCESS_RENDERERS.move_to_end(spec.job_id)
    return r.render_rows(rows, assets, lambda: time.monotonic() > deadline)


def warm_up() -> int:
    """A no-op each render process runs once at start: its result says the process is up."""
    return os.getpid()
