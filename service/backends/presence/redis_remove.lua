-- KEYS lease rooms conn workers users names; ARGV base me room uid
-- -> {counted, last, lease_lost}
local me, room, uid = ARGV[2], ARGV[3], ARGV[4]
local lost = redis.call('EXISTS', KEYS[1]) == 0
local live = reap(room)
if redis.call('HEXISTS', KEYS[3], uid) == 0 then return {0, 0, lost and 1 or 0} end
local last = 0
if redis.call('HINCRBY', KEYS[3], uid, -1) <= 0 then
  redis.call('HDEL', KEYS[3], uid)
  if redis.call('EXISTS', KEYS[3]) == 0 then
    redis.call('SREM', KEYS[4], me)
    redis.call('SREM', KEYS[2], room)
  end
  if not held(room, live, uid) then
    redis.call('ZREM', KEYS[5], uid)
    redis.call('HDEL', KEYS[6], uid)
    last = 1
  end
end
return {1, last, lost and 1 or 0}
