"""A simulated feature store for the demo, the soaks and the tests.

It holds *byte counts*, not tensors: ``put(sample_id, nbytes)`` records that a
sample's features now occupy ``nbytes``; ``evict`` frees them once trainers ack.
State lives in Redis under its own prefix (``dfr-sim:{<run>}:<shard>:*``, outside
the control plane's keys) so that many worker and trainer processes share one store.

Like a real store it enforces a hard cap (a put over it is all-or-nothing: refused,
nothing stored) and it reports capacity to the control plane after every change,
using its own change counter as the report sequence number, so reports from several
processes arrive in any order and the newest still wins. It also records the peak
resident bytes it ever held, which the soaks compare against the watermarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional

if TYPE_CHECKING:
    from .control_plane import ControlPlane

# KEYS: objects (hash id -> bytes), state (hash), ages (zset id -> put ms)
# ARGV: cap ('' = none), then for put: sample_id, nbytes; for evict: ids...
# Returns {status, resident, version, count, sum_put_ms, oldest_put_ms, now_ms};
# status for put: 1 stored, 0 duplicate (already stored), -1 refused (over the cap).
_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function reply(status, now)
  local s = redis.call('HMGET', KEYS[2], 'resident', 'version', 'count', 'sum_put_ms')
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  return {status, tonumber(s[1] or 0), tonumber(s[2] or 0), tonumber(s[3] or 0),
          tonumber(s[4] or 0), tonumber(oldest[2] or now), now}
end
"""
_PUT = _COMMON + """
local id, n, cap = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[1])
local now = now_ms()
if redis.call('HEXISTS', KEYS[1], id) == 1 then return reply(0, now) end
local resident = tonumber(redis.call('HGET', KEYS[2], 'resident') or 0)
if cap and resident + n > cap then return reply(-1, now) end
redis.call('HSET', KEYS[1], id, n)
redis.call('ZADD', KEYS[3], now, id)
resident = redis.call('HINCRBY', KEYS[2], 'resident', n)
redis.call('HINCRBY', KEYS[2], 'version', 1)
redis.call('HINCRBY', KEYS[2], 'count', 1)
redis.call('HINCRBY', KEYS[2], 'sum_put_ms', now)
if resident > tonumber(redis.call('HGET', KEYS[2], 'peak') or 0) then
  redis.call('HSET', KEYS[2], 'peak', resident)
end
return reply(1, now)
"""
_EVICT = _COMMON + """
local now = now_ms()
local freed = 0
for i = 2, #ARGV do
  local n = redis.call('HGET', KEYS[1], ARGV[i])
  if n then
    redis.call('HDEL', KEYS[1], ARGV[i])
    local put_ms = redis.call('ZSCORE', KEYS[3], ARGV[i])
    redis.call('ZREM', KEYS[3], ARGV[i])
    redis.call('HINCRBY', KEYS[2], 'resident', -tonumber(n))
    redis.call('HINCRBY', KEYS[2], 'count', -1)
    redis.call('HINCRBY', KEYS[2], 'sum_put_ms', -tonumber(put_ms))
    freed = freed + tonumber(n)
  end
end
if freed > 0 then redis.call('HINCRBY', KEYS[2], 'version', 1) end
return reply(freed, now)
"""


@dataclass(frozen=True)
class StoreState:
    resident_bytes: int
    version: int
    objects: int
    avg_age_s: Optional[float]
    oldest_age_s: Optional[float]


class SimulatedFeatureStore:
    """One simulated store shard, shared by every process that opens the same
    (run, shard_id). ``max_resident_bytes`` is the hard cap (None: unlimited).
    With ``report=True`` every change is reported to the control plane."""

    def __init__(self, cp: "ControlPlane", shard_id: str = "sim-0",
                 max_resident_bytes: Optional[int] = None, report: bool = True) -> None:
        self.cp = cp
        self.shard_id = shard_id
        self.max_resident_bytes = max_resident_bytes
        prefix = f"dfr-sim:{{{cp.run_id}}}:{shard_id}:"
        self._keys = [prefix + "objects", prefix + "state", prefix + "ages"]
        self._put = cp.redis.register_script(_PUT)
        self._evict = cp.redis.register_script(_EVICT)
        self.reporter = cp.capacity_reporter(shard_id) if report else None

    def _cap(self) -> str:
        return "" if self.max_resident_bytes is None else str(self.max_resident_bytes)

    def _after(self, raw) -> StoreState:
        _, resident, version, count, sum_put_ms, oldest_ms, now = (int(x) for x in raw)
        state = StoreState(
            resident_bytes=resident, version=version, objects=count,
            avg_age_s=(now - sum_put_ms / count) / 1000 if count else None,
            oldest_age_s=(now - oldest_ms) / 1000 if count else None,
        )
        if self.reporter is not None:
            self.reporter.report(resident, self.max_resident_bytes, state.avg_age_s,
                                 state.oldest_age_s, seq=version + 1)
        return state

    def put(self, sample_id: str, nbytes: int) -> bool:
        """Store ``nbytes`` for ``sample_id``. False if refused by the hard cap (nothing
        stored); True if stored or already present (idempotent)."""
        raw = self._put(keys=self._keys, args=[self._cap(), sample_id, int(nbytes)])
        self._after(raw)
        return int(raw[0]) >= 0

    def evict(self, sample_ids: Iterable[str]) -> int:
        """Free the bytes of ``sample_ids``; returns the bytes freed."""
        ids = list(sample_ids)
        if not ids:
            return 0
        raw = self._evict(keys=self._keys, args=[self._cap(), *ids])
        self._after(raw)
        return int(raw[0])

    def health(self) -> dict:
        """The store's health(): resident_bytes, max_resident_bytes, avg_age_s, oldest_age_s."""
        state = self.state()
        return {"resident_bytes": state.resident_bytes, "max_resident_bytes": self.max_resident_bytes,
                "avg_age_s": state.avg_age_s, "oldest_age_s": state.oldest_age_s}

    def state(self) -> StoreState:
        raw = self._evict(keys=self._keys, args=[self._cap()])  # evicting nothing reads state
        _, resident, version, count, sum_put_ms, oldest_ms, now = (int(x) for x in raw)
        return StoreState(resident, version, count,
                          (now - sum_put_ms / count) / 1000 if count else None,
                          (now - oldest_ms) / 1000 if count else None)

    def peak_bytes(self) -> int:
        """Highest resident bytes this shard ever held."""
        return int(self.cp.redis.hget(self._keys[1], "peak") or 0)

    def delete(self) -> None:
        self.cp.redis.delete(*self._keys)
