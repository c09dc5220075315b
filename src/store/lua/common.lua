-- Shared prelude of every rollcall script (prepended at build time).
-- Keys, with P the configured prefix:
--   P i:<name>:<instance>  hash, one per instance, expires with the instance's TTL
--   P s:<name>             sorted set: instance id -> expiry (ms), the per-service index
--   P names                sorted set: service name -> latest expiry of its instances
-- Key names are derived inside the scripts, so rollcall needs a single Redis (or Sentinel),
-- not Redis Cluster.
local P = ARGV[1]
local NAMES = P .. 'names'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function inst_key(name, id)
  return P .. 'i:' .. name .. ':' .. id
end

local function svc_key(name)
  return P .. 's:' .. name
end

-- Live instance ids of a service: those whose expiry is still ahead.
local function live_ids(name, now)
  return redis.call('ZRANGEBYSCORE', svc_key(name), '(' .. now, '+inf')
end

-- After an instance's expiry changed (or it left): drop expired members, let the service
-- index live as long as its longest-lived instance, and record that in the names index.
local function reindex(name, now)
  local sk = svc_key(name)
  redis.call('ZREMRANGEBYSCORE', sk, '-inf', now)
  local last = redis.call('ZRANGE', sk, -1, -1, 'WITHSCORES')
  if #last == 0 then
    redis.call('DEL', sk)
    redis.call('ZREM', NAMES, name)
  else
    redis.call('PEXPIREAT', sk, last[2])
    redis.call('ZADD', NAMES, last[2], name)
  end
  redis.call('ZREMRANGEBYSCORE', NAMES, '-inf', now)
end
