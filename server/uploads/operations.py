"""The registry of operations a batch can be executed with.

An operation is ``async def op(ctx: ExecuteContext) -> OperationResult``. ``Batch.Manifest``
is registered by the upload service; the job engine registers ``SmartLinks.Generate``.
Unknown names raise ``NotFound`` (Nuxeo answers 404 for an unknown operation).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from server.errors import OperationNotFound


@dataclass(frozen=True)
class ExecuteContext:
    owner: str
    batch_id: str
    file_idx: int | None  # None: the whole batch is the input
    params: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OperationResult:
    status: int
    body: Any  # JSON-serialisable
    drop_batch: bool = True  # Nuxeo removes a batch after execute unless X-Batch-No-Drop


Operation = Callable[[ExecuteContext], Awaitable[OperationResult]]


class OperationRegistry:
    def __init__(self) -> None:
        self._ops: dict[str, Operation] = {}

    def register(self, name: str, op: Operation) -> None:
        self._ops[name] = op

    def get(self, name: str) -> Operation:
        try:
            return self._ops[name]
        except KeyError:
            raise OperationNotFound(f"operation {name!r} is not registered") from None

    def names(self) -> list[str]:
        return sorted(self._ops)
