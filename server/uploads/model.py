"""What the upload service takes and gives: requests, outcomes, file states; and the uniform
chunk layout (all chunks but the last the same size, the last one the rest).

A file's chunks are written in place (``partial`` at ``idx * chunk_size``) when they fit the
layout; :func:`stride_of` finds the chunk size one chunk implies, :func:`chunk_length` what
each chunk must then hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UploadRequest:
    """One upload request (a whole file, or one chunk of it), parsed from its headers."""

    file_idx: int
    name: str
    size: int  # the whole file's declared size (X-File-Size)
    mimetype: str
    chunked: bool
    chunk_idx: int = 0
    chunk_count: int = 1
    content_length: int | None = None  # of this request's body, when the client sent one

    @property
    def upload_type(self) -> str:
        return "chunked" if self.chunked else "normal"


@dataclass(frozen=True)
class UploadOutcome:
    batch_id: str
    file_idx: int
    chunked: bool
    uploaded_size: int  # bytes of this request's body
    chunk_count: int
    chunk_ids: list[int]
    complete: bool  # the file is complete (assembled, durable)
    # The file's SHA-256 (hex), given only with ``complete`` and only where the completion that
    # answers knows it without a read (the row it decided on, the digest it computed); None else.
    sha256: str | None = None


@dataclass(frozen=True)
class FileState:
    batch_id: str
    file_idx: int
    name: str
    size: int
    mimetype: str
    chunked: bool
    chunk_count: int
    chunk_ids: list[int]
    received: int
    state: str  # receiving | assembling (every chunk is there; being, or about to be, assembled) | complete
    sha256: str | None

    @property
    def complete(self) -> bool:
        return self.state == "complete"


@dataclass(frozen=True)
class FileInfo:
    """A complete file, for other components (the job engine reads it, never writes)."""

    path: Path
    name: str
    size: int
    sha256: str
    mimetype: str


def stride_of(size: int, count: int, idx: int, length: int) -> int | None:
    """The chunk size of the uniform layout in which chunk ``idx`` of ``count`` holds ``length``
    bytes of a ``size``-byte file; None if no uniform layout has that."""
    if count == 1:
        return size if length == size and size > 0 else None
    if idx < count - 1:
        stride = length
    else:
        rest = size - length
        if rest <= 0 or rest % (count - 1):
            return None
        stride = rest // (count - 1)
    if stride < 1 or not stride * (count - 1) < size <= stride * count:
        return None
    return stride


def chunk_length(size: int, count: int, stride: int, idx: int) -> int:
    """Bytes of chunk ``idx`` in the uniform layout of ``stride``."""
    return stride if idx < count - 1 else size - stride * (count - 1)
