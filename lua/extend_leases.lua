-- extend_leases.lua: heartbeat. Pushes the deadline of the leases a holder still
-- holds to now + lease_ms and records the holder's last contact.
--
-- KEYS: prompt_leases prompt_deadlines workers train_leases train_deadlines trainers
-- ARGV: [1] kind ('prompt' for a rollout worker, 'train' for a trainer)
--       [2] holder_id  [3] lease_ms, then pairs at 4 + 2i: id, lease token
-- Returns: the ids NOT held any more (expired and reclaimed, or re-granted); the client
--   stops working on them. Cost: O(ids in the call + log n), no scan.
-- Invariants: only leases held under the presented token move; nothing is granted,
--   released or requeued here.
-- @include util

local kind, holder, lease_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local leases, deadlines, registry = K.prompt_leases, K.prompt_deadlines, K.workers
if kind == 'train' then leases, deadlines, registry = K.train_leases, K.train_deadlines, K.trainers end
local now = now_ms()
-- A deletion as the first write lets the heartbeat run when Redis is at maxmemory
-- (then only writes that add data are refused, and only as a script's first write).
redis.call('ZREM', registry, holder)
redis.call('ZADD', registry, now, holder)
local lost = {}
for i = 4, #ARGV, 2 do
  if holds(redis.call('HGET', leases, ARGV[i]), holder, ARGV[i + 1]) then
    redis.call('ZADD', deadlines, now + lease_ms, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
