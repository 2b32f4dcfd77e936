-- lease_prompts.lua: grant up to max_tasks pending prompt tasks to one rollout worker,
-- with the backpressure decision taken in the same atomic step (no check-then-act).
--
-- KEYS: config counters tasks task_bytes task_attempts pending prompt_leases
--       prompt_deadlines worker_inflight workers dlq bp events shard_seen stale_shards reply
-- ARGV: [1] worker_id  [2] max_tasks (>= 1)  [3] lease_ms (lease duration, ms)
--       [4] reclaim_limit (expired leases reclaimed first, bounded work per call)
-- Returns: flat array, 4 entries per granted task: task_id, lease token, attempt,
--          record JSON. Empty when nothing is pending or backpressure refuses.
-- Decision, in order:
--   1. expired prompt leases are reclaimed (attempt + 1, or dead-lettered);
--   2. operator pause or the hysteresis latch (re-evaluated now) -> grant nothing;
--   3. per-worker cap: grant <= max(0, min(max_tasks, cap - inflight[worker]));
--   4. reservation: a task with estimated bytes e is granted only while
--      resident + reserved + e <= high (or nothing is reserved yet and resident < high,
--      so a task larger than the whole budget still makes progress).
--   A call refused by 2 or 4 while work is pending counts as rollout starvation; a
--   call that finds nothing pending does not.
-- Invariants: see includes/leases.lua. Each grant gets a fresh fencing token.
-- @include util
-- @include backpressure
-- @include leases

local worker, max_tasks, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local cfg = load_config()
local now = now_ms()

local function grant_reply(pairs_text)
  -- Replay a cached grant: return the tasks still leased under the same tokens.
  local out = {}
  local words = split_words(pairs_text)
  for i = 1, #words, 2 do
    local task_id, token = words[i], words[i + 1]
    if holds(redis.call('HGET', K.prompt_leases, task_id), worker, token) then
      out[#out + 1] = task_id
      out[#out + 1] = token
      out[#out + 1] = tonumber(redis.call('HGET', K.task_attempts, task_id) or 0)
      out[#out + 1] = redis.call('HGET', K.tasks, task_id)
    end
  end
  return out
end

local cached = cached_reply()
if cached then return grant_reply(cached) end

reclaim_prompts(cfg, now, tonumber(ARGV[4]))
redis.call('ZADD', K.workers, now, worker)

local bp = redis.call('HMGET', K.bp, 'operator_paused', 'resident_bytes', 'reserved_bytes')
local want = max_tasks
local refused_by_backpressure = (bp[1] == '1')
if refused_by_backpressure then want = 0 end
if cfg.backpressure and want > 0 then
  mark_stale_shards(cfg, now)
  if evaluate_latch(cfg, now, 'lease by ' .. worker) then
    want = 0
    refused_by_backpressure = true
  elseif cfg.max_inflight_prompts_per_worker then
    local inflight = tonumber(redis.call('HGET', K.worker_inflight, worker) or 0)
    want = math.max(0, math.min(want, cfg.max_inflight_prompts_per_worker - inflight))
    if want == 0 then redis.call('HINCRBY', K.bp, 'rollout_capped', 1) end
  end
end

local high = cfg.backpressure and cfg.high_watermark_bytes
local resident, reserved = tonumber(bp[2] or 0), tonumber(bp[3] or 0)
local default_bytes = cfg.default_task_bytes or 0
local out, tokens, added_bytes = {}, {}, 0
while #tokens < want * 2 do
  local task_id = redis.call('LPOP', K.pending)
  if not task_id then break end
  local bytes = tonumber(redis.call('HGET', K.task_bytes, task_id) or default_bytes)
  if high and bytes > 0 and resident + reserved + added_bytes + bytes > high
      and not (reserved + added_bytes == 0 and resident < high) then
    redis.call('LPUSH', K.pending, task_id)
    refused_by_backpressure = true
    break
  end
  local token = redis.call('HINCRBY', K.counters, 'fence', 1)
  redis.call('HSET', K.prompt_leases, task_id, token .. '|' .. bytes .. '|' .. now .. '|' .. worker)
  redis.call('ZADD', K.prompt_deadlines, now + lease_ms, task_id)
  added_bytes = added_bytes + bytes
  tokens[#tokens + 1] = task_id
  tokens[#tokens + 1] = token
  out[#out + 1] = task_id
  out[#out + 1] = token
  out[#out + 1] = tonumber(redis.call('HGET', K.task_attempts, task_id) or 0)
  out[#out + 1] = redis.call('HGET', K.tasks, task_id)
end

local granted = #tokens / 2
if granted > 0 then
  redis.call('HINCRBY', K.worker_inflight, worker, granted)
  if added_bytes > 0 then redis.call('HINCRBY', K.bp, 'reserved_bytes', added_bytes) end
  starvation_ends('rollout', now)
elseif refused_by_backpressure and redis.call('LLEN', K.pending) > 0 then
  redis.call('HINCRBY', K.bp, 'rollout_starved', 1)
  starvation_begins('rollout', now)
elseif redis.call('LLEN', K.pending) == 0 then
  starvation_ends('rollout', now)
end
remember_reply(cfg, table.concat(tokens, ' '))
return out
