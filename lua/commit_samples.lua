-- commit_samples.lua: a rollout worker hands in sample refs; fresh ones join the train
-- queue and the source tasks' leases are released. Also serves offline refs.
--
-- KEYS: config counters tasks task_bytes task_attempts prompt_leases prompt_deadlines
--       worker_inflight tasks_done samples train_queue train_signal acked failed_samples
--       bp reply
-- ARGV: [1] worker_id ('' for offline refs)  [2] offline (1 = no source lease check)
--       [3] count, then per ref i (0-based) at 4 + 4i:
--         sample_id, source_task_id ('' = none), lease token ('' = any of this
--         worker's), record JSON
-- Returns: the sample ids that were fresh and accepted, in call order.
-- Errors:  TOOLARGE (a record over max_record_bytes): nothing is written.
-- Fencing: a ref whose source task is not leased to this worker (expired and
--   re-granted, or already done) is rejected: not returned, nothing enqueued
--   (counted in counters.fenced_commits).
-- Dedup: a sample id seen before (queued, leased, acked or failed) is not enqueued
--   again, but a duplicate from the lease holder still releases the lease, so a
--   re-sent commit never leaks the worker's in-flight slot. Several refs may come
--   from one task: leases are released after every ref is checked.
-- @include util
-- @include backpressure
-- @include leases

local worker, offline, count = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3])
local cfg = load_config()
local cached = cached_reply()
if cached then return split_words(cached) end
local too_large = check_record_sizes(cfg, 4, 4, count, 0, 3)
if too_large then return too_large end

local fresh, to_release, fenced = {}, {}, 0
for i = 0, count - 1 do
  local base = 4 + 4 * i
  local sample_id, task_id, token, record = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local accepted = true
  if not offline and task_id ~= '' then
    local lease = to_release[task_id] or redis.call('HGET', K.prompt_leases, task_id)
    if holds(lease, worker, token) then
      to_release[task_id] = lease
    else
      accepted = false
      fenced = fenced + 1
    end
  end
  if accepted and redis.call('HSETNX', K.samples, sample_id, record) == 1 then
    if redis.call('SISMEMBER', K.acked, sample_id) == 1
        or redis.call('HEXISTS', K.failed_samples, sample_id) == 1 then
      redis.call('HDEL', K.samples, sample_id)
    else
      redis.call('RPUSH', K.train_queue, sample_id)
      fresh[#fresh + 1] = sample_id
    end
  end
end

local done = 0
for task_id, lease in pairs(to_release) do
  release_prompt_lease(task_id, lease)
  redis.call('SADD', K.tasks_done, task_id)
  redis.call('HDEL', K.tasks, task_id)
  redis.call('HDEL', K.task_bytes, task_id)
  redis.call('HDEL', K.task_attempts, task_id)
  done = done + 1
end
if done > 0 then redis.call('HINCRBY', K.counters, 'prompts_done', done) end
if fenced > 0 then redis.call('HINCRBY', K.counters, 'fenced_commits', fenced) end
if #fresh > 0 then
  redis.call('HINCRBY', K.counters, 'samples_committed', #fresh)
  wake_trainers(#fresh)
end
remember_reply(cfg, table.concat(fresh, ' '))
return fresh
