"""Reading the packed id sets (``tasks_done``, ``acked``) that lua/includes/idset.lua writes.

A set is one hash: ``n`` (members), ``l`` and ``s`` (linear-hashing level and split
pointer) and buckets ``b<i>``, each ``"\\n"`` followed by ``"<id>\\n"`` per member. This
module only reads; every change goes through the scripts. The bucket rule here must
match ``idset_field`` in the Lua include (tests/test_idset.py checks both agree).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import redis

from ._args import text


def bucket_field(item_id: str, level: int, split: int) -> str:
    """The hash field of the bucket that holds ``item_id`` in a set of this shape."""
    h = int(hashlib.sha1(item_id.encode()).hexdigest()[:8], 16)
    low = 1 << level
    bucket = h % low
    if bucket < split:
        bucket = h % (2 * low)
    return f"b{bucket}"


def _shape(client: redis.Redis, key: str) -> tuple[int, int, int]:
    n, level, split = client.hmget(key, "n", "l", "s")
    return int(n or 0), int(level or 0), int(split or 0)


def contains(client: redis.Redis, key: str, item_ids: Iterable[str]) -> list[bool]:
    """Membership of each id, in order (two round trips, however many ids). Not atomic:
    a bucket split by a writer between the two reads hides its moved members, so this
    is for sets nobody writes at the moment (tests, a finished run). During a run,
    ``cp.is_done`` / ``cp.is_acked`` read in one script (lua/read_membership.lua)."""
    ids = list(item_ids)
    if not ids:
        return []
    members, level, split = _shape(client, key)
    if members == 0:
        return [False] * len(ids)
    buckets = client.hmget(key, [bucket_field(i, level, split) for i in ids])
    return [b is not None and f"\n{i}\n" in text(b) for i, b in zip(ids, buckets)]


def count(client: redis.Redis, key: str) -> int:
    """Number of members."""
    return int(client.hget(key, "n") or 0)


def members(client: redis.Redis, key: str) -> set[str]:
    """Every member (reads the whole set: for tests and small runs)."""
    out: set[str] = set()
    for field, value in client.hscan_iter(key, count=1000):
        if text(field).startswith("b"):
            out.update(text(value).split())
    return out
