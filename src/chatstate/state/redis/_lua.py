"""The Lua scripts of the Redis backend, and the pure code that packs their arguments.

Layout (see ``_codec``): a user's document is a hash whose fields are encoded
paths and whose values are JSON text written by Python; ``#v`` holds the
version, ``#s`` the stored size and ``#m``, when the document has one other
than 1, its schema version (``StateData(schema_version=...)``). Lua compares
and copies these strings but never decodes a value, so cjson cannot round a
number, turn ``[]`` into ``{}`` or escape a ``/``.

Beside it, in the same hash slot, the user's *operation log* is a small hash:
``#n`` counts the operations recorded so far and each remembered operation key
(12 characters) maps to ``"seq version nonce digest"``; now and then the records
older than the newest ids are dropped. Keys and values are short and few, so the
log keeps Redis's compact listpack encoding. A *claim* (a message handler holding the user) is a
third key, ``nonce op_key``, that expires by itself (``SET ... PX``).

An update reads only the fields its patch names (plus ``#v`` and ``#s``) and
keeps the size up to date from their lengths. Only a write that replaces or
deletes a whole object, a reset and a compare-and-set read the whole hash.

Every script checks everything (key types, the operation log, the version, the
size limit) before its first write, so a refused write leaves the stored data
exactly as it was. A reply is one string: a head of newline-separated fields,
then the document's fields and values joined by newlines (compact JSON never
holds a raw newline), which redis-py reads in one piece.

The logic mirrors :func:`chatstate.state.apply_write`; the parity tests run
both on random operations and compare. The apply script is a set of local
functions, each given its inputs as arguments (Lua builds every function anew on
each run, and each captured variable adds to that), and a main body that runs the
rules in ``apply_write``'s order. ``tests/backends/test_lua_script.py`` calls the scripts
directly, with hand-made arguments and stored data.
"""

from __future__ import annotations

from typing import Final

from chatstate.exceptions import StateTooLargeError
from chatstate.state._backend import (
    OPS_TRIM_AT,
    REMEMBERED_OPS,
    Acquire,
    Delete,
    Edits,
    Increment,
    Release,
    Renew,
    Replace,
    Reset,
    Write,
)
from chatstate.state._codec import encode_path, encode_value, flatten
from chatstate.state._rules import SET
from chatstate.typing import Path

__all__ = ["APPLY_SCRIPT", "LOAD_SCRIPT", "write_args"]


_COMMON = r"""
local function fail(key, why)
  return 'corrupt\n' .. key .. '\n' .. why
end

-- pcall a command; a permission error is raised (as NOPERM, whichever words the
-- server used), any other error means the key holds something that is not ours.
local function try(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r['err'] then
    local e = r['err']
    if string.find(e, 'NOPERM', 1, true) or string.find(e, 'ACL failure', 1, true)
        or string.find(e, 'user executing the script', 1, true) then
      error({err = 'NOPERM ' .. e})
    end
    return nil, e
  end
  return r
end

local function dump(doc)
  return table.concat(redis.call('HGETALL', doc), '\n')
end
"""

LOAD_SCRIPT: Final = (
    _COMMON
    + r"""
-- KEYS[1] document; ARGV[1] an echo the caller checks against its request.
local all = try('HGETALL', KEYS[1])
if all == nil then
  return fail(KEYS[1], 'the key holds a ' .. redis.call('TYPE', KEYS[1])['ok'] ..
    ', not a chatstate hash')
end
return 'ok\n' .. ARGV[1] .. '\n' .. table.concat(all, '\n')
"""
)

APPLY_SCRIPT: Final = (
    _COMMON
    + r"""
-- KEYS[1] document hash, KEYS[2] operation log (a hash), KEYS[3] claim (a string).
-- ARGV[1] the parameters, newline-separated: op key, nonce, digest, dedupe ms,
-- ttl ms or '', max bytes, mode, expected version or '', flags, lease ms or '',
-- '1' when the reply should carry the document, and the writer's schema version or ''.
-- ARGV[2] the mode's arguments, newline-separated. (Paths and values are compact
-- JSON, which never holds a raw newline; two arguments instead of one per path
-- save redis-py most of its packing work.)
-- Modes: e edits, i increment, r reset, x replace, D delete, c claim, w renew the
-- claim (never taking one that is not held under the nonce), l release.
-- Flags: c the write completes the claim held under its nonce; k with c, the claim
-- stays held; f force (delete); n the first send of a write whose op key chatstate
-- made up (it cannot be logged yet).
--
-- The functions take what they need as arguments and return what they found (a
-- refusal first, when they can refuse), so that each call builds them cheaply:
-- Lua makes every function anew on every run, and each variable it captures costs.
-- The main body, at the end, runs the rules in apply_write's order.

-- The operation log's count and the record of key (nil: do not look, a first send
-- cannot be logged yet; one HGET is then cheaper than HMGET's table): refusal, count,
-- and the record's version, nonce and digest. A forced delete clears a log that is not ours.
local function read_log(ops, key, force_delete)
  local record, count, log
  if key then
    log = try('HMGET', ops, key, '#n')
    if log then record, count = log[1], log[2] end
  else
    count = try('HGET', ops, '#n')
    log = count ~= nil
  end
  if not log then
    if not force_delete then
      return fail(ops, 'the key is not a chatstate operation log')
    end
    redis.call('DEL', ops)
  end
  local seq = 0
  if count then
    seq = tonumber(count)
    if seq == nil then return fail(ops, 'the operation count is not a number') end
  end
  if record then
    local rseq, rver, rnonce, rdig = string.match(record, '^(%d+) (%d+) (%S*) (%S*)$')
    if rseq == nil then return fail(ops, 'an operation record is malformed') end
    return nil, seq, rver, rnonce, rdig
  end
  return nil, seq
end

-- The claim's holder (its nonce, or nil): refusal, holder.
local function read_claim(claimkey)
  local held, herr = try('GET', claimkey)
  if herr then return fail(claimkey, 'the key is not a chatstate claim') end
  if held then
    local hnonce = string.match(held, '^(%S+) %S+$')
    if hnonce == nil then return fail(claimkey, 'the claim is malformed') end
    return nil, hnonce
  end
end

-- The mode's arguments: for edits, their kinds, paths and values (read straight from
-- the text: a small update builds no list of lines); else text's lines (A), and for
-- an increment the paths to read: the counter's, then its ancestors'.
local function parse_body(mode, text)
  if text == '' then  -- (a claim, a delete): one empty table will do, none is changed later
    local none = {}
    return none, none, none, none
  end
  local A, kinds, paths, values = {}, {}, {}, {}
  local n, i = 0, 1
  if mode == 'e' then
    local is_value = false
    while true do
      local j = string.find(text, '\n', i, true)
      local line = j and string.sub(text, i, j - 1) or string.sub(text, i)
      if is_value then
        values[n], is_value = line, false
      else
        local kind = string.sub(line, 1, 1)
        n = n + 1
        kinds[n], paths[n], is_value = kind, string.sub(line, 2), kind == 's'
      end
      if not j then break end
      i = j + 1
    end
    return A, kinds, paths, values
  end
  while true do
    local j = string.find(text, '\n', i, true)
    n = n + 1
    if not j then
      A[n] = string.sub(text, i)
      break
    end
    A[n] = string.sub(text, i, j - 1)
    i = j + 1
  end
  if mode == 'i' then
    for k = 1, n - 1 do paths[k] = A[k] end
  end
  return A, kinds, paths, values
end

-- The document's version, size and (with_schema) schema ('#m'; none means 1), and
-- the stored values of paths, in one HMGET for up to 4000 paths: refusal, version,
-- size, schema, stored values.
local function load_meta(doc, with_schema, paths)
  local meta, off, np = nil, 2, #paths
  if with_schema then
    off = 3
    if np > 0 and np < 4000 then
      meta = try('HMGET', doc, '#v', '#s', '#m', unpack(paths))
    else
      meta = try('HMGET', doc, '#v', '#s', '#m')
    end
  elseif np > 0 and np < 4000 then
    meta = try('HMGET', doc, '#v', '#s', unpack(paths))
  else
    meta = try('HMGET', doc, '#v', '#s')
  end
  if meta == nil then
    return fail(doc, 'the key holds a ' .. redis.call('TYPE', doc)['ok'] ..
      ', not a chatstate hash')
  end
  local version, size, sschema, stored = 0, 0, 1, {}
  if not meta[1] then
    if redis.call('EXISTS', doc) == 1 then
      return fail(doc, 'the hash has no version field')
    end
  else
    if not (string.match(meta[1], '^%d+$') and meta[2] and string.match(meta[2], '^%d+$')) then
      return fail(doc, 'the version or size field is not a whole number')
    end
    version, size = tonumber(meta[1]), tonumber(meta[2])
    if off == 3 and meta[3] then
      if not string.match(meta[3], '^[1-9]%d?%d?%d?%d?%d?%d?%d?%d?$') then
        return fail(doc, 'the schema field is not a whole number from 1 to 999999999')
      end
      sschema = tonumber(meta[3])
    end
  end
  if np > 0 and np < 4000 then
    for j = 1, np do stored[j] = meta[j + off] end
  elseif np > 0 then
    for s = 1, np, 1000 do
      local part = redis.call('HMGET', doc, unpack(paths, s, math.min(s + 999, np)))
      for j = 1, #part do stored[#stored + 1] = part[j] end
    end
  end
  return nil, version, size, sschema, stored
end

-- Edits, fast path: only the named fields change. Returns the changes (path -> new
-- value, false to delete) and the new size, or nil and the size unchanged when an
-- edit drops a subtree (the whole-document path then does the work).
local function apply_edits(kinds, paths, values, stored, size)
  local cur, orig = {}, {}
  for j = 1, #paths do
    if orig[paths[j]] == nil then
      orig[paths[j]] = stored[j] or false
      cur[paths[j]] = stored[j] or false
    end
  end
  for j = 1, #kinds do
    local p = paths[j]
    if kinds[j] ~= 'o' and cur[p] == '{}' then
      return nil, size  -- a stored object, or one made earlier in this write, goes away
    end
    if kinds[j] == 's' then
      cur[p] = values[j]
    elseif kinds[j] == 'd' then
      cur[p] = false
    else
      cur[p] = '{}'
    end
  end
  local changes = {}
  for p, v in pairs(cur) do
    local o = orig[p]
    if v ~= o then
      if o then size = size - #p - #o end
      if v then size = size + #p + #v end
      changes[p] = v
    end
  end
  return changes, size
end

-- An increment by `by`, done in place by HINCRBY (and undone when too large). Returns
-- a refusal ('not_integer', 'overflow', 'too_large' or an error reply) and the size,
-- or nil, the counter's new text, the new size and the changes (missing ancestors).
local function apply_increment(doc, paths, by, stored, size, max_bytes)
  -- Ancestors must be objects or missing; the counter an integer or missing.
  local missing = {}
  for j = 2, #paths do
    local v = stored[j]
    if v == false or v == nil then
      missing[#missing + 1] = paths[j]
    elseif v ~= '{}' then
      return 'not_integer'
    end
  end
  local old = stored[1]
  if #missing > 0 and old then return 'not_integer' end
  local ok, err = try('HINCRBY', doc, paths[1], by)
  if ok == nil then
    if string.find(err, 'overflow', 1, true) then return 'overflow' end
    if string.find(err, 'not an integer', 1, true) then return 'not_integer' end
    return redis.error_reply(err)  -- OOM, READONLY, ...: nothing was written yet
  end
  -- The reply of HINCRBY is a Lua number (a double): read the exact text back.
  local value = redis.call('HGET', doc, paths[1])
  if old then size = size - #paths[1] - #old end
  size = size + #paths[1] + #value
  for j = 1, #missing do size = size + #missing[j] + 2 end
  if size > max_bytes then
    -- Too large: put the exact old text back (the only write a script undoes).
    if old then redis.call('HSET', doc, paths[1], old) else redis.call('HDEL', doc, paths[1]) end
    return 'too_large', size
  end
  local changes = {}
  for j = 1, #missing do changes[missing[j]] = '{}' end
  return nil, value, size, changes
end

-- The whole-document path (edits that drop a subtree, a reset, a replace): read every
-- field, compute the new set, diff. Returns a refusal (a corrupt reply, 'conflict' or
-- an error reply), or nil, the changes and the new size. Its helpers are made here,
-- so that a small update never builds them.
local function rewrite(doc, mode, A, kinds, paths, values, expected, version)
  local flat = redis.call('HGETALL', doc)
  local fields = {}
  for i = 1, #flat, 2 do
    local f = flat[i]
    if string.byte(f, 1) == 34 then
      fields[f] = flat[i + 1]
    elseif f ~= '#v' and f ~= '#s' and f ~= '#m' then
      return fail(doc, 'the hash has a field that is not a chatstate path')
    end
  end

  -- Edits: each applied to a copy; setting or deleting an object drops its subtree.
  local function edit_all()
    local new = {}
    for f, v in pairs(fields) do new[f] = v end
    local function drop(p)
      local old = new[p]
      if old == '{}' then
        local n = #p
        for f in pairs(new) do
          if string.sub(f, 1, n) == p then new[f] = nil end
        end
      elseif old ~= nil then
        new[p] = nil
      end
    end
    for j = 1, #kinds do
      local p = paths[j]
      if kinds[j] == 's' then
        drop(p)
        new[p] = values[j]
      elseif kinds[j] == 'd' then
        drop(p)
      elseif new[p] ~= '{}' then
        new[p] = '{}'
      end
    end
    return new
  end

  -- A reset: the preserved paths that exist, with their subtrees and their ancestors
  -- as objects. (A's groups: path, number of ancestors, the ancestors' paths.)
  local function reset()
    local new = {}
    local i = 1
    while i <= #A do
      local p, n = A[i], tonumber(A[i + 1])
      local old = fields[p]
      if old ~= nil then
        if old == '{}' then
          local len = #p
          for f, v in pairs(fields) do
            if string.sub(f, 1, len) == p then new[f] = v end
          end
        else
          new[p] = old
        end
        for j = 1, n do new[A[i + 1 + j]] = '{}' end
      end
      i = i + 2 + n
    end
    return new
  end

  -- A replace: the sent document's fields (A's pairs: path, value).
  local function replace()
    local new = {}
    for i = 1, #A, 2 do new[A[i]] = A[i + 1] end
    return new
  end

  local new
  if mode == 'e' then
    new = edit_all()
  elseif mode == 'r' then
    new = reset()
  elseif mode == 'x' then
    if tonumber(expected) ~= version then return 'conflict' end
    new = replace()
  else
    return redis.error_reply('chatstate: unknown mode')
  end
  local changes, size = {}, 0
  for f, v in pairs(new) do
    size = size + #f + #v
    if fields[f] ~= v then changes[f] = v end
  end
  for f in pairs(fields) do
    if new[f] == nil then changes[f] = false end
  end
  return nil, changes, size
end

-- Store a new version: its number, size and schema (nil: unchanged), the changed
-- fields, and the time to live (ttl ms, or '').
local function store(doc, version, size, schema, changes, ttl)
  local sets, dels = {'#v', version, '#s', size}, nil
  if schema then sets[5], sets[6] = '#m', schema end
  for f, v in pairs(changes) do
    if v then
      sets[#sets + 1] = f
      sets[#sets + 1] = v
    elseif dels then
      dels[#dels + 1] = f
    else
      dels = {f}
    end
  end
  if dels then
    for s = 1, #dels, 1000 do
      redis.call('HDEL', doc, unpack(dels, s, math.min(s + 999, #dels)))
    end
  end
  if #sets <= 2000 then
    redis.call('HSET', doc, unpack(sets))
  else
    for s = 1, #sets, 2000 do
      redis.call('HSET', doc, unpack(sets, s, math.min(s + 1999, #sets)))
    end
  end
  if ttl ~= '' then redis.call('PEXPIRE', doc, ttl) end
end

-- Drop the operation log's records numbered up to oldest.
local function trim_ops(ops, oldest)
  local all = redis.call('HGETALL', ops)
  local old = {}
  for i = 1, #all, 2 do
    if string.byte(all[i], 1) ~= 35 then
      local s = tonumber(string.match(all[i + 1], '^(%d+) '))
      if s and s <= oldest then old[#old + 1] = all[i] end
    end
  end
  if #old > 0 then redis.call('HDEL', ops, unpack(old)) end
end

-- The main body: the write's parameters, then what the script reads.
local doc, ops, claimkey = KEYS[1], KEYS[2], KEYS[3]
local opkey, nonce, digest, dedupe, ttl, max_bytes, mode, expected, flags, lease_ms, want,
  schema = string.match(ARGV[1],
    '^(%S+)\n(%S+)\n(%S*)\n(%d+)\n(%d*)\n(%d+)\n(%a)\n(%d*)\n(%a*)\n(%d*)\n([01])\n(%d*)$')
if opkey == nil then return redis.error_reply('chatstate: malformed arguments') end
max_bytes = tonumber(max_bytes)  -- dedupe, ttl and lease stay text: Lua would print 1e+14
want = want == '1'
local completes, force, fresh, keep = flags == 'c', false, flags == 'n', false
if #flags > 1 or flags == 'f' then  -- (none, or only n or c, are the usual cases)
  completes = string.find(flags, 'c', 1, true) ~= nil
  force = string.find(flags, 'f', 1, true) ~= nil
  fresh = string.find(flags, 'n', 1, true) ~= nil
  keep = string.find(flags, 'k', 1, true) ~= nil
end
local version, seq = 0, 0  -- the document's version; the operation log's count

-- The reply: a head of status, nonce (echoed), the version the write made (or
-- found), the document's version now and a mode's extra value; then the document.
local function reply(status, v, extra)
  local head = status .. '\n' .. nonce .. '\n' .. v .. '\n' .. version .. '\n' ..
    (extra or '') .. '\n'
  if want then return head .. dump(doc) end
  return head
end

-- Remember the operation under its key, with the log's next sequence number; now
-- and then drop the records older than the newest REMEMBERED; end a completed claim
-- (unless it is kept).
local function remember_op(v)
  seq = seq + 1
  redis.call('HSET', ops, opkey, seq .. ' ' .. v .. ' ' .. nonce .. ' ' .. digest, '#n', seq)
  if seq >= TRIM_AT and (seq - REMEMBERED) % (TRIM_AT - REMEMBERED) == 0 then
    trim_ops(ops, seq - REMEMBERED)
  end
  redis.call('PEXPIRE', ops, dedupe)
  if completes and not keep then redis.call('DEL', claimkey) end
end

-- Read and check everything before the first write.
local refused, rver, rnonce, rdig, hnonce
if mode == 'w' then  -- a renewal reads and changes nothing but the claim
  refused, hnonce = read_claim(claimkey)
  if refused then return refused end
  if hnonce ~= nonce then return reply('lost', 0) end
  redis.call('PEXPIRE', claimkey, lease_ms)
  return reply('claimed', 0)
end
refused, seq, rver, rnonce, rdig = read_log(ops, not fresh and opkey or nil, mode == 'D' and force)
if refused then return refused end
if mode == 'c' or mode == 'l' or completes then
  refused, hnonce = read_claim(claimkey)
  if refused then return refused end
end
local A, kinds, paths, values  -- (a release needs none of these)
if mode ~= 'l' then A, kinds, paths, values = parse_body(mode, ARGV[2]) end
local size, sschema, stored = 0, 1, nil
if not (mode == 'D' and force) and mode ~= 'l' then
  refused, version, size, sschema, stored = load_meta(doc, schema ~= '', paths)
  if refused then return refused end
end

-- The rules, in apply_write's order.
if rver and mode ~= 'l' then
  -- The op key is known: the request reused for another (refused), the same call
  -- again (its answer), or another copy of the message (duplicate).
  if digest ~= '' and rdig ~= '' and rdig ~= digest then return reply('reused', version) end
  if rnonce == nonce and mode ~= 'c' then return reply('applied', rver) end
  return reply('duplicate', rver)
end
if mode == 'c' then
  if hnonce and hnonce ~= nonce then
    -- Held, by another message or by another copy of this one (which may yet fail):
    -- wait, then find it recorded (duplicate), released or lapsed (claim it).
    return reply('busy', version, redis.call('PTTL', claimkey))
  end
  redis.call('SET', claimkey, nonce .. ' ' .. opkey, 'PX', lease_ms)
  return reply('claimed', version)
end
if mode == 'l' then
  if hnonce == nonce then redis.call('DEL', claimkey) end
  return reply('released', 0)
end
if completes and hnonce ~= nonce then return reply('lost', version) end
if schema ~= '' and version > 0 and mode ~= 'D' then
  -- The schema guard: never mix shapes. A replace carries a whole (migrated)
  -- document, so it may move a document to a newer schema, never back.
  local mine = tonumber(schema)
  if sschema > mine then return reply('newer_schema', version, sschema) end
  if sschema < mine and mode ~= 'x' then return reply('stale_schema', version, sschema) end
end
if mode == 'e' and #kinds == 0 then
  -- Nothing to change: no version, no document made; only the id is remembered.
  if expected ~= '' and tonumber(expected) ~= version then return reply('conflict', 0) end
  remember_op(version)
  return reply('applied', version)
end

-- The new document, as changes to the stored fields and its size.
local changes, value = nil, nil
if mode == 'e' then
  if expected ~= '' and tonumber(expected) ~= version then return reply('conflict', 0) end
  changes, size = apply_edits(kinds, paths, values, stored, size)
elseif mode == 'i' then
  refused, value, size, changes = apply_increment(doc, paths, A[#A], stored, size, max_bytes)
  if refused == 'too_large' then return 'too_large\n' .. nonce .. '\n' .. value end  -- (the size)
  if type(refused) == 'string' then return reply('counter', version, refused) end
  if refused then return refused end
end
if changes == nil and mode ~= 'D' then
  refused, changes, size = rewrite(doc, mode, A, kinds, paths, values, expected, version)
  if refused == 'conflict' then return reply('conflict', 0) end
  if refused then return refused end
end
if size > max_bytes and mode ~= 'D' then  -- a delete removes it, whatever its size
  return 'too_large\n' .. nonce .. '\n' .. size
end

-- Everything is checked: from here on the script only writes.
if mode == 'D' then
  redis.call('DEL', doc)
  version = 0
  remember_op(0)
  want = false
  return reply('applied', 0)
end
version = version + 1
local new_schema = schema ~= '' and tonumber(schema) ~= sschema and schema or nil
store(doc, version, size, new_schema, changes, ttl)
remember_op(version)
return reply('applied', version, value)
""".replace("TRIM_AT", str(OPS_TRIM_AT)).replace("REMEMBERED", str(REMEMBERED_OPS))
)


def _least_size(edits: list[tuple[str, Path, int]]) -> int:
    """A lower bound of what the edited entries will take: each path's last set, if it stays.

    Walking back from the last edit, an entry counts once (the last write of a
    path wins) and only if neither it nor a parent is deleted later. Character
    counts never exceed UTF-8 byte counts, so this never refuses a write that fits.
    """
    if len(edits) < 2:
        return sum(size for kind, _, size in edits if kind != "d")
    total = 0
    seen: set[Path] = set()
    gone: set[Path] = set()
    for kind, path, size in reversed(edits):
        if path in seen or any(path[:i] in gone for i in range(1, len(path) + 1)):
            continue
        if kind == "d":
            gone.add(path)
        else:
            seen.add(path)
            total += size
    return total


def write_args(write: Write, *, fresh: bool = False) -> list[str]:  # noqa: C901, PLR0912, PLR0915 - one branch per operation
    """Pack a write into the apply script's two arguments.

    ``fresh`` marks the first send of a write whose op key chatstate made up:
    the script then skips looking the key up (it cannot have been logged).

    Raises:
        StateTooLargeError: the entries a patch sets already take more than
            ``max_bytes``, or the patch is over twice that size (checked here,
            so such a write never reaches, or holds up, the server).
    """
    op = write.operation
    body: list[str] = []
    expected: int | str = ""
    flags = ("c" if write.completes_claim else "") + ("n" if fresh else "")
    if write.keeps_claim and write.completes_claim:
        flags += "k"
    lease: int | str = ""
    if isinstance(op, Edits):
        mode = "e"
        expected = "" if op.expected_version is None else op.expected_version
        sizes: list[tuple[str, Path, int]] = []
        for kind, path, value in op.edits:
            text = kind + encode_path(path)
            body.append(text)
            if kind == SET:
                encoded = encode_value(value)
                body.append(encoded)
                sizes.append((kind, path, len(text) - 1 + len(encoded)))
            else:
                sizes.append((kind, path, len(text) + 1))
        least = _least_size(sizes)
        if least > write.max_bytes:
            raise StateTooLargeError(size=least, limit=write.max_bytes)
    elif isinstance(op, Increment):
        mode = "i"
        body.append(encode_path(op.path))
        body.extend(encode_path(op.path[:i]) for i in range(1, len(op.path)))
        body.append(str(op.by))
    elif isinstance(op, Reset):
        mode = "r"
        for path in op.preserved:
            body.append(encode_path(path))
            body.append(str(len(path) - 1))
            body.extend(encode_path(path[:i]) for i in range(1, len(path)))
    elif isinstance(op, Replace):
        mode = "x"
        expected = op.expected_version
        for item in flatten(op.data).items():
            body.extend(item)
    elif isinstance(op, Renew):
        mode = "w"
        lease = op.lease_ms
    elif isinstance(op, Acquire):
        mode = "c"
        lease = op.lease_ms
    elif isinstance(op, Release):
        mode = "l"
    else:
        assert isinstance(op, Delete)
        mode = "D"
        if op.force:
            flags += "f"
    packed = "\n".join(body)
    if len(packed) > 2 * write.max_bytes + 64:
        raise StateTooLargeError(
            size=len(packed),
            limit=write.max_bytes,
            detail=f"the write takes {len(packed)} bytes to send, over twice max_bytes",
        )
    ttl = "" if write.ttl_ms is None else write.ttl_ms
    params = (
        f"{write.op_key}\n{write.nonce}\n{write.digest}\n{write.dedupe_ms}\n{ttl}\n"
        f"{write.max_bytes}\n{mode}\n{expected}\n{flags}\n{lease}\n{int(write.want_document)}\n"
        f"{'' if write.schema is None else write.schema}"
    )
    return [params, packed]
