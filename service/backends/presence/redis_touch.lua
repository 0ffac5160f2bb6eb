-- KEYS lease rooms; ARGV base me data_ttl room... : reap and keep alive this worker's rooms.
local ttl = tonumber(ARGV[3])
for i = 4, #ARGV do
  reap(ARGV[i])
  expire_room(ARGV[i], ttl)
end
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
