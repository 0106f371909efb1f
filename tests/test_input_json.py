"""server.jsondoc: the one parser for clients' JSON (depth, lone surrogates, BOM, long integers)."""

from __future__ import annotations

import json
import sys

import pytest

from server.errors import BadRequest, Unprocessable
from server.jsondoc import MAX_DEPTH, JsonRefused, loads, parse_json


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,
    b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1),
    b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1),
])
def test_deep_nesting_is_refused(raw: bytes) -> None:
    with pytest.raises(JsonRefused, match="nested more than"):
        loads(raw)


def test_nesting_up_to_the_limit_is_kept() -> None:
    assert loads(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None


@pytest.mark.parametrize("raw", [b'"\\ud800"', b'{"k": ["ok", "\\udfff"]}', b'{"\\ud800": 1}'])
def test_lone_surrogates_are_refused(raw: bytes) -> None:
    with pytest.raises(JsonRefused, match="lone surrogate"):
        loads(raw)


def test_surrogate_pairs_and_bom_are_fine() -> None:
    assert loads(b'"\\ud83d\\ude00"') == "\U0001F600"
    assert loads("\ufeff[1]".encode()) == [1]


def test_parse_json_names_the_field() -> None:
    with pytest.raises(Unprocessable) as e:
        parse_json(b"{", "param.x")
    assert e.value.extra["field"] == "param.x" and e.value.message.startswith("param.x is not JSON")
    with pytest.raises(BadRequest) as e2:
        parse_json(b"\xff", "execute body", error=BadRequest, code="ERR_REQUEST_MALFORMED")
    assert e2.value.code == "ERR_REQUEST_MALFORMED" and "not UTF-8" in e2.value.message


def _nest(depth: int) -> str:
    """Objects and arrays alternating, ``depth`` deep, with siblings of every depth beside them."""
    text = '["y", 1]'
    for d in range(1, depth):
        text = f'{{"k{d}": {text}, "s": "x", "e": []}}' if d % 2 else f'[{text}, "y", {{}}, [2]]'
    return text


@pytest.mark.parametrize("as_bytes", [True, False], ids=["bytes", "str"])
def test_depth_and_surrogates_give_the_same_answers_from_bytes_and_text(as_bytes: bool) -> None:
    """Bytes without a surrogate escape take the one-level-at-a-time depth check; text and
    bytes with such an escape are walked value by value. Both answer alike."""
    def load(text: str) -> object:
        return loads(text.encode() if as_bytes else text)

    assert load(_nest(MAX_DEPTH)) is not None
    with pytest.raises(JsonRefused, match="nested more than"):
        load(_nest(MAX_DEPTH + 1))
    with pytest.raises(JsonRefused, match="nested more than"):
        load(f'[{_nest(MAX_DEPTH)}, "\\ud83d\\ude00"]')  # an escape elsewhere: the walk finds it too
    with pytest.raises(JsonRefused, match="lone surrogate"):
        load(f'[{_nest(3)}, {{"deep": {{"\\udc00x": 1}}}}]')
    assert load('["\\\\ud800"]') == ["\\ud800"]  # an escaped backslash, then text: no surrogate


BIG = b"9" * 5000


def test_an_integer_over_max_digits_names_the_setting() -> None:
    with pytest.raises(JsonRefused) as e:
        loads(b'[{"n": ' + BIG + b"}]", max_digits=4300)
    assert str(e.value) == "holds a number of 5,000 digits, more than FILEDROP_MAX_NUMBER_DIGITS (4300) allows"
    with pytest.raises(Unprocessable) as e2:
        parse_json(b"-" + b"1" * 641, "param.x", max_digits=640)
    assert e2.value.extra["field"] == "param.x" and "641 digits" in e2.value.message
    assert loads(b"-" + b"1" * 640, max_digits=640) == -int("1" * 640)  # the sign is no digit
    assert loads(b'["' + BIG + b'", 1.' + BIG + b"]", max_digits=640)[0] == BIG.decode()  # strings, floats


def test_without_max_digits_the_interpreters_limit_is_said_plainly() -> None:
    with pytest.raises(JsonRefused) as e:
        loads(b"[" + BIG + b"]")
    assert str(e.value) == f"holds a number of more than {sys.get_int_max_str_digits()} digits, more than this server reads"


def test_a_setting_above_the_interpreters_limit_is_honoured() -> None:
    """FILEDROP_MAX_NUMBER_DIGITS over Python's default (4300): the number is read (and can be
    written back: render processes parse it at the setting)."""
    before = sys.get_int_max_str_digits()
    try:
        sys.set_int_max_str_digits(4300)
        doc = loads(b"[" + BIG + b"]", max_digits=6000)
        assert json.dumps(doc) == "[" + BIG.decode() + "]"
    finally:
        sys.set_int_max_str_digits(before)
