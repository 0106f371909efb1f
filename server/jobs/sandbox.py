"""The Jinja2 environment user templates run in: immutable sandbox, autoescape, and arithmetic
that cannot make a huge number or string.

Jinja2 folds constant expressions while it compiles (``{{ 10 ** (10 ** 7) }}`` would be
computed by the compiler, holding the GIL for seconds) unless the sandbox intercepts the
operator (``intercepted_binops``; ``nodes.BinExpr.as_const`` then refuses to fold). ``*`` and
``**`` are intercepted: compiling never computes them, and at render time ``call_binop`` checks
the size of the result before Python makes it. What gets past these checks (a filter making a
huge string, a loop that never ends) meets the hard limits of the render process instead:
its memory limit and the time limit its parent enforces by killing it.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sized
from typing import Any

from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

_LOG10_2 = math.log10(2)
# Every attribute a dict has: those of its type and the type's bases (a dict has no instance
# attributes). A name outside this set is no attribute of any plain dict.
_DICT_ATTRIBUTES = frozenset(dir(dict))


class LimitHit(Exception):
    """A row went over a render limit; the message names the limit and its setting."""


def _digits(n: int) -> int:
    return int(abs(n).bit_length() * _LOG10_2) + 1


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """Immutable: ``params`` is one object shared by every row of a job; with the plain sandbox
    a template could ``params.x.append(data)``, so a page would show other rows' data and a
    re-render after a crash would not give the same bytes. Per-render state still works
    through ``namespace()``."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, max_digits: int, max_chars: int) -> None:
        super().__init__(autoescape=True, auto_reload=False, cache_size=0)
        self.max_digits = max_digits
        self.max_chars = max_chars

    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        """A template's globals as a plain dict, not Jinja2's ChainMap over the environment's:
        every render merges them into the row's context and iterates them twice, and a
        ChainMap made that 35% of a row's render (28 against 19 µs, the seed's invoice page).
        This environment's globals never change once it is made, which is what the ChainMap
        would have followed."""
        return {**self.globals, **(d or {})}

    def getattr(self, obj: Any, attribute: str) -> Any:
        """``data.num_client``: the sandbox's answer, without its exception. Jinja2 tries the
        attribute first (``getattr`` raising AttributeError for a dict's key), then the item;
        for a plain dict and a name no dict has as an attribute, only the item can answer.
        That exception was a sixth of a row's render (the seed's invoice page, four such
        lookups: 17.7 against 14.6 us a row, medians of 12 alternated pairs)."""
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            self._check_power(left, right)
        elif operator == "*":
            self._check_product(left, right)
        return super().call_binop(context, operator, left, right)

    def _too_many_digits(self, what: str, digits: int) -> LimitHit:
        return LimitHit(f"number size limit: {what} would have about {digits:,} digits, over "
                        f"FILEDROP_MAX_NUMBER_DIGITS ({self.max_digits})")

    def _check_power(self, base: Any, exp: Any) -> None:
        if isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1:
            digits = int(exp * math.log10(abs(base))) + 1
            if digits > self.max_digits:
                raise self._too_many_digits(f"{_short(base)} ** {_short(exp)}", digits)

    def _check_product(self, left: Any, right: Any) -> None:
        if isinstance(left, int) and isinstance(right, int):
            digits = _digits(left) + _digits(right) - 1
            if digits > self.max_digits:
                raise self._too_many_digits(f"{_short(left)} * {_short(right)}", digits)
            return
        seq, times = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(times, int) and isinstance(seq, Sized) and not isinstance(seq, int):
            size = len(seq) * max(times, 0)
            if size > self.max_chars:
                raise LimitHit(f"page size limit: a {type(seq).__name__} * {_short(times)} would hold "
                               f"{size:,} items, over FILEDROP_MAX_PAGE_SIZE ({self.max_chars} bytes)")


def _short(n: int) -> str:
    """A number for an error message: never its 10,000 digits (nor a ValueError for them)."""
    return str(n) if _digits(n) <= 30 else f"<a {_digits(n)}-digit number>"
