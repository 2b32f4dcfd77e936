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
--   A call refused by 2 or 4 while work is pending counts as rollout starvation, one
--   limited to 0 by 3 while work is pending as rollout_capped; a call that finds
--   nothing pending counts as neither.
-- Invariants: see includes/leases.lua. Each grant gets a fresh fencing token.
-- @include util
-- @include backpressure
-- @include leases

local worker, max_tasks, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local cfg = load_config({'reply_ttl_s', 'max_prompt_attempts', 'backpressure', 'high_watermark_bytes',
  'low_watermark_bytes', 'max_inflight_prompts_per_worker', 'default_task_bytes', 'stale_after_s'})
local now, now_text = server_time()

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

reclaim_prompts(cfg, now, ARGV[4], now_text)
redis.call('ZADD', K.workers, now_text, worker)

-- Everything this call reads of the backpressure state, in one read.
local bp = redis.call('HMGET', K.bp, 'operator_paused', 'resident_bytes', 'reserved_bytes', 'paused',
  'rollout_starved_since')
local want = max_tasks
local refused_by_backpressure = (bp[1] == '1')
if refused_by_backpressure then want = 0 end
if cfg.backpressure and want > 0 then
  mark_stale_shards(cfg, now)
  if evaluate_latch(cfg, now, 'lease by ' .. worker, bp[4], bp[2]) then
    want = 0
    refused_by_backpressure = true
  elseif cfg.max_inflight_prompts_per_worker then
    local inflight = tonumber(redis.call('HGET', K.worker_inflight, worker) or 0)
    want = math.max(0, math.min(want, cfg.max_inflight_prompts_per_worker - inflight))
    -- Like starvation, a cap hit counts only when the cap withheld work that exists.
    if want == 0 and redis.call('LLEN', K.pending) > 0 then
      redis.call('HINCRBY', K.bp, 'rollout_capped', 1)
    end
  end
end

local high = cfg.backpressure and cfg.high_watermark_bytes
local resident, reserved = tonumber(bp[2] or 0), tonumber(bp[3] or 0)
local default_bytes = cfg.default_task_bytes or 0
local ids = {}
if want > 0 then ids = redis.call('LPOP', K.pending, want == max_tasks and ARGV[2] or int_text(want)) or {} end
local sizes = hmget_sparse(K.task_bytes, ids)
local granted, added_bytes = 0, 0
for i = 1, #ids do
  local bytes = tonumber(sizes[i] or default_bytes)
  if high and bytes > 0 and resident + reserved + added_bytes + bytes > high
      and not (reserved + added_bytes == 0 and resident < high) then
    -- This task and the ones after it go back to the head of pending, in order.
    local rest = {}
    for j = #ids, i, -1 do rest[#rest + 1] = ids[j] end
    call_many('LPUSH', K.pending, rest)
    refused_by_backpressure = true
    break
  end
  sizes[i] = bytes
  added_bytes = added_bytes + bytes
  granted = i
end

local out, tokens = {}, {}
if granted > 0 then
  local granted_ids = ids
  if granted < #ids then
    granted_ids = {}
    for i = 1, granted do granted_ids[i] = ids[i] end
  end
  local first
  first, tokens = grant_leases(K.prompt_leases, K.prompt_deadlines, ids, granted, sizes, worker,
    now, now_text, lease_ms)
  local attempts = hmget_sparse(K.task_attempts, granted_ids)
  local records = get_many('HMGET', K.tasks, granted_ids)
  for i = 1, granted do
    out[4 * i - 3] = ids[i]
    out[4 * i - 2] = first + i
    out[4 * i - 1] = tonumber(attempts[i] or 0)
    out[4 * i] = records[i]
  end
  redis.call('HINCRBY', K.worker_inflight, worker, int_text(granted))
  if added_bytes > 0 then redis.call('HINCRBY', K.bp, 'reserved_bytes', int_text(added_bytes)) end
  starvation_ends('rollout', now, bp[5])
elseif refused_by_backpressure and redis.call('LLEN', K.pending) > 0 then
  redis.call('HINCRBY', K.bp, 'rollout_starved', 1)
  starvation_begins('rollout', now)
elseif redis.call('LLEN', K.pending) == 0 then
  starvation_ends('rollout', now, bp[5])
end
remember_reply(cfg, table.concat(tokens, ' '))
return out
