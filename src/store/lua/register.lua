-- ARGV: prefix, name, instance id, descriptor JSON, role, ttl (ms)
-- Returns {created (0/1), registered_at (ms)}.
local name, id, ttl = ARGV[2], ARGV[3], ARGV[6]
local now = now_ms()
local k = inst_key(name, id)
local created = 0
local registered_at = redis.call('HGET', k, 'registered_at')
if not registered_at then
  registered_at = now
  created = 1
end
redis.call('DEL', k)
redis.call('HSET', k,
  'name', name, 'id', id, 'reg', ARGV[4], 'role', ARGV[5], 'ttl_ms', ttl,
  'registered_at', registered_at, 'last_heartbeat', now, 'status', 'ok')
redis.call('PEXPIRE', k, ttl)
redis.call('ZADD', svc_key(name), now + tonumber(ttl), id)
reindex(name, now)
return {created, tonumber(registered_at)}
