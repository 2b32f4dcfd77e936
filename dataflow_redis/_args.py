"""Argument checks shared by the clients: every bad value fails before any Redis call."""

from __future__ import annotations

import math
from typing import Any, Iterable

from .errors import InvalidArgument
from .keys import validate_item_id

MAX_BATCH = 10_000
"""Most items one call may carry (larger batches would block Redis for too long)."""
MAX_LEASE_S = 7 * 24 * 3600.0
MAX_REASON_CHARS = 2000


def count(value: Any, what: str) -> int:
    """A batch size: an int in 1..MAX_BATCH."""
    if type(value) is not int or not 1 <= value <= MAX_BATCH:
        raise InvalidArgument(f"{what} must be an int from 1 to {MAX_BATCH}, got {value!r}")
    return value


def seconds(value: Any, what: str, minimum: float = 0.001, maximum: float = MAX_LEASE_S) -> float:
    """A duration in seconds: a finite number in [minimum, maximum]."""
    if type(value) not in (int, float) or not math.isfinite(value) or not minimum <= value <= maximum:
        raise InvalidArgument(f"{what} must be a number of seconds in [{minimum:g}, {maximum:g}], got {value!r}")
    return float(value)


def ids(values: Any, what: str) -> list[str]:
    """A list of ids (not a bare string), each valid, at most MAX_BATCH."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidArgument(f"{what}s must be a list of ids, got {type(values).__name__}")
    out = [validate_item_id(v, what) for v in values]
    if len(out) > MAX_BATCH:
        raise InvalidArgument(f"at most {MAX_BATCH} {what}s per call, got {len(out)}; split the batch")
    return out


def request_id(value: Any) -> str:
    """A caller's request id: the same rules as an item id (a str, 1-256 printable
    ASCII characters without spaces). An empty one would silently turn the retry
    protection off."""
    return validate_item_id(value, "request id")


def reason(value: Any) -> str:
    """A failure reason: a string, cut to MAX_REASON_CHARS."""
    if not isinstance(value, str):
        raise InvalidArgument(f"reason must be a string, got {type(value).__name__}")
    return value[:MAX_REASON_CHARS]


def flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what} must be True or False, got {value!r}")
    return value


def text(value: Any) -> str:
    """Decode a Redis reply item (bytes when the client does not decode responses)."""
    return value.decode() if isinstance(value, bytes) else value
