"""A set of chunk ids as a bitmap: what a file row stores of its chunks.

Bit ``i`` (byte ``i // 8``, bit ``i % 8``) is chunk ``i``. Adding or testing an id is O(1);
the bitmap of a file of ``n`` chunks is at most ``ceil(n / 8)`` bytes (1,250 for the default
cap of 10,000 chunks), read and written whole with its row. Listing the ids costs O(n / 8 + ids):
bounded by the cap, and done only to answer (the nuxeo client needs every id in every answer).
"""

from __future__ import annotations

from collections.abc import Iterable

# For each byte value, the positions of its set bits.
_BITS = tuple(tuple(b for b in range(8) if v >> b & 1) for v in range(256))
_COUNT = tuple(len(bits) for bits in _BITS)


class ChunkSet:
    """A mutable bitmap of chunk ids; ``bytes(s)`` is what the database stores."""

    __slots__ = ("_b",)

    def __init__(self, raw: bytes | None = None) -> None:
        self._b = bytearray(raw or b"")

    @classmethod
    def of(cls, ids: Iterable[int]) -> ChunkSet:
        s = cls()
        for i in ids:
            s.add(i)
        return s

    @classmethod
    def full(cls, count: int) -> ChunkSet:
        return cls.of(range(count))

    def __bytes__(self) -> bytes:
        return bytes(self._b.rstrip(b"\0"))

    def __contains__(self, idx: int) -> bool:
        byte = idx >> 3
        return byte < len(self._b) and bool(self._b[byte] >> (idx & 7) & 1)

    def add(self, idx: int) -> None:
        byte = idx >> 3
        if byte >= len(self._b):
            self._b.extend(bytes(byte + 1 - len(self._b)))
        self._b[byte] |= 1 << (idx & 7)

    def discard(self, idx: int) -> None:
        byte = idx >> 3
        if byte < len(self._b):
            self._b[byte] &= ~(1 << (idx & 7)) & 0xFF

    def __len__(self) -> int:
        return sum(_COUNT[v] for v in self._b)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChunkSet) and bytes(self) == bytes(other)

    def __hash__(self) -> int:  # pragma: no cover - mutable; defined for completeness
        return hash(bytes(self))

    def ids(self) -> list[int]:
        """The ids in ascending order."""
        out: list[int] = []
        for byte, v in enumerate(self._b):
            if v:
                base = byte << 3
                out.extend(base + b for b in _BITS[v])
        return out

    def missing(self, count: int) -> list[int]:
        """Ids below ``count`` that are not in the set."""
        return [i for i in range(count) if i not in self]

    def covers(self, count: int) -> bool:
        """True if every id below ``count`` is in the set."""
        full, rest = divmod(count, 8)
        b = self._b
        if len(b) < full + (1 if rest else 0):
            return False
        if any(v != 0xFF for v in b[:full]):
            return False
        return not rest or b[full] & ((1 << rest) - 1) == (1 << rest) - 1

    def copy(self) -> ChunkSet:
        return ChunkSet(bytes(self._b))
