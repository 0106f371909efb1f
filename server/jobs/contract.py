"""The smartlink contract as the API checks it: names, strategies, the master smartlink's shape
and a data row's shape. Pure validation: nothing here compiles or runs a template (that happens
only in render processes, see ``server.jobs.render``), so the API process may call all of it.
"""

from __future__ import annotations

import json
import re
from typing import Any

STRATEGIES = ("smallest", "mixed", "original")
# \Z, not $: `$` also matches before a trailing newline, which would let "ref\n" through into a
# file name.
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")
# A page is <reference_id>.<suffix>.html: one name of at most 255 bytes (ext4, xfs, tmpfs).
MAX_NAME_PAIR = 255 - len("..html")
BATCH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")
BATCH_PDF_RE = re.compile(r"^batch:([0-9]{1,9})\Z")  # ASCII digits only: \d takes "٣" too
# Keys of the master smartlink with a meaning of their own; every other string is checked as a
# template too (rather than never).
KNOWN_KEYS = ("title", "lang", "body", "pdf", "styles", "scripts")


class TemplateInvalid(ValueError):
    """The master smartlink is unusable; the message says where."""


def parse_master(raw: str | bytes, max_digits: int | None = None) -> tuple[dict[str, Any], str]:
    """The master smartlink's JSON object, checked for shape (not for Jinja2 syntax), and its
    canonical JSON (what the job stores). Raises ``TemplateInvalid`` (also for an integer of more
    than ``max_digits`` digits, ``FILEDROP_MAX_NUMBER_DIGITS``)."""
    # Imported here: render processes import this module and stay small (jsondoc pulls in
    # server.errors, hence aiohttp: 0.15 s and 20 MB a process).
    from server.jsondoc import JsonRefused, loads

    try:
        doc = loads(raw, max_digits)
    except JsonRefused as e:
        raise TemplateInvalid(str(e)) from None  # "is not JSON (...)", "is nested more than ...", "holds a number ..."
    if not isinstance(doc, dict):
        raise TemplateInvalid("must be a JSON object")
    if not isinstance(doc.get("body"), str) or not doc["body"].strip():
        raise TemplateInvalid("has no `body` (a non-empty string)")
    template_fields(doc)  # raises on a malformed field
    return doc, json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _items(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    v = doc.get(key, [])
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise TemplateInvalid(f"`{key}` must be a list of objects")
    return v


def template_fields(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """Every Jinja2 source of the master smartlink as ``(where, source)``, ``where`` being how
    an error names it (``body``, ``styles[0].href``, ...). Raises ``TemplateInvalid`` for a
    field of the wrong type."""
    out: list[tuple[str, str]] = []

    def add(where: str, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, str):
            raise TemplateInvalid(f"`{where}` must be a string")
        out.append((where, value))

    for key, url in (("styles", "href"), ("scripts", "src")):
        for i, item in enumerate(_items(doc, key)):
            field = url if isinstance(item.get(url), str) else "content" if isinstance(item.get("content"), str) else None
            if field is None:
                raise TemplateInvalid(f"`{key}[{i}]` needs `{url}` or `content`")
            add(f"{key}[{i}].{field}", item[field])
    for k in ("title", "lang", "body"):
        add(k, doc.get(k))
    add("pdf", doc.get("pdf") or None)
    for k, v in doc.items():
        if k not in KNOWN_KEYS and isinstance(v, str):
            add(k, v)
    return out


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
            return "suffix must be 1-128 of A-Z a-z 0-9 _ -"
        if len(suffix) < min_suffix:
            return f"suffix must be at least {min_suffix} characters long (FILEDROP_MIN_SUFFIX_LENGTH)"
        if len(ref) + len(suffix) > MAX_NAME_PAIR:
            return (f"reference_id and suffix together must be at most {MAX_NAME_PAIR} characters (the page's "
                    "file name <reference_id>.<suffix>.html is at most 255 bytes)")
    pdf = row.get("pdf")
    if pdf not in (None, ""):
        if not isinstance(pdf, str) or not (pdf.startswith(("https://", "http://")) or BATCH_PDF_RE.match(pdf)):
            return "pdf must be empty, an http(s) URL or batch:<fileIdx>"
    data = row.get("data", {})
    if not isinstance(data, dict):
        return "data must be a JSON object"
    return None
