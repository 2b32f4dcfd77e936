"""The feature store's capacity reporter: the store reports, the controller decides.

    r = cp.capacity_reporter("shard-0")
    r.report(resident_bytes=12_345, max_resident_bytes=1 << 30)   # lua/report_capacity.lua
    r.report_health(store.health())
    r.deregister()                                                # lua/deregister_shard.lua

Each shard reports its *absolute* resident bytes with a growing sequence number, so a
report that arrives late (out of order) is ignored instead of undoing a newer one.
The run's resident bytes are the sum over shards; the latch is re-evaluated in the
same atomic step as each report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from . import _args
from .errors import InvalidArgument
from .keys import validate_item_id
from .scripts import retried_read

if TYPE_CHECKING:
    from .control_plane import ControlPlane


@dataclass(frozen=True)
class CapacityReport:
    accepted: bool
    """False when the report was older than one already recorded (ignored). A repeat of
    the report last recorded (same seq and figures: a retry) is True."""
    paused: bool
    """The latch after this report."""
    run_resident_bytes: int
    """Sum of resident bytes over all shards of the run, bytes."""


def _bytes(value: Any, what: str, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if type(value) is not int or value < 0 or value >= 2**53:
        raise InvalidArgument(f"{what} must be an int number of bytes >= 0, got {value!r}")
    return str(value)


MAX_AGE_S = 1e9
"""Largest feature age a report may give, seconds (about 31 years): status weighs ages
by bytes, and larger ones could overflow that sum to infinity."""


def _age(value: Any, what: str) -> str:
    if value is None:
        return ""
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= MAX_AGE_S:
        raise InvalidArgument(f"{what} must be a number of seconds from 0 to {MAX_AGE_S:g} or None, got {value!r}")
    return repr(float(value))


class CapacityReporter:
    """Reports one store shard's capacity. One reporter per shard id."""

    def __init__(self, cp: "ControlPlane", store_id: str) -> None:
        self.cp = cp
        self.store_id = validate_item_id(store_id, "store id")
        self._seq: Optional[int] = None

    @retried_read
    def _next_seq(self) -> int:
        if self._seq is None:  # continue after the last report a previous process made
            keys, redis_ = self.cp.keys, self.cp.redis
            stored = redis_.hget(keys.shards, self.store_id) or redis_.hget(keys.retired_shards, self.store_id)
            self._seq = int(_args.text(stored).split("|", 1)[0]) if stored else 0
        if self._seq + 1 >= 2**53:
            raise InvalidArgument(
                f"shard {self.store_id!r} has used every sequence number below 2^53 (its last report "
                f"had {self._seq}, a seq= given near the limit); report it under a new shard id (and "
                "deregister this one)")
        self._seq += 1
        return self._seq

    def report(self, resident_bytes: int, max_resident_bytes: Optional[int] = None,
               avg_age_s: Optional[float] = None, oldest_age_s: Optional[float] = None,
               seq: Optional[int] = None) -> CapacityReport:
        """Report absolute resident bytes (and optionally the hard cap and feature ages).

        ``seq`` defaults to one more than this shard's last report; pass your own
        growing number when several processes speak for one shard.
        """
        args = [
            self.store_id,
            0,
            _bytes(resident_bytes, "resident_bytes"),
            _bytes(max_resident_bytes, "max_resident_bytes", optional=True),
            _age(avg_age_s, "avg_age_s"),
            _age(oldest_age_s, "oldest_age_s"),
        ]
        if seq is not None and (type(seq) is not int or not 0 < seq < 2**53):
            raise InvalidArgument(f"seq must be an int >= 1, got {seq!r}")
        args[1] = seq if seq is not None else self._next_seq()
        accepted, paused, total = self.cp._run("report_capacity", args)
        if not accepted:
            self._seq = None  # a newer report is recorded for this shard: resync next time
        elif seq is not None:
            self._seq = seq  # the next default continues from the caller's number
        return CapacityReport(bool(accepted), bool(paused), int(total))

    def report_health(self, health: Mapping[str, Any]) -> CapacityReport:
        """Report a store ``health()`` dict: resident_bytes, max_resident_bytes,
        avg_age_s, oldest_age_s (numbers only; other keys are ignored)."""
        if not isinstance(health, Mapping) or "resident_bytes" not in health:
            raise InvalidArgument("health must be a dict with at least 'resident_bytes'")
        return self.report(
            health["resident_bytes"], health.get("max_resident_bytes"),
            health.get("avg_age_s"), health.get("oldest_age_s"),
        )

    def deregister(self) -> bool:
        """Remove this shard: its bytes stop counting. Returns False if it was unknown."""
        return bool(self.cp._run("deregister_shard", [self.store_id]))
