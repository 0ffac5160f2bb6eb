local base = ARGV[1]

local function conn_key(w, room) return base .. 'conn:' .. w .. ':' .. room end

local function now_us()
  local t = redis.call('TIME')
  return string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
end

-- Whether one of `workers` still counts `uid` in `room`.
local function held(room, workers, uid)
  for _, w in ipairs(workers) do
    if redis.call('HEXISTS', conn_key(w, room), uid) == 1 then return true end
  end
  return false
end

-- Drop from `room` every worker whose lease is gone, and `leaving` when given:
-- their connections, and their users no remaining worker holds. Returns the
-- remaining workers.
local function reap(room, leaving)
  local wkey, ukey, nkey = base .. 'workers:' .. room, base .. 'users:' .. room,
    base .. 'names:' .. room
  local live, gone, unknown = {}, {}, false
  for _, w in ipairs(redis.call('SMEMBERS', wkey)) do
    if w ~= leaving and redis.call('EXISTS', base .. 'lease:' .. w) == 1 then
      live[#live + 1] = w
    else
      local ckey = conn_key(w, room)
      local uids = redis.call('HKEYS', ckey)
      if #uids == 0 then unknown = true end  -- expired already: which users is unknown
      for _, uid in ipairs(uids) do gone[#gone + 1] = uid end
      redis.call('DEL', ckey)
      redis.call('SREM', wkey, w)
      redis.call('SREM', base .. 'rooms:' .. w, room)
    end
  end
  if #live == 0 then
    redis.call('DEL', ukey, nkey)
    return live
  end
  if unknown then gone = redis.call('ZRANGE', ukey, 0, -1) end
  for _, uid in ipairs(gone) do
    if not held(room, live, uid) then
      redis.call('ZREM', ukey, uid)
      redis.call('HDEL', nkey, uid)
    end
  end
  return live
end

-- Renew the expiry of all of the room's keys together.
local function expire_room(room, ttl)
  local wkey = base .. 'workers:' .. room
  for _, w in ipairs(redis.call('SMEMBERS', wkey)) do
    redis.call('PEXPIRE', conn_key(w, room), ttl)
  end
  redis.call('PEXPIRE', wkey, ttl)
  redis.call('PEXPIRE', base .. 'users:' .. room, ttl)
  redis.call('PEXPIRE', base .. 'names:' .. room, ttl)
end
