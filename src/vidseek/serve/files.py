"""Serving a file over HTTP: byte ranges (RFC 9110 §14) and opening only the file that was indexed.

`open_indexed_file` opens the final path component with O_NOFOLLOW and checks the open file
(not the path, so a swap after the check cannot slip through) against what the index recorded:
a regular file of the same size and modification time. Anything else is "changed on disk".

`file_response` answers GET and HEAD alike for /videos and /thumbnails:
* no Range header, a malformed one, or a unit other than ``bytes`` → 200 with the whole file
  (RFC 9110 §14.2: a server ignores a Range header it does not understand);
* a valid but unsatisfiable range → 416 with ``Content-Range: bytes */size``;
* otherwise 206 with the first satisfiable range (several ranges are answered with that one,
  which a client reads from Content-Range).
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

STREAM_CHUNK_BYTES = 256 * 1024
#: Positions longer than this many digits exceed any file (and Python refuses int() beyond 4,300).
_MAX_POSITION_DIGITS = 18
_HUGE = 1 << 63
_RANGE_SPEC = re.compile(r"^(\d*)-(\d*)$")


class UnsatisfiableRange(Exception):
    """A well-formed Range header none of whose ranges overlaps the file (→ 416)."""


class ChangedOnDisk(Exception):
    """The file at an indexed path is not the file that was indexed (gone, replaced, a link)."""


def _position(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_POSITION_DIGITS else _HUGE


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """A Range header → inclusive (first, last) byte positions in a file of `size` bytes.

    None means "ignore the header" (malformed, or not in bytes); raises UnsatisfiableRange when
    the header is valid but no range overlaps the file.
    """
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parsed: list[tuple[str, str]] = []
    for spec in specs.split(","):
        match = _RANGE_SPEC.match(spec.strip())
        if match is None or match.groups() == ("", ""):
            return None
        first_text, last_text = match.groups()
        if first_text and last_text and _position(last_text) < _position(first_text):
            return None  # "5-2" is invalid syntax, not an unsatisfiable range
        parsed.append((first_text, last_text))
    for first_text, last_text in parsed:
        if not first_text:  # suffix range: the last n bytes
            length = _position(last_text)
            if length > 0 and size > 0:
                return max(0, size - length), size - 1
            continue
        first = _position(first_text)
        if first < size:
            return first, size - 1 if not last_text else min(_position(last_text), size - 1)
    raise UnsatisfiableRange(header)


@dataclass(frozen=True)
class RecordedFile:
    """What the index knows about a file: its path and, for entries recorded with them, the size
    and modification time (ns) it had when it was indexed."""

    path: str
    size: int | None = None
    mtime_ns: int | None = None


def open_indexed_file(recorded: RecordedFile) -> tuple[BinaryIO, os.stat_result]:
    """Open the file the index recorded, or raise ChangedOnDisk: missing, a symbolic link, not a
    regular file, or (when recorded) another size or modification time."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(recorded.path, flags)
    except OSError:  # missing, unreadable, or a symbolic link (ELOOP under O_NOFOLLOW)
        raise ChangedOnDisk(recorded.path) from None
    info = os.fstat(descriptor)
    changed = not stat.S_ISREG(info.st_mode) or \
        (recorded.size is not None and info.st_size != recorded.size) or \
        (recorded.mtime_ns is not None and info.st_mtime_ns != recorded.mtime_ns)
    if changed:
        os.close(descriptor)
        raise ChangedOnDisk(recorded.path)
    return os.fdopen(descriptor, "rb"), info


def _chunks(handle: BinaryIO, first: int, last: int) -> Iterator[bytes]:
    with handle:
        handle.seek(first)
        remaining = last - first + 1
        while remaining > 0:
            block = handle.read(min(STREAM_CHUNK_BYTES, remaining))
            if not block:
                return
            remaining -= len(block)
            yield block


def file_response(request: Request, handle: BinaryIO, size: int, media_type: str,
                  headers: dict[str, str] | None = None) -> Response:
    """200 / 206 / 416 for an open file (see the module docstring); HEAD gets the headers only.
    The response owns `handle` and closes it."""
    common = {"Accept-Ranges": "bytes", **(headers or {})}
    header = request.headers.get("range")
    try:
        byte_range = parse_range(header, size) if header is not None else None
    except UnsatisfiableRange:
        handle.close()
        return Response(status_code=416, headers={**common, "Content-Range": f"bytes */{size}"})
    status = 200 if byte_range is None else 206
    first, last = byte_range or (0, size - 1)
    common["Content-Length"] = str(last - first + 1)
    if byte_range is not None:
        common["Content-Range"] = f"bytes {first}-{last}/{size}"
    if request.method == "HEAD" or size == 0:
        handle.close()
        return Response(status_code=status, media_type=media_type, headers=common)
    return StreamingResponse(_chunks(handle, first, last), status_code=status, media_type=media_type, headers=common)
