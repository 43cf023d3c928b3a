//! The Lua scripts the fleet store runs in Redis.
//!
//! Every session mutation is one script, so it is atomic across instances: two instances
//! can never both take the last slot of a budget. Scripts read their clock with `TIME`
//! (Redis's clock, the same for every instance) and validate what they read: a field that
//! is missing or not a number makes the script return `bad_record`, never a guess.
//!
//! Key layout (`P` is the prefix, `thruserv:` by default):
//!
//! | Key | Type | What |
//! |---|---|---|
//! | `P s:RID` | hash | one session: `h` host location, `hip` host IP key, `np` next peer, `j` joiners, `fj` failed joins, `rl`/`cd` relays/candidates, `pbt` pairing bytes; per joiner `m:N` location, `p:N` paired, `b:N` pairing bytes |
//! | `P all` | zset | live session ids, scored by expiry (ms) |
//! | `P ip:IP` | zset | sessions hosted from one IP key, scored by expiry |
//! | `P inst` | zset | instance ids, scored by last heartbeat (ms) |
//! | `P im:INST` | set | `RID PEER` of every member connected to that instance |
//! | `P r:KIND:IP` | hash | one token bucket: `t` tokens, `ts` last update |
//! | channel `P c:INST` | pub/sub | messages for that instance's connections |
//!
//! A location is `INST CONN`: the instance id (hex) and its connection id. Messages
//! published to an instance are `KIND CONN SP BODY` with KIND `T` (encoded server message),
//! `J` (peer joined: BODY is the peer), `L` (peer left: `PEER REASON`) or `C` (session closed:
//! BODY is the code).

/// Helpers every script starts with. `ARGV[1]` is always the key prefix.
const PRELUDE: &str = r#"
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function inst_of(v)
  if type(v) ~= 'string' then return nil end
  return string.match(v, '^(%x+) %d+$')
end
local function send(v, kind, body)
  if type(v) ~= 'string' then return end
  local i, c = string.match(v, '^(%x+) (%d+)$')
  if i then redis.call('PUBLISH', P .. 'c:' .. i, kind .. c .. ' ' .. body) end
end
local function untrack(v, rid, peer)
  local i = inst_of(v)
  if i then redis.call('SREM', P .. 'im:' .. i, rid .. ' ' .. peer) end
end
-- Ends a session: every member (the host too unless skip_host) gets `C code`.
local function close_session(rid, code, skip_host)
  local sk = P .. 's:' .. rid
  local all = redis.call('HGETALL', sk)
  local hip = nil
  for i = 1, #all, 2 do
    local f, v = all[i], all[i + 1]
    if f == 'h' then
      if not skip_host then send(v, 'C', code) end
      untrack(v, rid, '0')
    elseif f == 'hip' then
      hip = v
    else
      local peer = string.match(f, '^m:(%d+)$')
      if peer then
        send(v, 'C', code)
        untrack(v, rid, peer)
      end
    end
  end
  if hip then redis.call('ZREM', P .. 'ip:' .. hip, rid) end
  redis.call('ZREM', P .. 'all', rid)
  redis.call('DEL', sk)
end
-- Removes joiner `peer` and tells the host; returns the joiner's location.
local function drop_joiner(rid, peer, reason)
  local sk = P .. 's:' .. rid
  local v = redis.call('HGET', sk, 'm:' .. peer)
  if not v then return nil end
  redis.call('HDEL', sk, 'm:' .. peer, 'p:' .. peer, 'b:' .. peer)
  redis.call('HINCRBY', sk, 'j', -1)
  untrack(v, rid, peer)
  send(redis.call('HGET', sk, 'h'), 'L', peer .. ' ' .. reason)
  return v
end
-- A token bucket of `burst` tokens refilling at `rate` per minute; takes `n` or nothing.
local function bucket(key, rate, burst, n)
  local now = now_ms()
  local v = redis.call('HMGET', key, 't', 'ts')
  local tokens, ts = tonumber(v[1]), tonumber(v[2])
  if not tokens or not ts or ts > now then tokens, ts = burst, now end
  tokens = math.min(burst, tokens + (now - ts) * rate / 60000)
  local ok = tokens >= n
  if ok then tokens = tokens - n end
  redis.call('HSET', key, 't', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) * 60000 / rate) + 1000)
  return ok
end
"#;

/// ARGV: prefix, kind, ip key, rate per minute, burst, n. Returns 1 (allowed) or 0.
const BUCKET: &str = r#"
local rate, burst, n = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if bucket(P .. 'r:' .. ARGV[2] .. ':' .. ARGV[3], rate, burst, n) then return 1 end
return 0
"#;

/// ARGV: prefix, rid, location, ip key, max sessions, max per ip, ttl ms, instance.
const CREATE: &str = r#"
local rid, loc, ip = ARGV[2], ARGV[3], ARGV[4]
local max, per_ip, ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local now = now_ms()
local allk, ipk, sk = P .. 'all', P .. 'ip:' .. ip, P .. 's:' .. rid
redis.call('ZREMRANGEBYSCORE', allk, '-inf', now)
if max > 0 and redis.call('ZCARD', allk) >= max then return 'full' end
redis.call('ZREMRANGEBYSCORE', ipk, '-inf', now)
if per_ip > 0 and redis.call('ZCARD', ipk) >= per_ip then return 'ip_full' end
if redis.call('EXISTS', sk) == 1 then return 'taken' end
redis.call('HSET', sk, 'h', loc, 'hip', ip, 'np', 1, 'j', 0, 'fj', 0, 'rl', 0, 'cd', 0, 'pbt', 0)
redis.call('PEXPIRE', sk, ttl)
redis.call('ZADD', allk, now + ttl, rid)
redis.call('ZADD', ipk, now + ttl, rid)
redis.call('PEXPIRE', ipk, ttl)
redis.call('SADD', P .. 'im:' .. ARGV[8], rid .. ' 0')
return 'ok'
"#;

/// ARGV: prefix, rid, location, max joiners, instance. Returns {status, peer}.
const JOIN: &str = r#"
local rid, loc, max = ARGV[2], ARGV[3], tonumber(ARGV[4])
local sk = P .. 's:' .. rid
local f = redis.call('HMGET', sk, 'h', 'j', 'np')
if not f[1] then return {'no_such_session', 0} end
local j, np = tonumber(f[2]), tonumber(f[3])
if not inst_of(f[1]) or not j or not np or np < 1 or np > 4294967295 then
  return {'bad_record', 0}
end
if j >= max then return {'session_full', 0} end
redis.call('HSET', sk, 'm:' .. np, loc, 'np', np + 1, 'j', j + 1)
redis.call('SADD', P .. 'im:' .. ARGV[5], rid .. ' ' .. np)
send(f[1], 'J', tostring(np))
return {'ok', np}
"#;

/// ARGV: prefix, rid, my location, from, to, kind (`c`|`r`), pairing tag ok (`1`|`0`),
/// accepted (`1`|`0`), text, session cap, ip key, ip bytes per minute, per-joiner cap,
/// per-session cap.
const ROUTE: &str = r#"
local rid, me, from, to, kind = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local text, cap = ARGV[9], tonumber(ARGV[10])
local len = string.len(text)
local sk = P .. 's:' .. rid
local function at(peer)
  if peer == '0' then return redis.call('HGET', sk, 'h') end
  return redis.call('HGET', sk, 'm:' .. peer)
end
if at(from) ~= me then return 'not_in_session' end
if from ~= '0' and to ~= '0' then return 'not_allowed' end
local field = 'rl'
if kind == 'c' then field = 'cd' end
local used = tonumber(redis.call('HGET', sk, field))
if not used then return 'bad_record' end
if cap > 0 and used >= cap then return 'quota' end
local target = at(to)
if not target then return 'no_such_peer' end
if target == me then return 'not_allowed' end
local joiner = from
if from == '0' then joiner = to end
local pairing = kind == 'r' and redis.call('HGET', sk, 'p:' .. joiner) ~= '1'
if pairing then
  if ARGV[7] ~= '1' then return 'not_paired' end
  local mine = tonumber(redis.call('HGET', sk, 'b:' .. joiner) or '0')
  local total = tonumber(redis.call('HGET', sk, 'pbt'))
  if not mine or not total then return 'bad_record' end
  if mine + len > tonumber(ARGV[13]) or total + len > tonumber(ARGV[14]) then
    return 'pairing_budget'
  end
  local rate = tonumber(ARGV[12])
  if rate > 0 and not bucket(P .. 'r:pb:' .. ARGV[11], rate, rate, len) then
    return 'pairing_ip'
  end
end
send(target, 'T', text)
redis.call('HINCRBY', sk, field, 1)
if pairing then
  redis.call('HINCRBY', sk, 'pbt', len)
  if from == '0' and ARGV[8] == '1' then
    redis.call('HSET', sk, 'p:' .. joiner, '1')
    redis.call('HDEL', sk, 'b:' .. joiner)
  else
    redis.call('HINCRBY', sk, 'b:' .. joiner, len)
  end
end
return 'ok'
"#;

/// ARGV: prefix, rid, my location, peer, max failed joins. Returns `ok`, `closed` or a
/// refusal.
const REJECT: &str = r#"
local rid, me, peer, max = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local sk = P .. 's:' .. rid
local h = redis.call('HGET', sk, 'h')
if not h then return 'not_in_session' end
if h ~= me then return 'not_allowed' end
local fj = tonumber(redis.call('HGET', sk, 'fj'))
if not fj then return 'bad_record' end
local v = drop_joiner(rid, peer, 'rejected')
if not v then return 'no_such_peer' end
send(v, 'C', 'rejected_by_host')
fj = redis.call('HINCRBY', sk, 'fj', 1)
if max > 0 and fj >= max then
  close_session(rid, 'too_many_failed_joins', false)
  return 'closed'
end
return 'ok'
"#;

/// ARGV: prefix, rid, my location, peer, reason. Leaving as host closes the session.
const LEAVE: &str = r#"
local rid, me, peer = ARGV[2], ARGV[3], ARGV[4]
local sk = P .. 's:' .. rid
-- Even if the session is already gone (expired by its TTL), stop tracking this member.
untrack(me, rid, peer)
if peer == '0' then
  if redis.call('HGET', sk, 'h') == me then close_session(rid, 'host_left', true) end
elseif redis.call('HGET', sk, 'm:' .. peer) == me then
  drop_joiner(rid, peer, ARGV[5])
end
return 'ok'
"#;

/// ARGV: prefix, rid, code. Ends a session for every member.
const CLOSE: &str = r#"
close_session(ARGV[2], ARGV[3], false)
return 'ok'
"#;

/// ARGV: prefix, instance, stale ms (0: retire this instance now). Records this instance's
/// heartbeat, then removes every instance whose heartbeat is older than `stale` from all
/// its sessions, as if each of its members had disconnected. Returns {reaped, sessions,
/// new}: `new` is 1 when this instance was not registered (first beat, or Redis forgot it).
const HEARTBEAT: &str = r#"
local me, stale = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local dead
local new = 0
if stale == 0 then
  dead = {me}
else
  new = redis.call('ZADD', P .. 'inst', now, me)
  dead = redis.call('ZRANGEBYSCORE', P .. 'inst', '-inf', now - stale)
end
for _, d in ipairs(dead) do
  local members = redis.call('SMEMBERS', P .. 'im:' .. d)
  for _, m in ipairs(members) do
    local rid, peer = string.match(m, '^(%S+) (%d+)$')
    if rid then
      local sk = P .. 's:' .. rid
      if peer == '0' then
        if inst_of(redis.call('HGET', sk, 'h')) == d then close_session(rid, 'host_left', true) end
      elseif inst_of(redis.call('HGET', sk, 'm:' .. peer)) == d then
        drop_joiner(rid, peer, 'disconnected')
      end
    end
  end
  redis.call('DEL', P .. 'im:' .. d)
  redis.call('ZREM', P .. 'inst', d)
end
redis.call('ZREMRANGEBYSCORE', P .. 'all', '-inf', now)
return {#dead, redis.call('ZCARD', P .. 'all'), new}
"#;

/// The scripts, compiled once (their SHA1 is computed here; Redis caches them on first use
/// and `redis::Script` falls back to sending the source after a Redis restart).
pub(crate) struct Scripts {
    pub(crate) bucket: redis::Script,
    pub(crate) create: redis::Script,
    pub(crate) join: redis::Script,
    pub(crate) route: redis::Script,
    pub(crate) reject: redis::Script,
    pub(crate) leave: redis::Script,
    pub(crate) close: redis::Script,
    pub(crate) heartbeat: redis::Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let s = |body: &str| redis::Script::new(&format!("{PRELUDE}{body}"));
        Self {
            bucket: s(BUCKET),
            create: s(CREATE),
            join: s(JOIN),
            route: s(ROUTE),
            reject: s(REJECT),
            leave: s(LEAVE),
            close: s(CLOSE),
            heartbeat: s(HEARTBEAT),
        }
    }
}
