-- KEYS lease rooms conn workers users names; ARGV base me room data_ttl [id name count]...
-- Make this worker's entries in the room exactly the given ones.
local me, room, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
reap(room)
local old = redis.call('HKEYS', KEYS[3])
redis.call('DEL', KEYS[3])
local now, keep = now_us(), {}
for i = 5, #ARGV, 3 do
  local uid = ARGV[i]
  keep[uid] = true
  redis.call('HSET', KEYS[3], uid, ARGV[i + 2])
  redis.call('ZADD', KEYS[5], 'NX', now, uid)
  redis.call('HSET', KEYS[6], uid, ARGV[i + 1])
end
if #ARGV >= 5 then
  redis.call('SADD', KEYS[4], me)
  redis.call('SADD', KEYS[2], room)
  redis.call('PEXPIRE', KEYS[2], ttl)
else
  redis.call('SREM', KEYS[4], me)
  redis.call('SREM', KEYS[2], room)
end
local live = redis.call('SMEMBERS', KEYS[4])
for _, uid in ipairs(old) do
  if not keep[uid] and not held(room, live, uid) then
    redis.call('ZREM', KEYS[5], uid)
    redis.call('HDEL', KEYS[6], uid)
  end
end
if #live == 0 then redis.call('DEL', KEYS[5], KEYS[6]) end
expire_room(room, ttl)
return 1
