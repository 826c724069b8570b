-- neonnb's Redis key layout. Every state change is one of the scripts below (one atomic
-- step each); P is the key prefix (Config.key_prefix, default "neonnb:").
--
--   P.."queues"                  SET   every queue name that has held a job
--   P.."wake"                    channel: PUBLISH <queue> when jobs of <queue> become due
--   P.."job:"..id                HASH  the job record: id queue name payload priority status
--                                      attempts max_attempts timeout run_at created_at
--                                      started_at finished_at lease_expires worker_id
--                                      progress result error
--   P.."q:"..queue..":ready:"..p ZSET  queued jobs of priority p (0 high, 1 normal, 2 low),
--                                      scored by run_at: due and delayed jobs alike, so a
--                                      delayed job needs no promotion step and keeps its
--                                      priority; equal scores order by id (time-ordered),
--                                      which keeps FIFO
--   P.."q:"..queue..":running"   ZSET  reserved jobs scored by lease expiry
--   P.."q:"..queue..":failed"    ZSET  the failed store, scored by when they failed
--   P.."q:"..queue..":done"      ZSET  succeeded jobs scored by when, pruned after result_ttl
--
-- Each script below starts with a line "--! name"; the driver splits the file there.

--! enqueue
-- ARGV: P, then 11 values per job: id queue name payload priority status attempts
-- max_attempts timeout run_at created_at (timeout "" when there is none)
local P = ARGV[1]
local fields = {'id', 'queue', 'name', 'payload', 'priority', 'status', 'attempts', 'max_attempts', 'timeout',
                'run_at', 'created_at'}
local queues = {}
for i = 2, #ARGV, 11 do
  local hash = {}
  for f = 1, 11 do
    local value = ARGV[i + f - 1]
    if value ~= '' then
      hash[#hash + 1] = fields[f]
      hash[#hash + 1] = value
    end
  end
  redis.call('HSET', P .. 'job:' .. ARGV[i], unpack(hash))
  redis.call('ZADD', P .. 'q:' .. ARGV[i + 1] .. ':ready:' .. ARGV[i + 4], ARGV[i + 9], ARGV[i])
  queues[ARGV[i + 1]] = true
end
for queue in pairs(queues) do
  redis.call('SADD', P .. 'queues', queue)
  redis.call('PUBLISH', P .. 'wake', queue)
end
return 0

--! reserve
-- ARGV: P, now, limit, worker_id, lease_expires, queue...
local P, limit, worker, lease = ARGV[1], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local out = {}
for p = 0, 2 do
  local need = limit - #out
  if need <= 0 then break end
  local candidates = {}
  for i = 6, #ARGV do
    local ready = P .. 'q:' .. ARGV[i] .. ':ready:' .. p
    local found = redis.call('ZRANGEBYSCORE', ready, '-inf', ARGV[2], 'WITHSCORES', 'LIMIT', 0, need)
    for j = 1, #found, 2 do
      candidates[#candidates + 1] = {found[j], tonumber(found[j + 1]), ARGV[i]}
    end
  end
  table.sort(candidates, function(a, b)
    if a[2] ~= b[2] then return a[2] < b[2] end
    return a[1] < b[1]
  end)
  for i = 1, math.min(need, #candidates) do
    local id, queue = candidates[i][1], candidates[i][3]
    local key = P .. 'job:' .. id
    redis.call('ZREM', P .. 'q:' .. queue .. ':ready:' .. p, id)
    redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('HSET', key, 'status', 'running', 'worker_id', worker, 'lease_expires', lease, 'started_at', ARGV[2])
    redis.call('ZADD', P .. 'q:' .. queue .. ':running', lease, id)
    out[#out + 1] = redis.call('HGETALL', key)
  end
end
return out

--! extend
-- ARGV: P, worker_id, lease_expires, id...
local P, worker, lease = ARGV[1], ARGV[2], ARGV[3]
for i = 4, #ARGV do
  local key = P .. 'job:' .. ARGV[i]
  local held = redis.call('HMGET', key, 'worker_id', 'status', 'queue')
  if held[1] == worker and held[2] == 'running' then
    redis.call('HSET', key, 'lease_expires', lease)
    redis.call('ZADD', P .. 'q:' .. held[3] .. ':running', 'XX', lease, ARGV[i])
  end
end
return 0

--! progress
-- ARGV: P, id, worker_id, progress_json
local key = ARGV[1] .. 'job:' .. ARGV[2]
local held = redis.call('HMGET', key, 'worker_id', 'status')
if held[1] == ARGV[3] and held[2] == 'running' then
  redis.call('HSET', key, 'progress', ARGV[4])
  return 1
end
return 0

--! complete
-- ARGV: P, worker_id, now, then (id, has_result "0"/"1", result) per job
local P, worker, now = ARGV[1], ARGV[2], ARGV[3]
local done = {}
for i = 4, #ARGV, 3 do
  local id = ARGV[i]
  local key = P .. 'job:' .. id
  local held = redis.call('HMGET', key, 'worker_id', 'status', 'queue')
  if held[1] == worker and held[2] == 'running' then
    redis.call('HSET', key, 'status', 'succeeded', 'finished_at', now)
    redis.call('HDEL', key, 'lease_expires')
    if ARGV[i + 1] == '1' then redis.call('HSET', key, 'result', ARGV[i + 2]) end
    redis.call('ZREM', P .. 'q:' .. held[3] .. ':running', id)
    redis.call('ZADD', P .. 'q:' .. held[3] .. ':done', now, id)
    done[#done + 1] = id
  end
end
return done

--! retry
-- ARGV: P, id, worker_id, run_at, error_json
local P, id = ARGV[1], ARGV[2]
local key = P .. 'job:' .. id
local held = redis.call('HMGET', key, 'worker_id', 'status', 'queue', 'priority')
if held[1] ~= ARGV[3] or held[2] ~= 'running' then return 0 end
redis.call('HSET', key, 'status', 'queued', 'run_at', ARGV[4], 'error', ARGV[5])
redis.call('HDEL', key, 'worker_id', 'lease_expires')
redis.call('ZREM', P .. 'q:' .. held[3] .. ':running', id)
redis.call('ZADD', P .. 'q:' .. held[3] .. ':ready:' .. held[4], ARGV[4], id)
return 1

--! fail
-- ARGV: P, id, worker_id, now, error_json
local P, id = ARGV[1], ARGV[2]
local key = P .. 'job:' .. id
local held = redis.call('HMGET', key, 'worker_id', 'status', 'queue')
if held[1] ~= ARGV[3] or held[2] ~= 'running' then return 0 end
redis.call('HSET', key, 'status', 'failed', 'finished_at', ARGV[4], 'error', ARGV[5])
redis.call('HDEL', key, 'lease_expires')
redis.call('ZREM', P .. 'q:' .. held[3] .. ':running', id)
redis.call('ZADD', P .. 'q:' .. held[3] .. ':failed', ARGV[4], id)
return 1

--! release
-- ARGV: P, worker_id, id...   (an unfinished job goes back; its attempt is not counted)
local P, worker = ARGV[1], ARGV[2]
local released = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local key = P .. 'job:' .. id
  local held = redis.call('HMGET', key, 'worker_id', 'status', 'queue', 'priority', 'run_at')
  if held[1] == worker and held[2] == 'running' then
    redis.call('HSET', key, 'status', 'queued')
    redis.call('HINCRBY', key, 'attempts', -1)
    redis.call('HDEL', key, 'worker_id', 'lease_expires')
    redis.call('ZREM', P .. 'q:' .. held[3] .. ':running', id)
    redis.call('ZADD', P .. 'q:' .. held[3] .. ':ready:' .. held[4], held[5], id)
    redis.call('PUBLISH', P .. 'wake', held[3])
    released = released + 1
  end
end
return released

--! recover
-- ARGV: P, now, lease_error_json   (jobs whose worker stopped heartbeating)
local P, now = ARGV[1], ARGV[2]
local requeued = {}
for _, queue in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  local running = P .. 'q:' .. queue .. ':running'
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', running, '-inf', '(' .. now)) do
    local key = P .. 'job:' .. id
    local job = redis.call('HMGET', key, 'attempts', 'max_attempts', 'priority')
    redis.call('ZREM', running, id)
    redis.call('HDEL', key, 'worker_id', 'lease_expires')
    if tonumber(job[1]) >= tonumber(job[2]) then
      redis.call('HSET', key, 'status', 'failed', 'finished_at', now, 'error', ARGV[3])
      redis.call('ZADD', P .. 'q:' .. queue .. ':failed', now, id)
    else
      redis.call('HSET', key, 'status', 'queued', 'run_at', now)
      redis.call('ZADD', P .. 'q:' .. queue .. ':ready:' .. job[3], now, id)
      redis.call('PUBLISH', P .. 'wake', queue)
      requeued[#requeued + 1] = id
    end
  end
end
return requeued

--! purge
-- ARGV: P, before   (succeeded jobs past their result TTL)
local P = ARGV[1]
local purged = 0
for _, queue in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  local done = P .. 'q:' .. queue .. ':done'
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', done, '-inf', '(' .. ARGV[2])) do
    redis.call('DEL', P .. 'job:' .. id)
    purged = purged + 1
  end
  redis.call('ZREMRANGEBYSCORE', done, '-inf', '(' .. ARGV[2])
end
return purged

--! requeue_failed
-- ARGV: P, now, queue or "", id...   (no ids: every failed job, of queue if given)
local P, now, only = ARGV[1], ARGV[2], ARGV[3]
local ids = {}
for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ids == 0 then
  for _, queue in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
    if only == '' or only == queue then
      for _, id in ipairs(redis.call('ZRANGE', P .. 'q:' .. queue .. ':failed', 0, -1)) do ids[#ids + 1] = id end
    end
  end
end
local moved = {}
for _, id in ipairs(ids) do
  local key = P .. 'job:' .. id
  local job = redis.call('HMGET', key, 'status', 'queue', 'priority')
  if job[1] == 'failed' and (only == '' or only == job[2]) then
    redis.call('HSET', key, 'status', 'queued', 'attempts', 0, 'run_at', now)
    redis.call('HDEL', key, 'finished_at', 'worker_id', 'lease_expires', 'progress')
    redis.call('ZREM', P .. 'q:' .. job[2] .. ':failed', id)
    redis.call('ZADD', P .. 'q:' .. job[2] .. ':ready:' .. job[3], now, id)
    redis.call('PUBLISH', P .. 'wake', job[2])
    moved[#moved + 1] = id
  end
end
return moved

--! delete_failed
-- ARGV: P, id...   (no ids: the whole failed store)
local P = ARGV[1]
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ids == 0 then
  for _, queue in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
    for _, id in ipairs(redis.call('ZRANGE', P .. 'q:' .. queue .. ':failed', 0, -1)) do ids[#ids + 1] = id end
  end
end
local deleted = 0
for _, id in ipairs(ids) do
  local key = P .. 'job:' .. id
  local job = redis.call('HMGET', key, 'status', 'queue')
  if job[1] == 'failed' then
    redis.call('DEL', key)
    redis.call('ZREM', P .. 'q:' .. job[2] .. ':failed', id)
    deleted = deleted + 1
  end
end
return deleted
