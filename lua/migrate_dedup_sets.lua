-- migrate_dedup_sets.lua: convert a run's dedup markers from the Redis sets that
-- dataflow-redis 0.1.0 kept (tasks_done, acked) to packed id sets (includes/idset.lua),
-- a bounded chunk per call so Redis never blocks for long.
--
-- KEYS: tasks_done acked dedup_migrating
-- ARGV: [1] chunk (>= 1: ids moved per call)
-- Returns: {moved, remaining}: ids this call moved, ids still in old sets (0 = done;
--   call again while remaining > 0). A run whose markers are already packed returns
--   {0, 0} and is left alone.
-- Invariants: every id is in exactly one of the old set and dedup_migrating, the packed
--   set under construction; dedup_migrating takes the old key's name in the call that
--   empties the old set. tasks_done is converted before acked. Until both are done the
--   scripts that read or write the markers (ingest of caller ids, commit, ack, requeue
--   of undurable acks) fail with WRONGTYPE (mapped to a "run migrate" error): nothing
--   is read or written half-converted. Each reaches its marker sets before its first
--   write, so such a refused call changes nothing (tests/test_migrate.py); the other
--   scripts (leases, pause, config, reclaim, status) do not touch the markers.
-- @include util
-- @include idset

local chunk = tonumber(ARGV[1])
for _, key in ipairs({K.tasks_done, K.acked}) do
  if redis.call('TYPE', key).ok == 'set' then
    local ids = redis.call('SPOP', key, chunk)
    idset_add(K.dedup_migrating, ids)
    local remaining = redis.call('SCARD', key)
    if remaining == 0 then
      if redis.call('EXISTS', K.dedup_migrating) == 1 then
        redis.call('RENAME', K.dedup_migrating, key)
      end
      if key == K.tasks_done and redis.call('TYPE', K.acked).ok == 'set' then
        remaining = redis.call('SCARD', K.acked)
      end
    end
    return {#ids, remaining}
  end
end
return {0, 0}
