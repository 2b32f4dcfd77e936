-- fail_prompts.lua: a rollout worker gives up tasks it holds.
--
-- KEYS: config counters task_attempts pending prompt_leases prompt_deadlines
--       worker_inflight dlq bp events reply
-- ARGV: [1] worker_id  [2] reason  [3] retryable (1/0)
--       then pairs at 4 + 2i: task_id, the grant's lease token (no other token holds it)
-- Returns: the task ids actually affected (only leases this worker holds).
-- Effect: retryable -> attempt + 1 and back to the tail of pending, or dead-lettered
--   with "attempts exhausted" once max_prompt_attempts is reached; not retryable ->
--   dead-lettered at once with the reason (terminal failure).
-- Invariants: a task leaves prompt_leases exactly once and lands in exactly one of
--   pending or dlq; in-flight counter and reserved bytes drop with the lease.
-- @include util
-- @include backpressure
-- @include leases

local worker, reason, retryable = ARGV[1], ARGV[2], ARGV[3] == '1'
local cfg = load_config()
local cached = cached_reply()
if cached then return split_words(cached) end
local now = now_ms()

local affected = {}
for i = 4, #ARGV, 2 do
  local task_id, token = ARGV[i], ARGV[i + 1]
  local lease = redis.call('HGET', K.prompt_leases, task_id)
  if holds(lease, worker, token) then
    release_prompt_lease(task_id, lease)
    if retryable then
      retry_task(cfg, task_id, reason, now)
    else
      bury_task(task_id, reason, tonumber(redis.call('HGET', K.task_attempts, task_id) or 0), now, false)
    end
    affected[#affected + 1] = task_id
  end
end
remember_reply(cfg, table.concat(affected, ' '))
return affected
