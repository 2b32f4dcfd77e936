-- read_leases.lua: lease rows for the given ids, each read whole in one atomic step.
-- Read-only (writes nothing).
--
-- KEYS: prompt_leases prompt_deadlines task_attempts train_leases train_deadlines
-- ARGV: [1] kind ('prompt' or 'train')  [2..] item ids (task ids or sample ids)
-- Returns: flat array, 3 entries per id in ARGV order: the lease value
--          ("token|bytes|granted_ms|holder"; false once the lease is gone), its deadline
--          (ms; false if none) and, for prompts, the task's attempt count (false if 0).
-- Cost: O(n).
-- Invariants: read-only. Row, deadline and attempt come from one moment: read in two
--   steps, a lease re-granted in between would pair the old holder with the new
--   holder's deadline.
-- @include util

local prompt = ARGV[1] == 'prompt'
local ids = {}
for i = 2, #ARGV do ids[i - 1] = ARGV[i] end
local n = #ids
local values = get_many('HMGET', prompt and K.prompt_leases or K.train_leases, ids)
local deadlines = get_many('ZMSCORE', prompt and K.prompt_deadlines or K.train_deadlines, ids)
local attempts = prompt and hmget_sparse(K.task_attempts, ids) or {}
local out = {}
for i = 1, n do
  out[3 * i - 2] = values[i]
  out[3 * i - 1] = deadlines[i] or false
  out[3 * i] = attempts[i] or false
end
return out
