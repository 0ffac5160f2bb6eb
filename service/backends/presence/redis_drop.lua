-- KEYS lease rooms; ARGV base me: withdraw this worker from every room.
local me = ARGV[2]
for _, room in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  reap(room, me)
  redis.call('DEL', conn_key(me, room))
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
