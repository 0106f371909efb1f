"""The render environment's own attribute lookup answers as the Jinja2 sandbox does."""

from __future__ import annotations

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.jobs.sandbox import LimitedEnvironment

DATA = {"num_client": "240 000 1", "items": "a key named like a method", "format": "f", "__class__": "c",
        "nested": {"k": [1, 2]}, "n": 7, "": "empty", "mro": "m"}
NAMES = sorted(set(DATA) | set(dir(dict)) | {"missing", "__dict__", "__subclasses__", "k", "x y"})


def _same(a: object, b: object) -> bool:
    if callable(a) and callable(b):  # bound methods and sandbox wrappers: each lookup makes a new one
        return getattr(a, "__name__", None) == getattr(b, "__name__", None)
    return type(a) is type(b) and (a == b or (repr(a) == repr(b)))


@pytest.mark.parametrize("obj", [DATA, {}, {"k": 1}])
def test_attribute_lookup_on_a_dict_matches_the_sandbox(obj: dict[str, object]) -> None:
    mine, theirs = LimitedEnvironment(4300, 1 << 20), ImmutableSandboxedEnvironment(autoescape=True)
    for name in NAMES:
        a, b = mine.getattr(obj, name), theirs.getattr(obj, name)
        assert _same(a, b), (name, a, b)


def test_templates_see_keys_attributes_and_undefined_as_before() -> None:
    src = ("{{ data.num_client }}|{{ data.items is callable }}|{{ data.missing is undefined }}|"
           "{{ data.nested.k[1] }}|{{ data['items'] }}|{{ data.__class__ is undefined }}|{{ data.n * 6 }}")
    mine = LimitedEnvironment(4300, 1 << 20).from_string(src).render(data=DATA)
    theirs = ImmutableSandboxedEnvironment(autoescape=True).from_string(src).render(data=DATA)
    assert mine == theirs == "240 000 1|True|True|2|a key named like a method|True|42"
