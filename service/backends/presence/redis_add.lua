-- KEYS lease rooms conn workers users names; ARGV base me room uid name data_ttl
-- -> {first, lease_lost}
local me, room, uid, ttl = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[6])
local lost = redis.call('EXISTS', KEYS[1]) == 0
reap(room)
redis.call('HINCRBY', KEYS[3], uid, 1)
redis.call('SADD', KEYS[4], me)
redis.call('SADD', KEYS[2], room)
redis.call('PEXPIRE', KEYS[2], ttl)
local first = redis.call('ZADD', KEYS[5], 'NX', now_us(), uid)
redis.call('HSET', KEYS[6], uid, ARGV[5])
expire_room(room, ttl)
return {first, lost and 1 or 0}
