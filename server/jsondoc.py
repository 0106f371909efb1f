"""JSON from clients, parsed once, the same way everywhere (job data and rows, templates,
``param.*`` parts, execute bodies).

Invariants: a document that parses is one the rest of the server can store and walk:

* nested at most :data:`MAX_DEPTH` arrays/objects deep (Python's own parser and encoder recurse;
  ``[`` x 100,000 would raise ``RecursionError`` in them, a 500);
* every string is valid Unicode (JSON's ``"\\ud800"`` escape decodes to a lone surrogate that no
  UTF-8 column, file or response can hold);
* a UTF-8 byte-order mark in front is ignored (editors on Windows write one);
* no integer has more decimal digits than ``max_digits`` (``FILEDROP_MAX_NUMBER_DIGITS`` for job
  input: the render processes parse what a job stores under that limit, see
  ``server.jobs.child``); without ``max_digits``, more than the interpreter converts.

Anything else raises the error the caller chose, naming ``where``. Blocking on big inputs: call it
in a thread.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from typing import Any

from server.errors import FiledropError, Unprocessable

MAX_DEPTH = 64  # arrays/objects inside each other; real documents use a handful
_BOM = "\ufeff"
# A JSON escape of a UTF-16 surrogate (``\ud800``-``\udfff``), the only way a lone surrogate
# gets into text decoded as strict UTF-8. Also matches an escaped backslash followed by
# ``ud8..``, and valid pairs: then the strings are checked one by one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JsonRefused(ValueError):
    """Why a text is not acceptable JSON (the caller turns it into its own error)."""


def _text(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonRefused(f"is not UTF-8 (byte {e.start})") from None
    return raw[1:] if raw.startswith(_BOM) else raw


def check_value(doc: Any) -> None:
    """Raise JsonRefused if ``doc`` nests deeper than MAX_DEPTH or holds a lone surrogate.
    Iterative: the walk itself never recurses."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                _check_str(value)
            continue
        if isinstance(value, dict):
            items: Any = value.items()
        elif isinstance(value, list):
            items = ((None, v) for v in value)
        else:
            continue
        if depth > MAX_DEPTH:
            raise JsonRefused(f"is nested more than {MAX_DEPTH} levels deep")
        for k, v in items:
            if k is not None and not k.isascii():
                _check_str(k)
            if isinstance(v, (dict, list)):
                stack.append((v, depth + 1))
            elif isinstance(v, str) and not v.isascii():
                _check_str(v)


def check_depth(doc: Any) -> None:
    """Raise JsonRefused if ``doc`` (as ``json.loads`` makes it: plain dicts and lists) nests
    deeper than MAX_DEPTH. One level at a time, the values of each level gathered in C: 10,000
    rows in 7.8 ms, where ``check_value``'s walk of every value took 21."""
    level = [doc] if type(doc) is dict or type(doc) is list else []
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise JsonRefused(f"is nested more than {MAX_DEPTH} levels deep")
        values: list[Any] = []
        for v in level:
            values.extend(v.values() if type(v) is dict else v)
        level = [v for v in values if type(v) is dict or type(v) is list]


def _check_str(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonRefused("holds an invalid Unicode escape (a lone surrogate such as \\ud800)") from None


def _int_parser(max_digits: int) -> Callable[[str], int]:
    """``parse_int`` for ``json.loads``: an integer of more than ``max_digits`` digits is a
    JsonRefused naming FILEDROP_MAX_NUMBER_DIGITS (not Python's ValueError, whose advice is for
    programmers)."""
    interpreter = sys.get_int_max_str_digits()
    if interpreter and max_digits > interpreter:
        # The setting is above this process's limit (Python's default, 4300): what a job accepts
        # must also be stored and parsed back (render processes run at the setting). Only ever
        # raised, to what the operator chose; once, not per integer.
        sys.set_int_max_str_digits(max_digits)

    def parse(s: str) -> int:
        digits = len(s) - (s[0] == "-")
        if digits > max_digits:
            raise JsonRefused(f"holds a number of {digits:,} digits, more than FILEDROP_MAX_NUMBER_DIGITS "
                              f"({max_digits}) allows")
        return int(s)

    return parse


def _too_many_digits(e: ValueError) -> JsonRefused | None:
    """The interpreter's refusal of a long integer (``int_max_str_digits``), said plainly."""
    limit = sys.get_int_max_str_digits()
    if limit and "integer string conversion" in str(e):
        return JsonRefused(f"holds a number of more than {limit} digits, more than this server reads")
    return None


def loads(raw: bytes | str, max_digits: int | None = None) -> Any:
    """Parse and check; raise JsonRefused with the reason (no field name). ``max_digits``: the
    most digits an integer may have (job input: ``FILEDROP_MAX_NUMBER_DIGITS``)."""
    text = _text(raw)
    try:
        doc = json.loads(text) if max_digits is None else json.loads(text, parse_int=_int_parser(max_digits))
    except RecursionError:
        raise JsonRefused(f"is nested more than {MAX_DEPTH} levels deep") from None
    except JsonRefused:
        raise
    except ValueError as e:
        raise _too_many_digits(e) or JsonRefused(f"is not JSON ({e})") from None
    if isinstance(raw, bytes) and not _SURROGATE_ESCAPE.search(text):
        check_depth(doc)  # strict UTF-8 holds no surrogate, and no escape made one
    else:
        check_value(doc)
    return doc


def parse_json(raw: bytes | str, where: str, *, error: type[FiledropError] = Unprocessable,
               max_digits: int | None = None, **error_args: Any) -> Any:
    """``loads`` for a client's input named ``where``: refusals raise ``error`` (by default
    422 ``ERR_FIELD_INVALID`` with ``field=where``) whose message starts with ``where``."""
    try:
        return loads(raw, max_digits)
    except JsonRefused as e:
        if error is Unprocessable:
            error_args.setdefault("field", where)
        raise error(f"{where} {e}", **error_args) from None
