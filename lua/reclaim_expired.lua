-- reclaim_expired.lua: return expired leases to their queues. Every lease call does
-- this for a bounded number of leases; this script lets an operator or a test do it
-- for the whole run (the client calls it until it returns less than the limit).
--
-- KEYS: config counters task_attempts pending prompt_leases prompt_deadlines
--       worker_inflight dlq train_queue train_leases train_deadlines train_signal bp events
-- ARGV: [1] limit (per kind, per call)
-- Returns: {prompt leases reclaimed, train leases reclaimed}
-- Invariants: those of includes/leases.lua; a lease is reclaimed only after its deadline
--   (Redis time), at most `limit` of each kind per call.
-- @include util
-- @include backpressure
-- @include leases

local cfg = load_config()
local now = now_ms()
local limit = tonumber(ARGV[1])
return {reclaim_prompts(cfg, now, limit), reclaim_samples(now, limit)}
