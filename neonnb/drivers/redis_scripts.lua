-- neonnb's Redis key layout. Every state change is one of the scripts below (one atomic
-- step each). P is the key prefix (Config.key_prefix, default "neonnb:"); every key of a
-- queue Q starts with Q's base B = P.."{"..Q.."}:", so the hash tag {Q} puts a queue's keys in
-- one Redis Cluster slot and each script touches one queue only (KEYS[1] = B; reserve may
-- take several bases, which the driver only passes together on a single server).
--
--   P.."queues"          SET   every queue name that has held a job (its own slot)
--   P.."workers"         HASH  the registry: worker or scheduler id -> its entry as JSON (by the driver)
--   P.."wake"            channel: PUBLISH <queue> when jobs of <queue> become due
--   B.."job:"..id        HASH  the job record: id queue name payload priority status
--                              attempts max_attempts timeout run_at created_at started_at
--                              finished_at lease_expires worker_id progress result error
--                              output flow (a chain step's or batch member's place, JSON)
--                              unique_key cancel_requested
--   B.."unique:"..key    STRING the id of the job that last took the unique key
--   B.."ready:"..p       ZSET  queued jobs of priority p (0 high, 1 normal, 2 low), scored
--                              by run_at: due and delayed jobs alike, so a delayed job needs
--                              no promotion step and keeps its priority; equal scores order
--                              by id (time-ordered), which keeps FIFO
--   B.."created"         ZSET  every job of the queue (any state) scored by when it was created:
--                              the listings' newest-first order
--   B.."running"         ZSET  reserved jobs scored by lease expiry
--   B.."failed"          ZSET  the failed store, scored by when they failed
--   B.."done"            ZSET  succeeded jobs scored by when, pruned after result_ttl
--   B.."cancelled"       ZSET  cancelled jobs scored by when, pruned after result_ttl
--   B.."expired"         ZSET  jobs that expired before they started, likewise
--   B.."idle"            ZSET  workers waiting for a job of this queue, each "lease_seconds worker_id",
--                              scored by when the wait ends
--   B.."inbox:"..worker  LIST  jobs handed to a waiting worker, already claimed for it (JSON
--                              records; "" wakes it with nothing), expiring after a minute
--   B.."marks:"..group   HASH  a mark set: member -> value (a batch's finished job ids -> results)
--   B.."marks"           ZSET  the mark sets' names scored by their latest change, for pruning
--   B.."slots:"..key     SET   the running jobs holding a place of a concurrency key
--   B.."settings"        HASH  what is set for the queue (paused: no claims, no hand-offs; rate), JSON values
--
-- Each script below starts with a line "--! name"; the driver splits the file there.

--! _prelude
-- Put in front of every script below.
-- The priority band a job's hash names; one written by hand (not 0, 1 or 2) counts as normal,
-- so it never lands in a ready set no claim reads.
local function band(p)
  if p == '0' or p == '2' then return p end
  return '1'
end

--! enqueue
-- KEYS: B.  ARGV: wake channel, queue, mode, then one per job: a JSON array of 12 strings,
-- id name payload priority status attempts max_attempts timeout run_at created_at flow
-- unique_key ("" for none). (One argument per job, not twelve: a client packs each argument
-- separately, and for a batch that was most of the dispatch.)
-- mode "new": store each job unless its id exists (so a call repeated after its reply was
-- lost stores nothing twice), return how many were stored; "unique" (one job): unless
-- B.."unique:"..key names a queued or running job, store this one and name it there; return
-- the id of the job named.
-- A job due at once, with a worker waiting and no due job of its priority or higher before
-- it, is claimed for that worker here and pushed to its inbox: it starts without a wake-up
-- and a claim. The others wait in their ready set, and the wake channel says so.
local B, mode = KEYS[1], ARGV[3]
local fields = {'id', 'name', 'payload', 'priority', 'status', 'attempts', 'max_attempts', 'timeout', 'run_at',
                'created_at', 'flow', 'unique_key'}
local stored, waiting = 0, 0
local result = nil
local looked, idle = false, nil  -- the first waiting worker, looked up once per hand-off
-- A paused queue hands nothing over: its jobs wait in their ready sets until it is resumed.
if redis.call('HEXISTS', B .. 'settings', 'paused') == 1 then looked = true end
for i = 4, #ARGV do
  local job = cjson.decode(ARGV[i])
  local key = B .. 'job:' .. job[1]
  local store = true
  if mode == 'new' then
    store = redis.call('EXISTS', key) == 0
  elseif mode == 'unique' then
    local holder = redis.call('GET', B .. 'unique:' .. job[12])
    local state = holder and redis.call('HGET', B .. 'job:' .. holder, 'status')
    if state == 'queued' or state == 'running' then
      store, result = false, holder
    else
      redis.call('SET', B .. 'unique:' .. job[12], job[1])
      result = job[1]
    end
  end
  if store then
    local hash = {'queue', ARGV[2]}
    for f = 1, 12 do
      if job[f] ~= '' then
        hash[#hash + 1] = fields[f]
        hash[#hash + 1] = job[f]
      end
    end
    local now = job[10]
    local waiter = nil
    if tonumber(job[9]) <= tonumber(now) then
      if not looked then
        redis.call('ZREMRANGEBYSCORE', B .. 'idle', '-inf', '(' .. now)
        idle, looked = redis.call('ZRANGE', B .. 'idle', 0, 0)[1], true
      end
      waiter = idle
      for p = 0, tonumber(job[4]) do
        if waiter and #redis.call('ZRANGEBYSCORE', B .. 'ready:' .. p, '-inf', now, 'LIMIT', 0, 1) > 0 then
          waiter = nil
        end
      end
    end
    if waiter then
      local lease_seconds, worker = string.match(waiter, '^(%S+) (.+)$')
      local lease = tostring(tonumber(now) + tonumber(lease_seconds))
      redis.call('ZREM', B .. 'idle', waiter)
      looked = false
      local claim = {'status', 'running', 'attempts', tostring(tonumber(job[6]) + 1), 'worker_id', worker,
                     'lease_expires', lease, 'started_at', now}
      local record = {}
      for f = 1, #hash, 2 do record[hash[f]] = hash[f + 1] end
      for f = 1, #claim, 2 do
        hash[#hash + 1], hash[#hash + 2] = claim[f], claim[f + 1]
        record[claim[f]] = claim[f + 1]
      end
      redis.call('HSET', key, unpack(hash))
      redis.call('ZADD', B .. 'running', lease, job[1])
      redis.call('RPUSH', B .. 'inbox:' .. worker, cjson.encode(record))
      redis.call('EXPIRE', B .. 'inbox:' .. worker, 60)
    else
      redis.call('HSET', key, unpack(hash))
      redis.call('ZADD', B .. 'ready:' .. job[4], job[9], job[1])
      waiting = waiting + 1
    end
    redis.call('ZADD', B .. 'created', job[10], job[1])
    stored = stored + 1
  end
end
if waiting > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return result or stored

--! mark
-- KEYS: B.  ARGV: group, member, value, now, complete_at.   Adds member with its value to the
-- set (a hash; the first value stays); returns every member's value (flat) once the set has
-- complete_at members, else nothing. The set goes with the queue's finished jobs (purge) once
-- its newest member is older than they are.
local B = KEYS[1]
local set = B .. 'marks:' .. ARGV[1]
redis.call('HSETNX', set, ARGV[2], ARGV[3])
redis.call('ZADD', B .. 'marks', ARGV[4], ARGV[1])
if redis.call('HLEN', set) >= tonumber(ARGV[5]) then return redis.call('HGETALL', set) end
return false

--! reserve
-- KEYS: B of each queue.  ARGV: now, limit, worker_id, lease_expires, the priorities to claim
-- in rank order ("012": all).  Returns the claimed jobs' records, each as its hash's flat field/value list
-- read before the claim, with the claimed fields appended (a later duplicate field wins when
-- the client reads the list)
local now, limit, worker, lease = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local out = {}
for b = 1, #ARGV[5] do
  local p = tonumber(string.sub(ARGV[5], b, b))
  local need = limit - #out
  if need <= 0 then break end
  local candidates = {}
  for _, B in ipairs(KEYS) do
    local found = redis.call('ZRANGEBYSCORE', B .. 'ready:' .. p, '-inf', now, 'WITHSCORES', 'LIMIT', 0, need)
    for j = 1, #found, 2 do
      candidates[#candidates + 1] = {found[j], tonumber(found[j + 1]), B}
    end
  end
  table.sort(candidates, function(a, b)
    if a[2] ~= b[2] then return a[2] < b[2] end
    return a[1] < b[1]
  end)
  for i = 1, math.min(need, #candidates) do
    local id, B = candidates[i][1], candidates[i][3]
    local key = B .. 'job:' .. id
    local fields = redis.call('HGETALL', key)
    local attempts = 1
    for f = 1, #fields, 2 do
      if fields[f] == 'attempts' then attempts = (tonumber(fields[f + 1]) or 0) + 1 end  -- the worker fails a broken record
    end
    local claim = {'attempts', attempts, 'status', 'running', 'worker_id', worker, 'lease_expires', lease,
                   'started_at', now}
    redis.call('HSET', key, unpack(claim))
    redis.call('ZREM', B .. 'ready:' .. p, id)
    redis.call('ZADD', B .. 'running', lease, id)
    for c = 1, #claim do fields[#fields + 1] = tostring(claim[c]) end
    out[#out + 1] = fields
  end
end
return out

--! idle
-- KEYS: B of each queue.  ARGV: "lease_seconds worker_id", until, worker_id.   The worker
-- waits for a job of these queues until then (see enqueue); its inboxes start empty (a ""
-- left by the last unidle would end the wait at once).
for _, B in ipairs(KEYS) do
  redis.call('ZADD', B .. 'idle', ARGV[2], ARGV[1])
  redis.call('DEL', B .. 'inbox:' .. ARGV[3])
end
return 0

--! unidle
-- KEYS: B of each queue.  ARGV: "lease_seconds worker_id", worker_id.   The worker waits no
-- more: returns the jobs handed to it meanwhile and leaves "" in each inbox, which ends a
-- blocking pop still waiting there (a later wait may find one left: it only wakes early).
local out = {}
for _, B in ipairs(KEYS) do
  local inbox = B .. 'inbox:' .. ARGV[2]
  redis.call('ZREM', B .. 'idle', ARGV[1])
  for _, job in ipairs(redis.call('LRANGE', inbox, 0, -1)) do
    if job ~= '' then out[#out + 1] = job end
  end
  redis.call('DEL', inbox)
  redis.call('RPUSH', inbox, '')
  redis.call('EXPIRE', inbox, 60)
end
return out

--! extend
-- KEYS: B.  ARGV: worker_id, lease_expires, id...   Returns the ids asked to stop (cancel).
local B, worker, lease = KEYS[1], ARGV[1], ARGV[2]
local stopping = {}
for i = 3, #ARGV do
  local key = B .. 'job:' .. ARGV[i]
  local held = redis.call('HMGET', key, 'worker_id', 'status', 'cancel_requested')
  if held[1] == worker and held[2] == 'running' then
    redis.call('HSET', key, 'lease_expires', lease)
    redis.call('ZADD', B .. 'running', 'XX', lease, ARGV[i])
    if held[3] == '1' then stopping[#stopping + 1] = ARGV[i] end
  end
end
return stopping

--! permit
-- KEYS: B (of the permits' own slot).  ARGV: key, count, window, token.   A rate limit's
-- check and count, by the server's clock: at most `count` permits of `key` in any `window`
-- seconds. Takes one and returns "0", or returns the seconds until the oldest leaves the window.
local permits = KEYS[1] .. 'permit:' .. ARGV[1]
local count, window = tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', permits, '-inf', now - window)
if redis.call('ZCARD', permits) < count then
  redis.call('ZADD', permits, now, ARGV[4])
  redis.call('PEXPIRE', permits, math.ceil(window * 1000) + 1000)
  return '0'
end
local oldest = redis.call('ZRANGE', permits, 0, 0, 'WITHSCORES')
return tostring(tonumber(oldest[2]) + window - now)

--! slot
-- KEYS: B.  ARGV: "take" or "release", key, limit, job id.   Concurrency per key, within the
-- queue's slot: a holder no longer running frees its place; "take" returns 1 if the job holds
-- one of the `limit` places (now or already), else 0.
local slots = KEYS[1] .. 'slots:' .. ARGV[2]
local id = ARGV[4]
if ARGV[1] == 'release' then
  redis.call('SREM', slots, id)
  return 0
end
for _, held in ipairs(redis.call('SMEMBERS', slots)) do
  if held ~= id and redis.call('HGET', KEYS[1] .. 'job:' .. held, 'status') ~= 'running' then
    redis.call('SREM', slots, held)
  end
end
if redis.call('SISMEMBER', slots, id) == 1 then return 1 end
if redis.call('SCARD', slots) >= tonumber(ARGV[3]) then return 0 end
redis.call('SADD', slots, id)
return 1

--! stopping
-- KEYS: B.  ARGV: worker_id, id...   Of these jobs, those the worker holds that someone asked
-- to stop (cancel). Reads only.
local B, worker = KEYS[1], ARGV[1]
local asked = {}
for i = 2, #ARGV do
  local held = redis.call('HMGET', B .. 'job:' .. ARGV[i], 'worker_id', 'status', 'cancel_requested')
  if held[1] == worker and held[2] == 'running' and held[3] == '1' then asked[#asked + 1] = ARGV[i] end
end
return asked

--! reacquire
-- KEYS: B.  ARGV: worker_id, lease_expires, then (id, attempts of the worker's claim) per job.
-- A job queued again with those attempts (its lease recovered) or one fewer (a claim lost in a
-- crash), so claimed by nobody since, is this worker's again. Returns the ids taken back.
local B, worker, lease = KEYS[1], ARGV[1], ARGV[2]
local taken = {}
for i = 3, #ARGV, 2 do
  local id, attempt = ARGV[i], tonumber(ARGV[i + 1])
  local key = B .. 'job:' .. id
  local job = redis.call('HMGET', key, 'status', 'attempts', 'priority')
  local now_attempts = tonumber(job[2])
  if job[1] == 'queued' and now_attempts and (now_attempts == attempt or now_attempts == attempt - 1) then
    redis.call('ZREM', B .. 'ready:' .. band(job[3]), id)
    redis.call('HSET', key, 'status', 'running', 'attempts', attempt, 'worker_id', worker, 'lease_expires', lease)
    redis.call('ZADD', B .. 'running', lease, id)
    taken[#taken + 1] = id
  end
end
return taken

--! cancel
-- KEYS: B.  ARGV: id, now.   A queued job becomes cancelled; a running one is asked to stop.
-- Returns the status the job had ("" when there is no such job).
local B, id = KEYS[1], ARGV[1]
local key = B .. 'job:' .. id
local job = redis.call('HMGET', key, 'status')
if job[1] == 'queued' then
  for p = 0, 2 do redis.call('ZREM', B .. 'ready:' .. p, id) end  -- whatever its priority field says
  redis.call('HSET', key, 'status', 'cancelled', 'finished_at', ARGV[2])
  redis.call('ZADD', B .. 'cancelled', ARGV[2], id)
elseif job[1] == 'running' then
  redis.call('HSET', key, 'cancel_requested', '1')
end
return job[1] or ''

--! set_owned
-- KEYS: B.  ARGV: id, worker_id, field ("progress" or "output"), value
local key = KEYS[1] .. 'job:' .. ARGV[1]
local held = redis.call('HMGET', key, 'worker_id', 'status')
if held[1] == ARGV[2] and held[2] == 'running' then
  redis.call('HSET', key, ARGV[3], ARGV[4])
  return 1
end
return 0

--! complete
-- KEYS: B.  ARGV: worker_id, now, then (id, has_result "0"/"1", result) per job
local B, worker, now = KEYS[1], ARGV[1], ARGV[2]
local done = {}
for i = 3, #ARGV, 3 do
  local id = ARGV[i]
  local key = B .. 'job:' .. id
  local held = redis.call('HMGET', key, 'worker_id', 'status')
  if held[1] == worker and held[2] == 'running' then
    if ARGV[i + 1] == '1' then
      redis.call('HSET', key, 'status', 'succeeded', 'finished_at', now, 'result', ARGV[i + 2])
    else
      redis.call('HSET', key, 'status', 'succeeded', 'finished_at', now)
    end
    redis.call('HDEL', key, 'lease_expires')
    redis.call('ZREM', B .. 'running', id)
    redis.call('ZADD', B .. 'done', now, id)
    done[#done + 1] = id
  end
end
return done

--! retry
-- KEYS: B.  ARGV: id, worker_id, run_at, error_json
local B, id = KEYS[1], ARGV[1]
local key = B .. 'job:' .. id
local held = redis.call('HMGET', key, 'worker_id', 'status', 'priority')
if held[1] ~= ARGV[2] or held[2] ~= 'running' then return 0 end
redis.call('HSET', key, 'status', 'queued', 'run_at', ARGV[3], 'error', ARGV[4])
redis.call('HDEL', key, 'worker_id', 'lease_expires')
redis.call('ZREM', B .. 'running', id)
redis.call('ZADD', B .. 'ready:' .. band(held[3]), ARGV[3], id)
return 1

--! fail
-- KEYS: B.  ARGV: id, worker_id, now, error_json, status ("failed", "cancelled" for a job
-- that stopped on request, "expired" for one claimed after its expiry)
local B, id = KEYS[1], ARGV[1]
local key = B .. 'job:' .. id
local held = redis.call('HMGET', key, 'worker_id', 'status')
if held[1] ~= ARGV[2] or held[2] ~= 'running' then return 0 end
redis.call('HSET', key, 'status', ARGV[5], 'finished_at', ARGV[3], 'error', ARGV[4])
redis.call('HDEL', key, 'lease_expires')
redis.call('ZREM', B .. 'running', id)
redis.call('ZADD', B .. ARGV[5], ARGV[3], id)
return 1

--! release
-- KEYS: B.  ARGV: wake channel, queue, worker_id, which ("these": the ids listed; "later":
-- ARGV[5] is when they are due again, then the ids; "unheld": every job running under
-- worker_id but those listed, which a claim whose reply was lost took for it), id...
-- An unfinished job goes back; its attempt is not counted.
local B, worker = KEYS[1], ARGV[3]
local ids, due = {}, nil
if ARGV[4] == 'these' then
  for i = 5, #ARGV do ids[#ids + 1] = ARGV[i] end
elseif ARGV[4] == 'later' then
  due = ARGV[5]
  for i = 6, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  local listed = {}
  for i = 5, #ARGV do listed[ARGV[i]] = true end
  for _, id in ipairs(redis.call('ZRANGE', B .. 'running', 0, -1)) do
    if not listed[id] then ids[#ids + 1] = id end
  end
end
local released = 0
for _, id in ipairs(ids) do
  local key = B .. 'job:' .. id
  local held = redis.call('HMGET', key, 'worker_id', 'status', 'priority', 'run_at')
  if held[1] == worker and held[2] == 'running' then
    redis.call('HSET', key, 'status', 'queued')
    redis.call('HINCRBY', key, 'attempts', -1)
    redis.call('HDEL', key, 'worker_id', 'lease_expires')
    redis.call('ZREM', B .. 'running', id)
    if due then redis.call('HSET', key, 'run_at', due) end
    redis.call('ZADD', B .. 'ready:' .. band(held[3]), due or (tonumber(held[4]) and held[4] or '0'), id)
    released = released + 1
  end
end
if released > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return released

--! recover
-- KEYS: B.  ARGV: wake channel, queue, now   (jobs whose worker stopped heartbeating)
-- Returns {requeued ids, exhausted ids}: a job that used up its attempts stays running under
-- its dead worker's id; the driver's caller ends it (fail) once it has counted it.
local B, now = KEYS[1], ARGV[3]
local requeued, exhausted = {}, {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', B .. 'running', '-inf', '(' .. now)) do
  local key = B .. 'job:' .. id
  local job = redis.call('HMGET', key, 'attempts', 'max_attempts', 'priority')
  -- Unreadable attempts count as used up: the driver's caller fails the job, saying why.
  local attempts, most = tonumber(job[1]), tonumber(job[2])
  if not attempts or not most or attempts >= most then
    exhausted[#exhausted + 1] = id
  else
    redis.call('ZREM', B .. 'running', id)
    redis.call('HDEL', key, 'worker_id', 'lease_expires')
    redis.call('HSET', key, 'status', 'queued', 'run_at', now)
    redis.call('ZADD', B .. 'ready:' .. band(job[3]), now, id)
    requeued[#requeued + 1] = id
  end
end
if #requeued > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return {requeued, exhausted}

--! purge
-- KEYS: B.  ARGV: before   (succeeded and cancelled jobs past their result TTL)
local B = KEYS[1]
local purged = 0
for _, finished in ipairs({B .. 'done', B .. 'cancelled', B .. 'expired'}) do
  local old = redis.call('ZRANGEBYSCORE', finished, '-inf', '(' .. ARGV[1])
  for _, id in ipairs(old) do
    local unique = redis.call('HGET', B .. 'job:' .. id, 'unique_key')
    if unique and redis.call('GET', B .. 'unique:' .. unique) == id then redis.call('DEL', B .. 'unique:' .. unique) end
    redis.call('DEL', B .. 'job:' .. id)
    redis.call('ZREM', B .. 'created', id)
  end
  redis.call('ZREMRANGEBYSCORE', finished, '-inf', '(' .. ARGV[1])
  purged = purged + #old
end
for _, group in ipairs(redis.call('ZRANGEBYSCORE', B .. 'marks', '-inf', '(' .. ARGV[1])) do
  redis.call('DEL', B .. 'marks:' .. group)
end
redis.call('ZREMRANGEBYSCORE', B .. 'marks', '-inf', '(' .. ARGV[1])
return purged

--! purge_queued
-- KEYS: B.  ARGV: at most how many to delete.  Deletes queued jobs (waiting and delayed), the
-- lowest priority's first; returns how many (0: none left).
local B, left = KEYS[1], tonumber(ARGV[1])
local deleted = 0
for p = 2, 0, -1 do
  local ready = B .. 'ready:' .. p
  local ids = redis.call('ZRANGE', ready, 0, left - deleted - 1)
  for _, id in ipairs(ids) do
    local key = B .. 'job:' .. id
    local unique = redis.call('HGET', key, 'unique_key')
    if unique and redis.call('GET', B .. 'unique:' .. unique) == id then redis.call('DEL', B .. 'unique:' .. unique) end
    redis.call('DEL', key)
    redis.call('ZREM', B .. 'created', id)
    redis.call('ZREM', ready, id)
  end
  deleted = deleted + #ids
  if deleted >= left then break end
end
return deleted

--! requeue_failed
-- KEYS: B.  ARGV: wake channel, queue, now, id...   (no ids: every failed job of the queue)
local B, now = KEYS[1], ARGV[3]
local ids = {}
for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ids == 0 then ids = redis.call('ZRANGE', B .. 'failed', 0, -1) end
local moved = {}
for _, id in ipairs(ids) do
  local key = B .. 'job:' .. id
  local job = redis.call('HMGET', key, 'status', 'priority')
  if job[1] == 'failed' then
    redis.call('HSET', key, 'status', 'queued', 'attempts', 0, 'run_at', now)
    redis.call('HDEL', key, 'finished_at', 'worker_id', 'lease_expires', 'progress')
    redis.call('ZREM', B .. 'failed', id)
    redis.call('ZADD', B .. 'ready:' .. band(job[2]), now, id)
    moved[#moved + 1] = id
  end
end
if #moved > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return moved

--! delete_failed
-- KEYS: B.  ARGV: id...   (no ids: the queue's whole failed store)
local B = KEYS[1]
local ids = {}
for i = 1, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ids == 0 then ids = redis.call('ZRANGE', B .. 'failed', 0, -1) end
local deleted = 0
for _, id in ipairs(ids) do
  local key = B .. 'job:' .. id
  if redis.call('HGET', key, 'status') == 'failed' then
    redis.call('DEL', key)
    redis.call('ZREM', B .. 'failed', id)
    redis.call('ZREM', B .. 'created', id)
    deleted = deleted + 1
  end
end
return deleted
